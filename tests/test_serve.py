"""transferkit serve: the real server (uvicorn in a subprocess, loopback, a free port), a real trained run, real HTTP.

The answers are compared with `transferkit predict` on the same files, every kind of bad request is a 4xx
JSON answer that leaves the server healthy, the page works in real headless Chromium, a bounded load test
prints its latencies, and SIGTERM / Ctrl-C let requests in flight finish before a clean exit.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import CHROMIUM_FLAGS, COLOURS, chromium_path, copy_run, invoke_cli, make_image
from text_fixtures import topic_sentences, write_text_csv
from transferkit import TextClassifier
from transferkit.cli.app import app

START_TIMEOUT = 120  # seconds for a server to load its model and answer /healthz (a busy 2-core machine)


# --------------------------------------------------------------------------- a real server in a subprocess


class Server:
    """`transferkit serve ARGS --port 0` in a subprocess; the port it took is read from its first line."""

    def __init__(self, args: list[str], log_dir: Path):
        self.out, self.err = log_dir / "serve.out", log_dir / "serve.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "transferkit", "serve", *args, "--port", "0"],
                stdout=out,
                stderr=err,
                env={**os.environ, "COLUMNS": "200"},
            )
        self.host, self.port = self._address()
        self._wait_healthy()

    def _address(self) -> tuple[str, int]:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            found = re.search(r"at http://([\d.]+):(\d+)", self.out.read_text())
            if found:
                return found.group(1), int(found.group(2))
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"the server did not start:\n{self.out.read_text()}\n{self.err.read_text()}")

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                if self.get("/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"/healthz never answered 200:\n{self.err.read_text()}")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def connection(self, timeout: float = 60) -> http.client.HTTPConnection:
        """A keep-alive connection with Nagle's algorithm off, as curl, browsers and requests have it."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, conn: http.client.HTTPConnection | None = None
    ) -> tuple[int, dict | str]:
        own = conn is None
        conn = conn or self.connection()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            kind = response.getheader("content-type", "")
            return response.status, json.loads(data) if kind.startswith("application/json") else data.decode()
        finally:
            if own:
                conn.close()

    def get(self, path: str) -> tuple[int, dict | str]:
        return self.request("GET", path)

    def post_files(self, files: list[tuple[str, bytes]], top_k: int = 1, field: str = "files", conn=None):
        body, content_type = multipart(files, field)
        return self.request("POST", f"/predict?top_k={top_k}", body, {"content-type": content_type}, conn)

    def post_json(self, data, path: str = "/predict?top_k=2"):
        return self.request("POST", path, json.dumps(data).encode(), {"content-type": "application/json"})

    def start_post(self, path: str, content_type: str, length: int, first: bytes) -> http.client.HTTPConnection:
        """A POST whose headers declare `length` bytes of body, of which only `first` is sent so far."""
        conn = self.connection()
        conn.putrequest("POST", path)
        conn.putheader("content-type", content_type)
        conn.putheader("content-length", str(length))
        conn.endheaders()
        conn.send(first)
        return conn

    @staticmethod
    def answer(conn: http.client.HTTPConnection) -> tuple[int, dict]:
        response = conn.getresponse()
        answer = json.loads(response.read())
        conn.close()
        return response.status, answer

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def multipart(files: list[tuple[str, bytes]], field: str = "files") -> tuple[bytes, str]:
    """A multipart/form-data body with each (name, bytes) as a file part named `field`."""
    boundary = "transferkit-test-boundary-7d1f"
    parts = [
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def encoded(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares width x height pixels: a decompression bomb, refused by its header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trained(colours_run) -> Path:
    """The session's feature-extraction run on generated colour images (the built-in backbone at 64 px)."""
    return colours_run[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Files the run never saw: odd sizes, PNG and JPEG, grey and RGBA among them."""
    root = tmp_path_factory.mktemp("inputs")
    files = []
    for i, (size, mode) in enumerate(
        [
            (23, "RGB"),
            (40, "L"),
            (57, "RGB"),
            (64, "RGBA"),
            (80, "RGB"),
            (101, "RGB"),
            (33, "RGB"),
            (150, "L"),
            (48, "RGB"),
            (71, "RGBA"),
            (90, "RGB"),
            (64, "RGB"),
        ]
    ):
        colour = list(COLOURS.values())[i % 3]
        img = make_image(colour, 5000 + i, size=size, mode=mode)
        path = root / f"in{i:02d}.{'png' if mode == 'RGBA' or i % 2 else 'jpg'}"
        img.save(path)
        files.append(path)
    return files


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    srv = Server([str(trained), "--max-inputs", "16", "--read-timeout", "1", "-q"], tmp_path_factory.mktemp("log"))
    yield srv
    srv.stop()


def uploads(paths: list[Path]) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in paths]


# --------------------------------------------------------------------------- answers


@pytest.mark.subprocess
def test_answers_equal_the_predict_command_on_the_same_files(server, trained, images):
    status, answer = server.post_files(uploads(images), top_k=3)
    assert status == 200, answer
    cli = json.loads(invoke_cli("predict", str(trained), *map(str, images), "--json", "--top-k", "3").stdout)
    assert [r["file"] for r in answer["predictions"]] == [p.name for p in images]
    assert [r["predictions"] for r in answer["predictions"]] == [r["predictions"] for r in cli]  # exactly
    # One file per request: batches of another size; equal here, and within float noise anywhere.
    for path, expected in zip(images[:4], cli):
        status, single = server.post_files(uploads([path]), top_k=3)
        got = single["predictions"][0]["predictions"]
        assert [p["label"] for p in got] == [p["label"] for p in expected["predictions"]]
        assert np.allclose([p["probability"] for p in got], [p["probability"] for p in expected["predictions"]], atol=1e-6)


@pytest.mark.subprocess
def test_info_health_and_docs(server, trained):
    status, info = server.get("/info")
    meta = json.loads((trained / "transferkit.json").read_text())
    assert status == 200 and info["classes"] == meta["classes"] and info["modality"] == "image"
    assert info["backbone"]["name"] == "builtin:efficientnet_lite0" and info["preprocessing"] == meta["data_config"]
    assert info["metrics"]["test"]["accuracy"] == meta["metrics"]["test"]["accuracy"]
    assert info["limits"]["max_inputs"] == 16 and info["input"]["field"] == "files"
    status, health = server.get("/healthz")
    assert status == 200 and health["status"] == "ok"
    status, spec = server.get("/openapi.json")
    assert "multipart/form-data" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    status, docs = server.get("/docs")
    assert status == 200 and "swagger" in docs.lower()


@pytest.mark.subprocess
def test_a_large_request_leaves_the_server_responsive(server):
    """While 8 images of 9 megapixels decode and compute, /healthz still answers."""
    y, x = np.mgrid[0:3000, 0:3000]
    big = encoded(Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)), "JPEG", quality=80)
    result = {}
    worker = threading.Thread(target=lambda: result.update(answer=server.post_files([("big.jpg", big)] * 8)))
    started = time.perf_counter()
    worker.start()
    answered_during = []
    while worker.is_alive():
        t = time.perf_counter()
        assert server.get("/healthz")[0] == 200
        if worker.is_alive():
            answered_during.append(time.perf_counter() - t)
        time.sleep(0.02)
    worker.join()
    print(
        f"8 x 9 MP in {time.perf_counter() - started:.2f} s; {len(answered_during)} /healthz answered meanwhile, "
        f"slowest {max(answered_during, default=0) * 1000:.0f} ms"
    )
    assert result["answer"][0] == 200 and len(result["answer"][1]["predictions"]) == 8
    assert answered_during


# --------------------------------------------------------------------------- bad requests


def bad_requests(server, images) -> dict[str, tuple]:
    """name -> (status expected, word the error must name, the request as (method, path, body, headers))."""
    good = images[0].read_bytes()
    files = lambda items, field="files": multipart(items, field)  # noqa: E731
    body, kind = files([("notes.jpg", b"just some text, not an image\n" * 20)])
    cases = {"not an image": (422, "not an image", ("POST", "/predict", body, {"content-type": kind}))}
    jpeg = encoded(make_image((200, 40, 40), 3, size=80), "JPEG")
    for name, data, status, word in [
        ("truncated", jpeg[: len(jpeg) // 2], 422, "truncated"),
        ("empty file", b"", 422, "empty"),
        ("decompression bomb", png_declaring(30000, 30000), 413, "pixels"),
    ]:
        body, kind = files([(f"{name}.png", data)])
        cases[name] = (status, word, ("POST", "/predict", body, {"content-type": kind}))
    body, kind = files([("a.jpg", good)], field="image")
    cases["missing field"] = (422, "no field 'files'", ("POST", "/predict", body, {"content-type": kind}))
    body, kind = files([(f"{i}.jpg", good) for i in range(17)])
    cases["too many files"] = (413, "at most 16", ("POST", "/predict", body, {"content-type": kind}))
    cases["wrong content type"] = (
        415,
        "multipart/form-data",
        ("POST", "/predict", b'{"texts": ["a"]}', {"content-type": "application/json"}),
    )
    cases["no content type"] = (415, "no content type", ("POST", "/predict", good, {}))
    cases["no boundary"] = (400, "boundary", ("POST", "/predict", body, {"content-type": "multipart/form-data"}))
    cases["garbage multipart"] = (400, "multipart", ("POST", "/predict", b"\x00\xff" * 50, {"content-type": kind}))
    text_part = b'--b\r\nContent-Disposition: form-data; name="files"\r\n\r\nhello\r\n--b--\r\n'
    cases["text, not a file"] = (422, "not files", ("POST", "/predict", text_part, {"content-type": "multipart/form-data; boundary=b"}))
    cases["top_k 0"] = (422, "top_k", ("POST", "/predict?top_k=0", body, {"content-type": kind}))
    cases["top_k text"] = (422, "top_k", ("POST", "/predict?top_k=many", body, {"content-type": kind}))
    cases["unknown path"] = (404, "/nowhere", ("GET", "/nowhere", None, {}))
    cases["wrong method"] = (405, "GET /predict", ("GET", "/predict", None, {}))
    return cases


@pytest.mark.subprocess
def test_every_bad_request_is_a_4xx_json_error_and_the_server_lives_on(server, images):
    for name, (status, word, (method, path, body, headers)) in bad_requests(server, images).items():
        got, answer = server.request(method, path, body, headers)
        assert (got, isinstance(answer, dict)) == (status, True), f"{name}: {got} {answer}"
        assert word.lower() in answer["error"].lower(), f"{name}: {answer}"
    status, health = server.get("/healthz")
    assert status == 200 and health["status"] == "ok"
    assert server.post_files(uploads(images[:1]))[0] == 200


@pytest.mark.subprocess
def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    """A declared Content-Length over --max-upload-mb (32 MB) is answered 413 after a few bytes of it."""
    conn = server.start_post("/predict", "multipart/form-data; boundary=b", 40_000_000, b"--b\r\n")
    status, answer = server.answer(conn)
    assert status == 413 and "40,000,000 bytes" in answer["error"]
    assert server.get("/healthz")[0] == 200


@pytest.mark.subprocess
def test_a_body_that_arrives_too_slowly_is_answered_408(server):
    """--read-timeout 1: a client that stops sending half way gets 408, and the server goes on."""
    conn = server.start_post("/predict", "multipart/form-data; boundary=b", 1000, b"--b\r\n")
    status, answer = server.answer(conn)
    assert status == 408 and "did not arrive within 1 s" in answer["error"]
    assert server.get("/healthz")[0] == 200


def test_cli_refusals_are_one_line_messages(trained):
    """A missing run and a taken port: exit status and one message, no traceback, before anything is served."""
    runner = CliRunner()
    missing = runner.invoke(app, ["serve", str(trained.parent / "nothing"), "--port", "0"])
    assert missing.exit_code == 1 and "not a finished transferkit run" in missing.output
    assert "Traceback" not in missing.output
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = runner.invoke(app, ["serve", str(trained), "--port", str(taken.getsockname()[1])])
    assert busy.exit_code == 1 and "Cannot listen on 127.0.0.1" in busy.output and "--port" in busy.output
    bad = runner.invoke(app, ["serve", str(trained), "--max-batch", "0"])
    assert bad.exit_code == 2


# --------------------------------------------------------------------------- the page in a real browser


@pytest.mark.subprocess
@pytest.mark.browser
def test_the_page_classifies_an_image_in_headless_chromium(server, images, tmp_path):
    from playwright.sync_api import sync_playwright

    browser_path = chromium_path()
    expected = server.post_files(uploads([images[2]]), top_k=5)[1]["predictions"][0]["predictions"]
    requested, failed = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True, args=[f for f in CHROMIUM_FLAGS if f != "--headless"])
        page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone
        page.on("request", lambda r: requested.append(r.url))
        page.on("requestfailed", lambda r: failed.append(r.url))
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-ready='1']")
        page.set_input_files("#file", str(images[2]))
        page.wait_for_selector("#results li")
        labels = page.locator("#results .label").all_inner_texts()
        shown = page.locator("#results .prob").all_inner_texts()
        wide = page.evaluate("document.documentElement.scrollWidth")
        preview = page.locator("#preview").is_visible()
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        browser.close()
    assert labels == [e["label"] for e in expected]
    assert shown[0] == f"{100 * expected[0]['probability']:.1f}%"
    assert preview and wide <= 390  # the image shows, and nothing is wider than the phone
    own = (server.url + "/", "blob:", "data:")
    assert requested and all(u.startswith(own) for u in requested), requested  # no external resource
    assert not failed, failed


# --------------------------------------------------------------------------- load


@pytest.mark.subprocess
def test_bounded_load_zero_errors_and_batched(server, images):
    """400 requests of one image each from 8 concurrent clients on loopback: every answer right, none lost."""
    requests, concurrency = 400, 8
    expected = {p.name: server.post_files(uploads([p]))[1]["predictions"][0]["predictions"][0] for p in images}
    before = server.get("/healthz")[1]
    latencies, errors = [], []

    def client(k: int) -> None:
        conn = server.connection(timeout=60)
        for i in range(k, requests, concurrency):
            path = images[i % len(images)]
            t = time.perf_counter()
            try:
                status, answer = server.post_files(uploads([path]), conn=conn)
            except (OSError, http.client.HTTPException) as e:
                errors.append(repr(e))
                conn = server.connection(timeout=60)
                continue
            latencies.append(time.perf_counter() - t)
            got = answer["predictions"][0]["predictions"][0] if status == 200 else None
            if (
                got is None
                or got["label"] != expected[path.name]["label"]
                or abs(got["probability"] - expected[path.name]["probability"]) > 1e-6
            ):
                errors.append(f"{path.name}: {status} {answer}")
        conn.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    wall = time.perf_counter() - started
    after = server.get("/healthz")[1]
    batches, inputs = after["batches"] - before["batches"], after["inputs"] - before["inputs"]
    q = statistics.quantiles(latencies, n=100)
    print(
        f"{requests} requests at concurrency {concurrency}: {requests / wall:.0f} req/s, p50 {q[49] * 1000:.1f} ms, "
        f"p95 {q[94] * 1000:.1f} ms; {batches} batches, {inputs / max(batches, 1):.1f} images per batch"
    )
    assert not errors, errors[:5]
    assert len(latencies) == requests and inputs == requests
    assert batches < requests  # requests that arrived together shared forward passes


# --------------------------------------------------------------------------- ONNX, workers, text, graceful stop


@pytest.mark.subprocess
@pytest.mark.slow  # an ONNX export and two worker processes
def test_onnx_export_served_by_two_workers_as_predict_runs_it(trained, images, tmp_path):
    from transferkit.export.onnx import OnnxClassifier, export_run

    path = export_run(copy_run(trained, tmp_path / "run"), "onnx").path  # a copy: the session's run stays as fitted
    srv = Server([str(path), "--workers", "2", "-q"], tmp_path)
    try:
        status, answer = srv.post_files(uploads(images), top_k=3)
        health = srv.get("/healthz")
    finally:
        code = srv.stop(signal.SIGINT)  # Ctrl-C
    assert status == 200, answer
    proba = OnnxClassifier.load(path).predict_proba(images)  # what `transferkit predict MODEL.onnx` computes
    classes = json.loads((trained / "transferkit.json").read_text())["classes"]
    for row, p in zip(answer["predictions"], proba):
        top = [classes[i] for i in p.argsort()[::-1][:3]]
        assert [x["label"] for x in row["predictions"]] == top
        assert [x["probability"] for x in row["predictions"]] == [float(p[classes.index(t)]) for t in top]
    assert health[0] == 200 and code == 0, srv.err.read_text()


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text")
    data = write_text_csv(root / "topics.csv", topic_sentences(12))
    clf = TextClassifier("minilm", strategy="feature-extraction", max_length=32, head_epochs=5).fit(data)
    return clf.save(root / "run")


@pytest.mark.subprocess
def test_text_run_served_and_a_request_in_flight_survives_sigterm(text_run, tmp_path):
    texts = ["The striker scored twice in the final.", "Rain and wind all weekend.", "The app crashed again."]
    srv = Server([str(text_run), "-q"], tmp_path)
    try:
        refusals = [
            srv.request("POST", "/predict", b"{not json", {"content-type": "application/json"}),
            srv.post_json({"text": "singular"}),
            srv.post_json({"texts": []}),
            srv.post_json({"texts": [3]}),
            srv.post_json({"texts": ["   "]}),
            srv.post_files([("a.jpg", b"x")]),
        ]
        body = json.dumps({"texts": texts}).encode()
        # A request in flight: part of its body sent when SIGTERM arrives, the rest after.
        conn = srv.start_post("/predict?top_k=2", "application/json", len(body), body[:20])
        time.sleep(0.3)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        conn.send(body[20:])
        status, answer = srv.answer(conn)
        code = srv.proc.wait(60)
    finally:
        srv.stop()
    assert [r[0] for r in refusals] == [400, 422, 422, 422, 422, 415]
    assert all("error" in r[1] for r in refusals)
    assert status == 200 and [r["text"] for r in answer["predictions"]] == texts
    clf = TextClassifier.load(text_run)
    proba = clf.predict_proba(texts)  # what `transferkit predict RUN TEXT...` computes
    for row, p in zip(answer["predictions"], proba):
        assert row["predictions"][0] == {"label": clf.classes_[int(p.argmax())], "probability": float(p.max())}
    assert code == 0 and "Stopped." in srv.out.read_text(), srv.err.read_text()


def test_the_serve_extra_is_declared_for_users_and_ci():
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    serve = re.search(r"^serve = \[(.*)\]", text, re.M).group(1)
    test = re.search(r"^test = \[(.*?)\]", text, re.M | re.S).group(1)
    for name in ("fastapi", "uvicorn", "python-multipart"):
        assert name in serve and name in test
    assert "playwright" in test


def test_batcher_shares_passes_and_isolates_a_failing_request():
    """Requests submitted together share one call; a request whose batch fails is retried alone, the others answered."""
    import asyncio

    from transferkit.serve.batching import Batcher

    calls = []

    def infer(items: list) -> np.ndarray:
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("cannot compute 'bad'")
        return np.array([[float(len(x))] for x in items])

    async def scenario():
        batcher = Batcher(infer, max_batch=8, wait_s=0.05, max_queued=100)
        batcher.start()
        together = await asyncio.gather(batcher.submit(["a", "bb"], 10), batcher.submit(["ccc"], 10))
        mixed = await asyncio.gather(batcher.submit(["dddd"], 10), batcher.submit(["bad"], 10), return_exceptions=True)
        await batcher.stop()
        return together, mixed, batcher

    together, mixed, batcher = asyncio.run(scenario())
    assert [r.ravel().tolist() for r in together] == [[1.0, 2.0], [3.0]] and calls[0] == ["a", "bb", "ccc"]
    assert mixed[0].ravel().tolist() == [4.0] and isinstance(mixed[1], ValueError)
    assert calls[1:] == [["dddd", "bad"], ["dddd"], ["bad"]] and not batcher.alive
