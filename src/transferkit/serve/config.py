"""What the server batches and what it accepts: every bound a request can hit, checked where it is set."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from transferkit.errors import UsageError

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000  # loopback: serving to the network is a choice (--host 0.0.0.0)
PIL_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own decompression-bomb limit, the one the data scanner applies


@dataclass(frozen=True)
class ServeConfig:
    """How `transferkit serve` batches inference and bounds requests.

    Args:
        max_batch: most inputs in one forward pass. Requests arriving together share a pass up to this many
            inputs; a larger request runs alone. 64 is `predict`'s batch, so one request of up to 64 inputs is
            computed exactly as ``transferkit predict`` computes the same inputs.
        batch_wait_ms: how long (ms) a batch may wait, from its oldest request's arrival, for requests that are
            still arriving (being read or decoded) to join it; it never waits when none is. 0 batches only what
            is already waiting when the inference thread is free.
        max_inputs: most images (or texts) in one request; more is answered 413.
        max_upload_mb: most bytes in one request body, in MB (10^6 bytes); more is answered 413.
        max_pixels: most pixels an image may declare in its header (width x height), checked before it is
            decoded (a decompression bomb is refused); default PIL's limit, as the data scanner uses.
        max_text_chars: most characters in one text.
        read_timeout_s: seconds a request body may take to arrive (slow clients get 408).
        timeout_s: seconds a request may wait for its answer once read (an overloaded server answers 503).
        max_queued: most inputs waiting for inference; requests beyond are answered 503 at once.
    """

    max_batch: int = 64
    batch_wait_ms: float = 5.0
    max_inputs: int = 64
    max_upload_mb: float = 32.0
    max_pixels: int = PIL_MAX_IMAGE_PIXELS
    max_text_chars: int = 20_000
    read_timeout_s: float = 30.0
    timeout_s: float = 60.0
    max_queued: int = 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            whole = f.type == "int"
            if isinstance(value, bool) or not isinstance(value, int if whole else int | float) or not math.isfinite(value):
                raise UsageError(f"{f.name} must be {'an integer' if whole else 'a number'}; got {value!r}.")
            if value < 0 or (value == 0 and f.name != "batch_wait_ms"):
                raise UsageError(f"{f.name} must be {'>= 0' if f.name == 'batch_wait_ms' else '> 0'}; got {value!r}.")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)

    def to_dict(self) -> dict:
        return asdict(self)
