"""A stand-in Hugging Face Hub on a loopback port: the HTTP endpoints huggingface_hub's real code calls.

Served, as the Hub serves them:

* downloads: ``HEAD``/``GET /{repo}/resolve/{revision}/{file}`` with ``X-Repo-Commit``, ``ETag`` and
  ``Content-Length``; misses answer 404 with ``X-Error-Code`` (RepoNotFound, RevisionNotFound,
  EntryNotFound), a private repository without the token 401;
* uploads without Xet (``HF_HUB_DISABLE_XET=1``): ``POST /api/repos/create``, ``/api/models/{repo}/branch/{b}``,
  ``/api/validate-yaml``, ``/api/models/{repo}/preupload/{rev}`` (binary weights as LFS, the rest inline),
  the git-LFS batch API ``POST /{repo}.git/info/lfs/objects/batch`` with a ``PUT`` of each object and its
  verify call, and the NDJSON commit ``POST /api/models/{repo}/commit/{rev}``.

Xet storage (huggingface_hub's default upload when hf_xet is installed) talks to a separate content-addressed
store with its own chunking protocol; it is not served, so uploads run on the LFS path above.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".onnx", ".bin", ".pt", ".pth", ".png")  # what the Hub's .gitattributes sends to LFS


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}

    def commit(self, files: dict[str, bytes], branch: str, message: str) -> str:
        sha = hashlib.sha1(f"{len(self.commits)}:{message}:{sorted(files)}".encode()).hexdigest()
        self.commits[sha] = dict(files)
        self.branches[branch] = sha
        return sha

    def files(self, revision: str) -> dict[str, bytes] | None:
        sha = self.branches.get(revision, revision)
        return self.commits.get(sha)


class LoopbackHub:
    """The stand-in Hub: repositories in memory, a threaded HTTP server on 127.0.0.1, a log of requests."""

    def __init__(self, token: str = "hf_loopback_token"):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.log: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.server: ThreadingHTTPServer | None = None

    def add_repo(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> str:
        repo = self.repos.setdefault(repo_id, Repo(private=private))
        return repo.commit(files, "main", "initial")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> LoopbackHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: LoopbackHub

    def log_message(self, format, *args):  # the test's output stays readable
        pass

    # ---------------------------------------------------------------- plumbing

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str = "application/json"):
        self.send_response(status)
        for k, v in {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None, content_type: str = "application/json"):
        self._send(status, json.dumps(obj).encode(), headers, content_type)

    def _error(self, status: int, code: str | None, message: str, headers: dict | None = None):
        extra = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **(headers or {})}
        self._json(status, {"error": message}, extra)

    def _authorised(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _route(self, method: str):
        path = urlsplit(self.path).path
        self.hub.log.append((method, path))
        parts = [unquote(p) for p in path.strip("/").split("/")]
        handler = self._dispatch(method, parts)
        if handler is None:
            self.hub.unhandled.append((method, path))
            return self._error(404, None, f"not served by the loopback hub: {method} {path}")
        return handler()

    def _dispatch(self, method: str, parts: list[str]):
        if method in ("HEAD", "GET") and len(parts) >= 5 and parts[2] == "resolve":
            return lambda: self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        if method == "POST" and parts[:3] == ["api", "repos", "create"]:
            return self._create_repo
        if method == "POST" and parts[:1] == ["api"] and parts[1:2] == ["validate-yaml"]:
            return self._validate_yaml
        if method == "POST" and len(parts) == 6 and parts[:2] == ["api", "models"]:
            action = {"branch": self._branch, "preupload": self._preupload, "commit": self._commit}.get(parts[4])
            return action and (lambda: action(f"{parts[2]}/{parts[3]}", parts[5]))
        if method == "POST" and len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return lambda: self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}")
        if method == "PUT" and len(parts) == 2 and parts[0] == "lfs-upload":
            return lambda: self._lfs_put(parts[1])
        if method == "POST" and parts == ["lfs-verify"]:
            return self._lfs_verify
        return None

    def do_HEAD(self):
        self._route("HEAD")

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    # ---------------------------------------------------------------- downloads

    def _resolve(self, repo_id: str, revision: str, filename: str):
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorised()):
            return self._error(404 if repo is None else 401, "RepoNotFound", f"Repository {repo_id} not found")
        files = repo.files(revision)
        if files is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        commit = repo.branches.get(revision, revision)
        if filename not in files:
            return self._error(404, "EntryNotFound", f"{filename} does not exist", {"X-Repo-Commit": commit})
        data = files[filename]
        etag = hashlib.sha256(data).hexdigest()
        self._send(200, data, {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}, "application/octet-stream")

    # ---------------------------------------------------------------- uploads

    def _create_repo(self):
        payload = json.loads(self._body() or b"{}")
        if not self._authorised():
            return self._error(401, None, "Invalid credentials in Authorization header")
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            return self._json(409, {"error": "You already created this model repo", "url": url})
        repo = self.hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
        repo.commit({".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "main", "initial commit")
        self._json(200, {"url": url, "name": repo_id})

    def _branch(self, repo_id: str, branch: str):
        self._body()
        repo = self.hub.repos.get(repo_id)
        if not self._authorised() or repo is None:
            return self._error(401 if repo else 404, "RepoNotFound", f"Repository {repo_id} not found")
        if branch in repo.branches:
            return self._error(409, None, f"Reference refs/heads/{branch} already exists")
        repo.branches[branch] = repo.branches["main"]
        self._json(200, {})

    def _validate_yaml(self):
        content = json.loads(self._body())["content"]
        if content.startswith("---"):
            try:
                yaml.safe_load(content.split("---")[1])
            except yaml.YAMLError as e:
                return self._json(400, {"errors": [{"message": str(e)}], "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def _preupload(self, repo_id: str, revision: str):
        files = json.loads(self._body())["files"]
        if not self._authorised() or repo_id not in self.hub.repos:
            return self._error(401, "RepoNotFound", f"Repository {repo_id} not found")
        modes = [
            {
                "path": f["path"],
                "shouldIgnore": False,
                "oid": None,
                "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) or f["size"] > 10_000_000 else "regular",
            }
            for f in files
        ]
        self._json(200, {"files": modes, "commitOid": self.hub.repos[repo_id].branches.get(revision)})

    def _lfs_batch(self, repo_id: str):
        request = json.loads(self._body())
        if not self._authorised() or repo_id not in self.hub.repos:
            return self._error(401, "RepoNotFound", f"Repository {repo_id} not found")
        objects = []
        for o in request["objects"]:
            entry = {"oid": o["oid"], "size": o["size"]}
            if o["oid"] not in self.hub.lfs:
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-upload/{o['oid']}"},
                    "verify": {"href": f"{self.hub.url}/lfs-verify"},
                }
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str):
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, None, f"sha256 of the body is not {oid}")
        self.hub.lfs[oid] = data
        self._send(200)

    def _lfs_verify(self):
        request = json.loads(self._body())
        ok = len(self.hub.lfs.get(request["oid"], b"")) == request["size"]
        self._json(200 if ok else 404, {"ok": ok})

    def _commit(self, repo_id: str, revision: str):
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        repo = self.hub.repos.get(repo_id)
        if not self._authorised() or repo is None:
            return self._error(401, "RepoNotFound", f"Repository {repo_id} not found")
        files = dict(repo.files(revision) or {})
        for item in lines[1:]:
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.hub.lfs:
                    return self._error(422, None, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = self.hub.lfs[value["oid"]]
            elif item["key"] == "deletedFile":
                files.pop(value["path"], None)
        sha = repo.commit(files, revision, lines[0]["value"]["summary"])
        self._json(200, {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})
