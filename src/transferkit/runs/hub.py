"""Push a run directory to the Hugging Face Hub, where plain timm and transferkit load it back.

``push_run`` uploads what a user of the model needs (model, timm's config.json, the
model card, transferkit.json, metrics and report, exports if present) with
huggingface_hub's ``HfApi`` and the token the Hub tools already use (``HF_TOKEN``,
else the one ``hf auth login`` saved); checkpoints, experiment logs and caches stay
local. ``HF_ENDPOINT`` points it at another Hub, as it does huggingface_hub itself.

Example:
    >>> result = push_run("runs/plants", "your-name/plants")       # doctest: +SKIP
    >>> result.url
    'https://huggingface.co/your-name/plants'

Afterwards ``timm.create_model("hf-hub:your-name/plants", pretrained=True)`` is the
trained model, and ``transferkit fit DATA --model hf-hub:your-name/plants`` starts
from it.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from pathlib import Path

from transferkit.errors import RunError, UsageError
from transferkit.runs.directory import META_FILE, read_meta
from transferkit.runs.hubfiles import CARD_FILE, CONFIG_FILE
from transferkit.runs.meta import RunMeta

# What a repository of a run holds (fnmatch patterns on paths inside the run; '*' crosses folders).
UPLOADED = (
    META_FILE,
    CONFIG_FILE,
    CARD_FILE,
    "model.safetensors",
    "metrics.json",
    "history.csv",
    "report.html",
    "*.png",
    "adapter/*",
    "encoder/*",
    "head.safetensors",
    "*.onnx",
    "*.onnx.json",
    "*.torchscript.pt",
    "*.torchscript.pt.json",
)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushResult:
    """Where a run went: the repository, the revision, the commit and the files uploaded."""

    repo_id: str
    url: str
    revision: str
    commit_url: str
    files: tuple[str, ...]
    bytes: int


def files_to_upload(run_dir: Path) -> list[str]:
    """The run's files a Hub repository gets (UPLOADED), as paths relative to the run, sorted."""
    found = []
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(run_dir).as_posix()
        if not rel.startswith(".") and any(fnmatch.fnmatch(rel, pattern) for pattern in UPLOADED):
            found.append(rel)
    return found


def push_run(
    run_dir: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None, token: str | None = None
) -> PushResult:
    """Upload a run directory to the Hub repository `repo_id` (created if missing) in one commit.

    Args:
        run_dir: a run directory written by ``fit`` (with config.json and README.md).
        repo_id: ``owner/name`` on the Hub.
        private: create the repository private (an existing repository keeps its visibility).
        revision: the branch to commit to (created from the default branch if missing); None: the default branch.
        token: a Hub token; None takes the one huggingface_hub finds (``HF_TOKEN``, ``hf auth login``).

    Raises:
        RunError: not a finished run, or one written before runs had a model card; the Hub refused the upload.
        UsageError: a malformed repository id, or no token.
    """
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    _check_hub_layout(run_dir, meta)
    _check_repo_id(repo_id)
    from huggingface_hub import HfApi, constants, get_token

    token = token or get_token()
    if not token:
        raise UsageError(
            "push needs a Hugging Face token with write access: run `hf auth login`, or set HF_TOKEN "
            "(create one at https://huggingface.co/settings/tokens)."
        )
    files = files_to_upload(run_dir)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != constants.DEFAULT_REVISION:
            api.create_branch(url.repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=url.repo_id,
            folder_path=run_dir,
            allow_patterns=list(UPLOADED),
            revision=revision,
            commit_message=f"transferkit run {run_dir.name} ({meta.strategy.spec})",
        )
    except Exception as e:  # huggingface_hub's HTTP errors, httpx's connection errors, ValueError for bad metadata
        raise _push_failure(repo_id, constants.ENDPOINT, e) from e
    size = sum((run_dir / f).stat().st_size for f in files)
    log.info("Pushed %d files (%.1f MB) of %s to %s.", len(files), size / 1e6, run_dir, url)
    return PushResult(url.repo_id, str(url), revision or constants.DEFAULT_REVISION, commit.commit_url, tuple(files), size)


def _check_hub_layout(run_dir: Path, meta: RunMeta) -> None:
    needed = [CARD_FILE] + ([CONFIG_FILE] if meta.modality == "image" else [])
    missing = [f for f in needed if not (run_dir / f).is_file()]
    if missing:
        raise RunError(
            f"{run_dir} has no {' or '.join(missing)}: it was written by a transferkit without the Hub "
            "layout. Fit it again (transferkit fit ... --out "
            f"{run_dir}) to push it."
        )


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(
            f"REPO_ID '{repo_id}' is not a Hub repository id ({str(e).splitlines()[0][:200]}). Give owner/name, e.g. your-name/plants."
        ) from e
    if "/" not in repo_id:
        raise UsageError(f"REPO_ID '{repo_id}' has no owner. Give owner/name, e.g. your-name/{repo_id}.")


def _push_failure(repo_id: str, endpoint: str, error: Exception) -> RunError:
    status = getattr(getattr(error, "response", None), "status_code", None)
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    fixes = {
        401: "The token was refused: log in again with `hf auth login` or set a valid HF_TOKEN.",
        403: f"The token may not write to {repo_id}: use a token with write access to its owner.",
    }
    fix = fixes.get(status) if isinstance(status, int) else None
    fix = fix or f"Check the connection to {endpoint} (HF_ENDPOINT) and try again."
    return RunError(f"Pushing to {repo_id} at {endpoint} failed ({type(error).__name__}{f' {status}' if status else ''}: {reason}). {fix}")
