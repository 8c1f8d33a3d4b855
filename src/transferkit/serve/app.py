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

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from transferkit import __version__
from transferkit.errors import RequestError, TransferkitError, UsageError
from transferkit.evaluate import top_predictions
from transferkit.serve.batching import Batcher
from transferkit.serve.config import ServeConfig
from transferkit.serve.inputs import READERS, media_type, read_body
from transferkit.serve.page import PAGE, PAGE_HEADERS
from transferkit.serve.predictor import Predictor

log = logging.getLogger(__name__)


def create_app(predictor: Predictor, config: ServeConfig | None = None) -> FastAPI:
    """The ASGI application serving `predictor` (run it with uvicorn, or `transferkit.serve.server.run`)."""
    config = config or ServeConfig()
    reader = READERS[predictor.modality]
    batcher = Batcher(predictor.infer, max_batch=config.max_batch, wait_s=config.batch_wait_ms / 1000,
                      max_queued=config.max_queued)
    pool = ThreadPoolExecutor(max(1, os.cpu_count() or 1), thread_name_prefix="transferkit-prepare")
    info = {**predictor.info(), "input": {"content_type": reader.content_type, "field": reader.field,
                                          "example": reader.example}, "limits": config.to_dict(),
            "server": {"transferkit": __version__}}
    started = time.monotonic()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        await batcher.submit(predictor.prepare(reader.sample()), config.timeout_s)  # warm-up: kernels, allocator
        log.info("Serving %d classes (%s) from %s", len(predictor.classes), info["inference"], info["source"])
        yield
        await batcher.stop()  # after uvicorn has answered every request in flight
        pool.shutdown(wait=True)

    app = FastAPI(title="transferkit serve", version=__version__, lifespan=lifespan,
                  description=f"Classify {predictor.modality}s with {info['source']} "
                              f"({len(predictor.classes)} classes).")
    app.state.info = info
    add_error_handlers(app)

    @app.post("/predict", summary="Top-k labels with probabilities for each input",
              openapi_extra=request_body(reader), responses=PREDICT_RESPONSES)
    async def predict(request: Request, top_k: int = Query(1, ge=1, description="Labels per input, most probable "
                                                                                 "first.")) -> JSONResponse:
        if media_type(request) != reader.content_type:
            raise RequestError(f"POST /predict takes {reader.content_type} for this {predictor.modality} model; got "
                               f"'{media_type(request) or 'no content type'}'. Example: {reader.example}", 415)
        body = await read_body(request, config)
        raw = await reader.read(request, body, config)
        names, items = await asyncio.get_running_loop().run_in_executor(pool, prepare, raw)
        proba = await batcher.submit(items, config.timeout_s)
        return JSONResponse({"predictions": top_predictions(names, proba, predictor.classes, top_k, reader.key)})

    def prepare(raw) -> tuple[list[str], list]:
        names, inputs = reader.decode(raw, config)
        return names, predictor.prepare(inputs)

    @app.get("/healthz", summary="Whether the server answers and its inference loop runs")
    async def healthz() -> JSONResponse:
        body = {"status": "ok" if batcher.alive else "stopped", "queued": batcher.queued, "batches": batcher.batches,
                "inputs": batcher.inputs, "uptime_s": round(time.monotonic() - started, 1)}
        return JSONResponse(body, status_code=200 if batcher.alive else 503)

    @app.get("/info", summary="The model: classes, backbone, preprocessing, metrics, limits")
    async def get_info() -> dict:
        return info

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE, headers=PAGE_HEADERS)

    return app


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
        return JSONResponse({"error": f"{e.detail}:{where}" if where else str(e.detail)}, status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("Unexpected error answering %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"Internal error ({type(e).__name__}); the server log has the details."},
                            status_code=500)


def request_body(reader) -> dict:
    """The OpenAPI description of the body this model's /predict takes (read by hand, so declared by hand)."""
    item = {"type": "string", "format": "binary"} if reader.modality == "image" else {"type": "string"}
    schema = {"type": "object", "required": [reader.field],
              "properties": {reader.field: {"type": "array", "items": item}}}
    return {"requestBody": {"required": True, "content": {reader.content_type: {"schema": schema}}}}


PREDICT_RESPONSES = {
    200: {"description": "One entry per input, in order", "content": {"application/json": {"example": {
        "predictions": [{"file": "photo.jpg", "predictions": [{"label": "rose", "probability": 0.93}]}]}}}},
    **{status: {"description": what, "content": {"application/json": {"example": {"error": "..."}}}}
       for status, what in ((400, "A body that cannot be parsed"), (408, "A body that arrived too slowly"),
                            (413, "Over a bound: bytes, inputs, pixels, characters"), (415, "Wrong content type"),
                            (422, "A missing field, or a file that is no usable image"),
                            (503, "Busy or stopping: retry"))},
}
