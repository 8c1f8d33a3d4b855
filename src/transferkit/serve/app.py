"""The HTTP API (FastAPI): ``POST /predict``, ``GET /healthz``, ``GET /info``, the page at ``/``, docs at ``/docs``.

Every error is JSON, ``{"error": "<what was wrong and how to fix it>", ...}``: a RequestError with its
own status, FastAPI's validation errors as 422, unknown paths 404, wrong methods 405. Inputs are decoded
and preprocessed in a small thread pool (one thread per core), inference runs on the batcher's thread,
and the event loop only moves bytes, so ``/healthz`` answers while a large request computes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from transferkit import __version__
from transferkit.errors import RequestError, TransferkitError, UsageError
from transferkit.serve.batching import Batcher
from transferkit.serve.config import ServeConfig
from transferkit.serve.inputs import READERS, media_type, read_body
from transferkit.serve.page import PAGE, PAGE_HEADERS
from transferkit.serve.predictor import Predictor
from transferkit.stats.metrics import top_predictions

log = logging.getLogger(__name__)


def create_app(predictor: Predictor, config: ServeConfig | None = None) -> FastAPI:
    """The ASGI application serving `predictor` (run it with uvicorn, or `transferkit.serve.server.run`)."""
    service = Service(predictor, config or ServeConfig())
    app = FastAPI(
        title="transferkit serve",
        version=__version__,
        lifespan=service.lifespan,
        description=f"Classify {predictor.modality}s with {service.info['source']} ({len(predictor.classes)} classes).",
    )
    app.state.info = service.info
    add_error_handlers(app)
    add_routes(app, service)
    return app


class Service:
    """What the routes share: the predictor, how its requests read, the batcher, the preprocessing threads."""

    def __init__(self, predictor: Predictor, config: ServeConfig):
        self.predictor, self.config, self.reader = predictor, config, READERS[predictor.modality]
        self.batcher = Batcher(
            predictor.infer, max_batch=config.max_batch, wait_s=config.batch_wait_ms / 1000, max_queued=config.max_queued
        )
        self.pool = ThreadPoolExecutor(max(1, os.cpu_count() or 1), thread_name_prefix="transferkit-prepare")
        reader = self.reader
        self.info = {
            **predictor.info(),
            "limits": config.to_dict(),
            "server": {"transferkit": __version__},
            "input": {"content_type": reader.content_type, "field": reader.field, "example": reader.example},
        }
        self.started = time.monotonic()

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self.batcher.start()
        # Warm-up: the first pass builds kernels and allocates; no client should pay for it.
        await self.batcher.submit(self.predictor.prepare(self.reader.sample()), self.config.timeout_s)
        engine = self.info["inference"]
        log.info(
            "Serving %d classes from %s: %s on %s, %s; batches of up to %d inputs, waiting %g ms",
            len(self.predictor.classes),
            self.info["source"],
            engine["engine"],
            engine.get("device", "cpu"),
            engine["precision"],
            self.config.max_batch,
            self.config.batch_wait_ms,
        )
        yield
        await self.batcher.stop()  # after uvicorn has answered every request in flight
        self.pool.shutdown(wait=True)

    async def predict(self, request: Request, top_k: int) -> JSONResponse:
        reader, config = self.reader, self.config
        if media_type(request) != reader.content_type:
            raise RequestError(
                f"POST /predict takes {reader.content_type} for this {reader.modality} model; got "
                f"'{media_type(request) or 'no content type'}'. Example: {reader.example}",
                415,
            )
        with self.batcher.expect():
            body = await read_body(request, config)
            raw = await reader.read(request, body, config)
            names, items = await asyncio.get_running_loop().run_in_executor(self.pool, self.prepare, raw)
        proba = await self.batcher.submit(items, config.timeout_s)
        return JSONResponse({"predictions": top_predictions(names, proba, self.predictor.classes, top_k, reader.key)})

    def prepare(self, raw) -> tuple[list[str], list]:
        """In a preprocessing thread: decode (images checked as the scanner checks them), then the model's inputs."""
        names, inputs = self.reader.decode(raw, self.config)
        return names, self.predictor.prepare(inputs)

    def health(self) -> JSONResponse:
        b = self.batcher
        body = {
            "status": "ok" if b.alive else "stopped",
            "queued": b.queued,
            "batches": b.batches,
            "inputs": b.inputs,
            "uptime_s": round(time.monotonic() - self.started, 1),
        }
        return JSONResponse(body, status_code=200 if b.alive else 503)


def add_routes(app: FastAPI, service: Service) -> None:
    @app.post(
        "/predict",
        summary="Top-k labels with probabilities for each input",
        openapi_extra=request_body(service.reader),
        responses=PREDICT_RESPONSES,
    )
    async def predict(request: Request, top_k: int = Query(1, ge=1, description="Labels per input, most probable first.")) -> JSONResponse:
        return await service.predict(request, top_k)

    @app.get("/healthz", summary="Whether the server answers and its inference loop runs")
    async def healthz() -> JSONResponse:
        return service.health()

    @app.get("/info", summary="The model: classes, backbone, preprocessing, metrics, limits")
    async def info() -> dict:
        return service.info

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE, headers=PAGE_HEADERS)


def add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON with an ``error`` message; nothing a client sends produces a 500."""

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse({"error": str(e), **e.details}, status_code=e.status, headers=headers)

    @app.exception_handler(TransferkitError)
    async def library_error(request: Request, e: TransferkitError) -> JSONResponse:
        # The library refused an input (a text run given image file names, ...): the client's to fix.
        return JSONResponse({"error": str(e)}, status_code=422 if isinstance(e, UsageError) else 400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        return JSONResponse({"error": f"Invalid request: {problems}"}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        where = f" {request.method} {request.url.path}" if e.status_code in (404, 405) else ""
        return JSONResponse(
            {"error": f"{e.detail}:{where}" if where else str(e.detail)}, status_code=e.status_code, headers=getattr(e, "headers", None)
        )

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("Unexpected error answering %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"Internal error ({type(e).__name__}); the server log has the details."}, status_code=500)


def request_body(reader) -> dict:
    """The OpenAPI description of the body this model's /predict takes (read by hand, so declared by hand)."""
    item = {"type": "string", "format": "binary"} if reader.modality == "image" else {"type": "string"}
    schema = {"type": "object", "required": [reader.field], "properties": {reader.field: {"type": "array", "items": item}}}
    return {"requestBody": {"required": True, "content": {reader.content_type: {"schema": schema}}}}


PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "One entry per input, in order",
        "content": {
            "application/json": {
                "example": {"predictions": [{"file": "photo.jpg", "predictions": [{"label": "rose", "probability": 0.93}]}]}
            }
        },
    },
    **{
        status: {"description": what, "content": {"application/json": {"example": {"error": "..."}}}}
        for status, what in (
            (400, "A body that cannot be parsed"),
            (408, "A body that arrived too slowly"),
            (413, "Over a bound: bytes, inputs, pixels, characters"),
            (415, "Wrong content type"),
            (422, "A missing field, or a file that is no usable image"),
            (503, "Busy or stopping: retry"),
        )
    },
}
