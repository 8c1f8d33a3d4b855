"""Running the app under uvicorn: the listening socket, one process or several, and a graceful stop.

SIGTERM or Ctrl-C (SIGINT) stops accepting connections, lets every request in flight finish (bounded by the
request timeouts), stops the batcher, and returns, so ``transferkit serve`` exits 0. uvicorn itself
re-raises the signal after such a stop (so a plain script dies of it); `GracefulServer` does not.

With ``workers > 1`` uvicorn's supervisor starts that many processes on the same socket, each loading the
model (their settings travel in the ``TRANSFERKIT_SERVE`` environment variable) and batching on its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import uvicorn
from uvicorn.supervisors import Multiprocess

from transferkit.errors import ServeError, UsageError
from transferkit.runs.directory import read_meta
from transferkit.serve.app import create_app
from transferkit.serve.config import DEFAULT_HOST, DEFAULT_PORT, ServeConfig
from transferkit.serve.predictor import load_predictor

log = logging.getLogger(__name__)
ENVIRONMENT = "TRANSFERKIT_SERVE"  # the settings of worker processes (JSON)
CONCURRENCY_LIMIT = 512  # connections and requests at once per process; beyond, uvicorn answers 503


def open_socket(host: str | None = None, port: int | None = None) -> socket.socket:
    """A socket bound to `host`:`port` (default 127.0.0.1:8000; port 0 takes a free one), before any model loads.

    Raises:
        ServeError: the address is taken, not this machine's, or not allowed (ports below 1024 need root).
    """
    host = DEFAULT_HOST if host is None else host
    port = DEFAULT_PORT if port is None else port
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535; got {port}.")
    try:
        family, kind, proto, _, _ = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ServeError(f"--host {host} is neither an address nor a name this machine resolves ({e.strerror}).") from e
    # proto IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets that say they
    # are TCP, and with it on, each response waits for the client's delayed ACK (40 ms on Linux).
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections arriving while the model loads wait in the backlog
    except OSError as e:
        sock.close()
        raise ServeError(f"Cannot listen on {host}:{port}: {e.strerror}. Choose another --port (or --host).") from e
    sock.set_inheritable(True)  # worker processes share it
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(
    source: str | Path,
    sock: socket.socket,
    *,
    config: ServeConfig | None = None,
    workers: int = 1,
    device: str | None = None,
    precision: str | None = None,
    on_ready: Callable[[dict], None] | None = None,
) -> None:
    """Serve `source` (a run directory or an ONNX export) on `sock` until SIGTERM or Ctrl-C; returns after the stop.

    `on_ready` gets the model's ``/info`` once it is loaded (with workers: once the source is checked).
    """
    config = config or ServeConfig()
    if not isinstance(workers, int) or workers < 1:
        raise UsageError(f"workers must be an integer >= 1; got {workers!r}.")
    settings = {"source": str(source), "device": device, "precision": precision, "config": config.to_dict()}
    try:
        if workers == 1:
            _serve_here(settings, sock, config, on_ready)
        else:
            _serve_in_workers(settings, sock, config, workers, on_ready)
    finally:
        sock.close()


def _serve_here(settings: dict, sock: socket.socket, config: ServeConfig, on_ready) -> None:
    app = app_from_settings(settings)
    if on_ready:
        on_ready(app.state.info)
    server = GracefulServer(uvicorn_config(app, sock, config))
    server.run(sockets=[sock])
    if not server.started:
        raise ServeError("The server did not start; the messages above say why.")


def _serve_in_workers(settings: dict, sock: socket.socket, config: ServeConfig, workers: int, on_ready) -> None:
    source = Path(settings["source"])
    if not (source.suffix == ".onnx" and source.is_file()):
        read_meta(source)  # a bad run is one message here, not one per worker
    os.environ[ENVIRONMENT] = json.dumps(settings)  # spawned workers read their settings from it
    if on_ready:
        on_ready({"source": str(source), "workers": workers})
    Multiprocess(uvicorn_config(f"{__name__}:app_from_environment", sock, config, workers=workers), sockets=[sock]).run()


def app_from_settings(settings: dict):
    predictor = load_predictor(settings["source"], settings.get("device"), settings.get("precision"))
    return create_app(predictor, ServeConfig(**settings.get("config", {})))


def app_from_environment():
    """The app of one worker process (uvicorn's factory), from the settings the parent left in the environment."""
    return app_from_settings(json.loads(os.environ[ENVIRONMENT]))


def uvicorn_config(app, sock: socket.socket, config: ServeConfig, workers: int = 1) -> uvicorn.Config:
    host, port = sock.getsockname()[:2]
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        workers=workers,
        factory=isinstance(app, str),
        log_config=None,
        access_log=False,
        server_header=False,
        limit_concurrency=CONCURRENCY_LIMIT,
        timeout_graceful_shutdown=int(config.read_timeout_s + config.timeout_s) + 1,
    )


class GracefulServer(uvicorn.Server):
    """uvicorn's server, minus re-raising the stop signal afterwards: a requested stop is a clean exit."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
