"""Reading a request: its body within the size and time bounds, then images (multipart) or texts (JSON).

Every way a request can be wrong is a :class:`~transferkit.errors.RequestError` carrying its status and a
message naming the problem: 400 a body that cannot be parsed, 408 a body that arrives too slowly, 413 over a
bound (bytes, inputs, pixels, characters), 415 the wrong content type, 422 a missing or malformed field or a
file that is no usable image (with the data scanner's reasons: empty, truncated, unreadable).
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Sequence
from typing import Any, Protocol

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from transferkit.errors import DataError, RequestError
from transferkit.serve.config import ServeConfig

MAX_FIELDS = 16  # non-file parts of a multipart body: none is read, so a few are tolerated
WHY = {
    "empty": "is empty (0 bytes)",
    "truncated": "is a truncated image: its data ends early",
    "unreadable": "is not an image this server can decode (JPEG, PNG, WebP, BMP, GIF, TIFF, ...)",
}


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, config: ServeConfig) -> bytes:
    """The whole body, refused (413) past `max_upload_bytes` and (408) when slower than `read_timeout_s`."""
    limit = config.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(
            f"The request body is {int(declared):,} bytes; this server takes at most {limit:,} "
            "per request. Send fewer or smaller files per request.",
            413,
        )
    chunks, size = [], 0

    async def receive() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(
                    f"The request body exceeds {limit:,} bytes, the most this server takes per "
                    "request. Send fewer or smaller files per request.",
                    413,
                )
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive(), config.read_timeout_s)
    except asyncio.TimeoutError as e:
        raise RequestError(f"The request body did not arrive within {config.read_timeout_s:g} s.", 408) from e
    except ClientDisconnect as e:
        raise RequestError("The client disconnected before the request body was complete.", 400) from e
    return b"".join(chunks)


def replayed(request: Request, body: bytes) -> Request:
    """The same request with its body already read, for starlette's multipart parser."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        return messages.pop() if messages else {"type": "http.disconnect"}

    return Request(request.scope, receive)


class ImageRequests:
    """Image models: ``multipart/form-data`` with one or more parts named ``files``."""

    modality, content_type, field, key = "image", "multipart/form-data", "files", "file"
    example = "curl -F files=@photo.jpg http://HOST/predict"

    async def read(self, request: Request, body: bytes, config: ServeConfig) -> list[tuple[str, bytes]]:
        """(file name, bytes) per uploaded file."""
        try:
            form = await replayed(request, body).form(max_files=config.max_inputs, max_fields=MAX_FIELDS)
        except HTTPException as e:  # starlette's MultiPartException, re-raised inside an app
            if "Too many files" in str(e.detail):
                raise RequestError(
                    f"Too many files: this server takes at most {config.max_inputs} per request. Split them over several requests.", 413
                ) from e
            if "Too many fields" in str(e.detail):
                raise RequestError(f"Too many form fields: at most {MAX_FIELDS} besides the files.", 413) from e
            raise RequestError(f"The multipart body cannot be parsed: {e.detail}", 400) from e
        except Exception as e:  # python-multipart's own parse errors on malformed bodies
            raise RequestError(f"The multipart body cannot be parsed: {e}", 400) from e
        try:
            return await self._files(form)
        finally:
            await form.close()

    async def _files(self, form) -> list[tuple[str, bytes]]:
        values = form.getlist(self.field)
        if not values:
            got = ", ".join(sorted(set(form.keys()))) or "none"
            raise RequestError(
                f"The multipart body has no field '{self.field}' (fields sent: {got}). Send the images "
                f"as file parts named '{self.field}', e.g. {self.example}",
                422,
            )
        texts = [v for v in values if not isinstance(v, UploadFile)]
        if texts:
            raise RequestError(f"Field '{self.field}' holds text, not files: send each image as a file part (e.g. {self.example}).", 422)
        return [(v.filename or f"file {i + 1}", await v.read()) for i, v in enumerate(values)]

    def decode(self, raw: Sequence[tuple[str, bytes]], config: ServeConfig) -> tuple[list[str], list]:
        """Names and decoded RGB images; each file checked as the data scanner checks it, before decoding."""
        return [name for name, _ in raw], [decode_image(name, data, config.max_pixels) for name, data in raw]

    def sample(self) -> list:
        from PIL import Image

        return [Image.new("RGB", (64, 64), (128, 128, 128))]


def decode_image(name: str, data: bytes, max_pixels: int):
    """An uploaded file as an RGB PIL image (EXIF orientation applied), as `open_image` decodes a file."""
    from transferkit.data.images import image_problem, open_image

    problem = image_problem(data, max_pixels)
    if problem == "too large":
        raise RequestError(
            f"{name} declares more than {max_pixels:,} pixels, the most this server decodes (a "
            "decompression-bomb guard). Send a smaller image.",
            413,
            file=name,
            reason=problem,
        )
    if problem is not None:
        raise RequestError(f"{name} {WHY.get(problem, 'cannot be decoded')}.", 422, file=name, reason=problem)
    try:
        return open_image(io.BytesIO(data))
    except DataError as e:
        raise RequestError(f"{name} {WHY['unreadable']}.", 422, file=name, reason="unreadable") from e


class TextRequests:
    """Text models: ``application/json`` of the form ``{"texts": ["...", ...]}``."""

    modality, content_type, field, key = "text", "application/json", "texts", "text"
    example = "curl -H 'content-type: application/json' -d '{\"texts\": [\"a text\"]}' http://HOST/predict"

    async def read(self, request: Request, body: bytes, config: ServeConfig) -> list[str]:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise RequestError(f'The body is not valid JSON ({str(e)[:120]}). Send {{"texts": ["..."]}}.', 400) from e
        texts = data.get(self.field) if isinstance(data, dict) else None
        if texts is None:
            raise RequestError(f'The JSON body has no field \'{self.field}\'. Send {{"texts": ["...", ...]}}.', 422)
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise RequestError(
                f"'{self.field}' must be a list of strings; got {type(texts).__name__}"
                f"{'' if not isinstance(texts, list) else ' with non-string items'}.",
                422,
            )
        if not texts:
            raise RequestError(f"'{self.field}' is empty: give at least one text.", 422)
        if len(texts) > config.max_inputs:
            raise RequestError(
                f"Too many texts ({len(texts)}): this server takes at most {config.max_inputs} per "
                "request. Split them over several requests.",
                413,
            )
        for i, t in enumerate(texts):
            if len(t) > config.max_text_chars:
                raise RequestError(
                    f"Text {i + 1} has {len(t):,} characters; at most {config.max_text_chars:,} are "
                    "taken (a model reads only its first tokens anyway).",
                    413,
                )
            if not t.strip():
                raise RequestError(f"Text {i + 1} is blank.", 422)
        return texts

    def decode(self, raw: list[str], config: ServeConfig) -> tuple[list[str], list[str]]:
        return raw, raw

    def sample(self) -> list[str]:
        return ["warm-up"]


class RequestReader(Protocol):
    """How a request becomes model inputs for one modality: what to send, how it is read, decoded and named."""

    modality: str
    content_type: str
    field: str
    key: str
    example: str

    async def read(self, request: Request, body: bytes, config: ServeConfig) -> Any: ...

    def decode(self, raw: Any, config: ServeConfig) -> tuple[list[str], list]: ...

    def sample(self) -> list: ...


READERS: dict[str, RequestReader] = {"image": ImageRequests(), "text": TextRequests()}
