"""`transferkit export`, `push` and `serve`: a trained run as files, on the Hub, behind HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from transferkit.cli.common import (
    Device,
    Precision,
    Quiet,
    app,
    given,
    handles_errors,
    show_library_messages,
)
from transferkit.cli.render import (
    out,
    render_export,
    render_int8,
)
from transferkit.errors import UsageError


@app.command()
@handles_errors
def export(
    run: Annotated[Path, typer.Argument(help="A run directory written by fit.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="onnx (opset 18, dynamic batch axis) or torchscript.")] = "onnx",
    out_file: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="File to write (default: RUN/model.onnx, RUN/model.torchscript.pt, or RUN/model.int8.onnx with --int8)."
        ),
    ] = None,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            metavar="",
            help="Also write an int8 ONNX model (ONNX Runtime static "
            "quantization calibrated on the run's validation images), after measuring its test "
            "accuracy and speed against the fp32 one.",
        ),
    ] = False,
    calibration: Annotated[
        str | None,
        typer.Option(metavar="DATA", help="With --int8: calibrate on these labelled images instead of the run's validation split."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", metavar="", help="With --int8: write it even if it loses more than 1 point of test accuracy.")
    ] = False,
) -> None:
    """Export a run's model (fp32) to ONNX or TorchScript, checked to reproduce its outputs, with its preprocessing."""
    from transferkit.distributed import refuse_torchrun
    from transferkit.export.onnx import export_run

    refuse_torchrun("export")
    if (calibration is not None or force) and not int8:
        raise UsageError("--calibration and --force apply to --int8 only: add --int8, or leave them out.")
    if int8:
        if fmt != "onnx":
            raise UsageError(f"--int8 writes an ONNX model; it does not combine with --format {fmt}. Use --format onnx.")
        from transferkit.export.int8 import quantize_run

        render_int8(quantize_run(run, out_file, calibration=calibration, force=force))
        return
    render_export(export_run(run, fmt, out_file))


SERVING = "Serving"


@app.command()
@handles_errors
def push(
    run: Annotated[Path, typer.Argument(help="A run directory written by fit.")],
    repo_id: Annotated[str, typer.Argument(help="The Hub repository, owner/name (created if missing).")],
    private: Annotated[bool, typer.Option("--private", metavar="", help="Create the repository private.")] = False,
    revision: Annotated[str | None, typer.Option(help="Branch to commit to (created if missing; default: main).")] = None,
) -> None:
    """Upload a run (model, config.json, model card, metrics, exports; not checkpoints) to the Hugging Face Hub.

    Uses the token the Hub tools use (HF_TOKEN, or hf auth login); HF_ENDPOINT selects another Hub.
    """
    from transferkit.runs.hub import push_run

    result = push_run(run, repo_id, private=private, revision=revision)
    out.print(f"Pushed {len(result.files)} files ({result.bytes / 1e6:.1f} MB) to {result.url} ({result.revision}): {result.commit_url}")
    source = repo_id if result.revision == "main" else f"{repo_id}@{result.revision}"
    out.print(
        f'Load with timm: timm.create_model("hf-hub:{source}", pretrained=True); fine-tune further with: '
        f"transferkit fit DATA --model hf-hub:{source}"
    )


@app.command()
@handles_errors
def serve(
    run: Annotated[Path, typer.Argument(help="A run directory written by fit, or a .onnx file written by export.")],
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for the network).")
    ] = None,
    port: Annotated[int | None, typer.Option(min=0, max=65535, help="Port (default 8000; 0 takes a free one).")] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Processes, each with its own copy of the model and its share of the cores (default 1).")
    ] = None,
    max_batch: Annotated[
        int | None, typer.Option(min=1, rich_help_panel=SERVING, help="Most inputs per forward pass (default 64); 1 turns batching off.")
    ] = None,
    batch_wait: Annotated[
        float | None,
        typer.Option(
            min=0.0, rich_help_panel=SERVING, help="Milliseconds a batch may wait for requests still arriving to join it (default 5)."
        ),
    ] = None,
    max_inputs: Annotated[
        int | None, typer.Option(min=1, rich_help_panel=SERVING, help="Most images or texts per request (default 64).")
    ] = None,
    max_upload_mb: Annotated[
        float | None, typer.Option(min=0.001, rich_help_panel=SERVING, help="Most MB per request body (default 32).")
    ] = None,
    read_timeout: Annotated[
        float | None, typer.Option(min=0.001, rich_help_panel=SERVING, help="Seconds a request body may take to arrive (default 30).")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(min=0.001, rich_help_panel=SERVING, help="Seconds a request may wait for its answer (default 60).")
    ] = None,
    device: Device = None,
    precision: Precision = None,
    quiet: Quiet = False,
) -> None:
    """Serve a trained run over HTTP: POST /predict, GET /info, /healthz, a page at / and API docs at /docs.

    Ctrl-C or SIGTERM lets the requests in flight finish, then exits.
    """
    from transferkit.serve import require_serve

    require_serve()
    from transferkit.serve.config import ServeConfig
    from transferkit.serve.server import open_socket, url_of
    from transferkit.serve.server import run as run_server

    show_library_messages(quiet)
    config = ServeConfig(
        **given(
            max_batch=max_batch,
            batch_wait_ms=batch_wait,
            max_inputs=max_inputs,
            max_upload_mb=max_upload_mb,
            read_timeout_s=read_timeout,
            timeout_s=timeout,
        )
    )
    sock = open_socket(host, port)  # a taken port fails now, not after the model has loaded
    if workers and workers > 1:  # each process gets its share of the cores, not all of them
        import os

        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

    def ready(info: dict) -> None:
        what = f"{len(info['classes'])} classes" if "classes" in info else f"{info['workers']} workers"
        out.print(
            f"Serving {run} ({what}) at {url_of(sock)}: the page at /, POST /predict, API docs at /docs. Ctrl-C stops.", highlight=False
        )

    run_server(run, sock, config=config, on_ready=ready, **given(workers=workers, device=device, precision=precision))
    out.print("Stopped.")
