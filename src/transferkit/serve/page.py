"""The one-page UI at ``/``: pick or drop an image (or type a text), see the top labels as bars.

One HTML document with its style and script inline: no external asset, font or request beyond this
server's own ``info`` and ``predict`` (the Content-Security-Policy sent with it allows nothing else), so
it works offline. Labels and messages are inserted as text, never as HTML. Readable from phone width up.
"""

from __future__ import annotations

import base64
import hashlib

TOP_K = 5  # labels the page asks for and shows

STYLE = """
*{box-sizing:border-box}
body{margin:0;font:16px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1f24;background:#f4f5f7}
main{max-width:40rem;margin:0 auto;padding:1rem}
h1{font-size:1.3rem;margin:.2rem 0}
#about{color:#57606a;font-size:.9rem;margin:0 0 1rem;overflow-wrap:anywhere}
#drop{display:block;border:2px dashed #8c959f;border-radius:.6rem;padding:1.4rem 1rem;text-align:center;
  background:#fff;cursor:pointer}
#drop.over{border-color:#0969da;background:#eef5ff}
#drop input{display:block;margin:.6rem auto 0;max-width:100%}
#text{width:100%;min-height:7rem;font:inherit;padding:.6rem;border:1px solid #8c959f;border-radius:.4rem}
button{font:inherit;margin-top:.5rem;padding:.5rem 1.2rem;border:0;border-radius:.4rem;background:#0969da;color:#fff}
#preview{display:block;max-width:100%;min-height:8rem;max-height:18rem;object-fit:contain;margin:1rem auto;
  border-radius:.4rem}
#status{min-height:1.4rem;color:#57606a}
#status.error{color:#cf222e}
ol{list-style:none;padding:0;margin:0}
li{margin:.5rem 0}
.row{display:flex;justify-content:space-between;gap:.8rem}
.label{font-weight:600;overflow-wrap:anywhere}
.bar{height:.6rem;background:#d0d7de;border-radius:.3rem;overflow:hidden}
.bar i{display:block;height:100%;background:#0969da}
li:first-child .bar i{background:#1a7f37}
[hidden]{display:none!important}
"""

SCRIPT = """
const $ = (id) => document.getElementById(id);
let info = null;
function status(text, error) { $('status').textContent = text; $('status').className = error ? 'error' : ''; }
function show(rows) {
  const list = $('results');
  list.replaceChildren();
  for (const p of rows) {
    const li = document.createElement('li'), row = document.createElement('div'), bar = document.createElement('div');
    const label = document.createElement('span'), prob = document.createElement('span'), fill = document.createElement('i');
    row.className = 'row'; label.className = 'label'; prob.className = 'prob'; bar.className = 'bar';
    label.textContent = p.label; prob.textContent = (100 * p.probability).toFixed(1) + '%';
    fill.style.width = (100 * p.probability).toFixed(1) + '%';
    row.append(label, prob); bar.append(fill); li.append(row, bar); list.append(li);
  }
}
async function ask(body, headers) {
  status('Classifying...'); $('results').replaceChildren();
  try {
    const r = await fetch('predict?top_k=TOP_K', {method: 'POST', body: body, headers: headers || {}});
    const answer = await r.json();
    if (!r.ok) { status(answer.error || ('HTTP ' + r.status), true); return; }
    show(answer.predictions[0].predictions); status('');
  } catch (e) { status('The server did not answer: ' + e, true); }
}
function classifyFile(file) {
  if (!file) return;
  $('preview').src = URL.createObjectURL(file); $('preview').hidden = false;
  const form = new FormData(); form.append('files', file, file.name); ask(form);
}
function setup() {
  const m = info.metrics && info.metrics.test && info.metrics.test.accuracy;
  $('title').textContent = (info.backbone && info.backbone.name || 'model') + ': ' + info.classes.length + ' classes';
  $('about').textContent = info.classes.join(', ') + (m !== undefined ? ' \\u00b7 test accuracy ' + (100 * m).toFixed(1) + '%' : '');
  if (info.modality === 'text') {
    $('textform').hidden = false;
    $('textform').addEventListener('submit', (e) => { e.preventDefault();
      const t = $('text').value; if (t.trim()) ask(JSON.stringify({texts: [t]}), {'content-type': 'application/json'}); });
  } else {
    $('drop').hidden = false;
    $('file').addEventListener('change', () => classifyFile($('file').files[0]));
    const drop = $('drop');
    drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
    drop.addEventListener('dragleave', () => drop.classList.remove('over'));
    drop.addEventListener('drop', (e) => { e.preventDefault(); drop.classList.remove('over');
      classifyFile(e.dataTransfer.files[0]); });
  }
  document.body.dataset.ready = '1';
}
fetch('info').then((r) => r.json()).then((i) => { info = i; setup(); })
  .catch((e) => status('Cannot read the model info: ' + e, true));
""".replace("TOP_K", str(TOP_K))

PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>transferkit serve</title><link rel="icon" href="data:,">
<style>{STYLE}</style></head>
<body><main>
<h1 id="title">transferkit serve</h1>
<p id="about"></p>
<label id="drop" hidden>Drop an image here, or pick one
  <input id="file" type="file" accept="image/*"></label>
<form id="textform" hidden><textarea id="text" placeholder="Type a text to classify"></textarea>
  <button type="submit">Classify</button></form>
<img id="preview" alt="the image being classified" hidden>
<p id="status" role="status"></p>
<ol id="results" aria-label="predicted labels"></ol>
</main><script>{SCRIPT}</script></body></html>
"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Only this page's own inline style and script, its own API, and the picked image (a blob: URL) may load.
PAGE_HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; script-src {_sha256(SCRIPT)}; style-src {_sha256(STYLE)}; "
    "connect-src 'self'; img-src 'self' blob: data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
