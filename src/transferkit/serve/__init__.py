"""`transferkit serve`: a trained run (or its ONNX export) behind an HTTP API and a one-page UI.

* :mod:`~transferkit.serve.config`     ServeConfig: batching and every bound a request can hit
* :mod:`~transferkit.serve.predictor`  the model in two steps, the code `predict` runs: prepare, infer
* :mod:`~transferkit.serve.batching`   requests arriving together share a forward pass
* :mod:`~transferkit.serve.inputs`     reading a request (multipart images, JSON texts), each fault a 4xx
* :mod:`~transferkit.serve.app`        the FastAPI app: /predict, /healthz, /info, the page, /docs
* :mod:`~transferkit.serve.page`       the page at /, self-contained
* :mod:`~transferkit.serve.server`     the socket, uvicorn, workers, a graceful stop

Importing this package needs none of the serving packages; `require_serve` says which are missing.

Example:
    >>> from transferkit.serve.server import open_socket, run     # doctest: +SKIP
    >>> run("runs/plants", open_socket("127.0.0.1", 8000))         # until Ctrl-C
"""

from __future__ import annotations

import importlib.util

from transferkit.errors import ServeError

PACKAGES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "multipart": "python-multipart"}  # module -> distribution


def require_serve() -> None:
    """Raise ServeError naming the missing packages and the install command, before any of them is imported."""
    missing = [dist for module, dist in PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ServeError(
            f"transferkit serve needs {', '.join(PACKAGES.values())}; missing: {', '.join(missing)}. "
            "Install them with: pip install 'transferkit[serve]'"
        )
