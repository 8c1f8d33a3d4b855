"""What the CLI prints: its two consoles, the tables and the result of each command, in rich markup.

Kept apart from :mod:`transferkit.cli.app` (options and commands) so each stays one screenful of concerns.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

# Pipes and CI logs get a wide fixed width so tables are not squeezed into 80 columns.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)


def wrapping_table(*columns: str, title: str | None = None) -> Table:
    """A table whose cells wrap (fold) instead of being cut to '…' when the terminal is narrow (80 columns)."""
    table = Table(title=title)
    for name in columns:
        table.add_column(name, overflow="fold")
    return table


def say_how_to_continue(out_dir: Path, resume: bool) -> None:
    """After Ctrl-C: the command that continues (one shell-quoted line) when a checkpoint exists, else what rerunning does."""
    from transferkit.training.checkpoints import checkpoint_position

    if (out_dir / "checkpoints" / "last.pt").is_file():
        again = shlex.join(["transferkit", *sys.argv[1:], *([] if resume else ["--resume"])])
        where = checkpoint_position(_read_json(out_dir / "checkpoints" / "last.json"))
        err.print(f"[yellow]Interrupted.[/] The fit is saved in {out_dir / 'checkpoints'} ({where}). Continue with:", highlight=False)
        err.print(again, markup=False, highlight=False, soft_wrap=True, overflow="ignore", crop=False)
    else:
        err.print(
            "[yellow]Interrupted[/] before the first epoch finished, so there is no checkpoint to resume. Run the "
            "same command again: features already computed are kept in the feature cache.",
            highlight=False,
        )


def say_what_compare_kept(out_dir: Path) -> None:
    """After Ctrl-C in compare: what finished and was written, and the command that continues."""
    saved = _read_json(out_dir / "compare.json")
    results = saved.get("results") or []
    if not results:
        err.print("[yellow]Interrupted[/] before the first strategy finished: nothing was kept.", highlight=False)
        return
    done = ", ".join(f"{r['label']} ({len(r.get('runs') or [])} seed(s))" for r in results)
    err.print(
        f"[yellow]Interrupted.[/] Kept what finished: {done}, in {out_dir / 'compare.json'} and {out_dir / 'report.html'}. "
        f"Still to run: {', '.join(saved.get('pending') or []) or 'the ranking and reports'}. Continue with:",
        highlight=False,
    )
    again = shlex.join(["transferkit", *sys.argv[1:], *([] if "--resume" in sys.argv else ["--resume"])])
    err.print(again, markup=False, highlight=False, soft_wrap=True, overflow="ignore", crop=False)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def render_fit(clf, out_dir: Path) -> None:
    from transferkit.report.comparison import imbalance_hint, scores_sentence

    test, sizes = clf.metrics_["test"], clf.metrics_["split_sizes"]
    out.print(f"Data: {sizes['train']} train / {sizes['val']} val / {sizes['test']} test {clf.modality}s, {len(clf.classes_)} classes")
    if clf.feature_cache_:
        states = {k: v for k, v in clf.feature_cache_.items() if k != "engine"}
        engine = f" ({clf.feature_cache_['engine']})" if "engine" in clf.feature_cache_ else ""
        out.print("Feature cache: " + ", ".join(f"{k} {v}" for k, v in states.items()) + engine)
    choice = getattr(clf, "backbone_choice_", None)
    if choice:
        out.print(f"Backbone [bold]{choice['chosen']}[/]: {choice['reason']}", highlight=False)
    if clf.decision_:
        out.print(f"auto chose [bold]{clf.decision_.strategy.spec}[/]: {clf.decision_.reason}")
    out.print(
        f"Strategy {clf.strategy_.spec}: test {scores_sentence(test, clf.modality + 's')}; val accuracy "
        f"{clf.metrics_['val_accuracy']:.4f}; {clf.metrics_['train_seconds']:.1f} s",
        highlight=False,
    )
    calibration = clf.metrics_.get("calibration")
    if calibration:
        out.print(
            f"Calibrated: temperature {calibration['temperature']:.3f} (from validation), folded into the head; "
            f"test ECE {calibration.get('test_ece_before', 0):.3f} -> {calibration.get('test_ece_after', 0):.3f}",
            highlight=False,
        )
    hint = imbalance_hint(clf.data_summary_.get("train_class_counts", []))
    if hint:
        err.print(f"[yellow]{hint}[/]", highlight=False)
    what = "TEXT... or --file LINES.txt" if clf.modality == "text" else "IMAGE..."
    out.print(f"Run saved to {out_dir}. Predict with: transferkit predict {out_dir} {what}")


def shown_path(path: str) -> str:
    """A path as typed, or relative to the working folder when it lies under it: the part that tells files apart."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def render_comparison(c) -> None:
    from transferkit.report.comparison import COLUMNS, imbalance_hint, pretraining_sentence, table_note, table_rows
    from transferkit.stats.wording import format_interval

    if c.ranking:
        render_ranking(c.ranking)
    table = wrapping_table(*COLUMNS, title="transfer learning vs fine-tuning")
    winner = c.winner()
    for r, row in zip(c.results, table_rows(c.results)):
        table.add_row(*row, style="bold green" if r is winner else None)
    out.print(table)
    out.print(table_note(c.seeds), style="dim")
    if c.cv:
        out.print(
            f"Cross-validated probe ({c.cv['k']}-fold on train+val, {c.cv['n']} {c.noun}): "
            f"{format_interval(c.cv['accuracy'], c.cv['low'], c.cv['high'])}, folds {c.cv['fold_mean']:.1%} ± "
            f"{c.cv['fold_sd']:.1%}",
            highlight=False,
        )
    out.print(f"[bold]{c.verdict()}[/]", highlight=False)
    hint = imbalance_hint(c.train_class_counts)
    if hint:
        err.print(f"[yellow]{hint}[/]", highlight=False)
    if c.curve:
        out.print(c.crossover())
    if c.baseline:
        out.print(pretraining_sentence(c))


def render_ranking(r) -> None:
    from transferkit.report.ranking import RANK_COLUMNS, agreement_sentence, method_note, ranking_rows

    table = wrapping_table(*RANK_COLUMNS, title="which backbone? (best first by the cross-validated probe)")
    for row in ranking_rows(r):
        table.add_row(*row, style="bold green" if row[1].endswith(" *") else None)
    out.print(table)
    out.print(method_note(r), style="dim", highlight=False)
    out.print(agreement_sentence(r), highlight=False)
    out.print(f"[bold]{r.reason}[/]", highlight=False)


def render_export(result) -> None:
    parity = ", ".join(f"batch {n} {d:.2e}" for n, d in result.parity.items())
    out.print(f"Exported {result.format} with {result.method} to {result.path} ({result.seconds:.1f} s)")
    out.print(f"Parity with PyTorch, max |logit difference|: {parity} (tolerance {result.tolerance:.0e})")
    out.print(f"Preprocessing and classes: {result.preprocess_path}")
    if result.format == "onnx":
        out.print(f"Predict with: transferkit predict {result.path} IMAGE...")


def render_int8(r) -> None:
    out.print(f"int8 by {r.method}, calibrated on {r.calibration}")
    out.print(
        f"Test accuracy (n = {r.n_test}): fp32 {r.fp32_accuracy:.4f}, int8 {r.int8_accuracy:.4f} "
        f"({100 * (r.int8_accuracy - r.fp32_accuracy):+.2f} points)"
    )
    out.print(
        f"Speed, batch of {r.timing_batch} in this process: fp32 {r.fp32_ms:.2f} ms/image, int8 {r.int8_ms:.2f} "
        f"ms/image: int8 {round(r.speed_ratio, 3):.2f}x the fp32 speed"
    )
    if r.forced and r.drop_points > 1:
        err.print(f"[yellow]Written although int8 loses {r.drop_points:.1f} points (--force).[/]", highlight=False)
    out.print(f"Wrote {r.path} (fp32: {r.fp32_path}). Predict with: transferkit predict {r.path} IMAGE...")


def render_models(found: dict[str, list[str]], builtin: dict, builtin_text: dict) -> None:
    """`transferkit models`: each non-empty section (built-in image, built-in text, timm) with its names."""
    if found["builtin"]:
        out.print("[bold]Built-in image backbones (offline weights):[/]")
        for name in found["builtin"]:
            out.print(f"  {name}  {builtin[name].description}")
    if found["builtin_text"]:
        out.print("[bold]Built-in text backbones (offline weights; any transformers encoder on the hub works too):[/]")
        for name in found["builtin_text"]:
            out.print(f"  {name}  {builtin_text[name].description}")
    names = found["timm"]
    if names:
        out.print(f"[bold]timm architectures ({len(names)}; weights download from the hub):[/]")
        out.print("  " + "  ".join(names[:200]) + (" ..." if len(names) > 200 else ""), soft_wrap=False)


def render_no_models(filter: str, every_name: list[str]) -> None:
    """The line for a filter that matches no backbone, with the closest names."""
    from transferkit.errors import did_you_mean

    near = did_you_mean(filter.strip("*?[]").lower(), every_name)
    out.print(f"No backbone matches '{filter}'.{near} List them all with: transferkit models", highlight=False)


def render_recommended(rows: list[dict]) -> None:
    """The curated hub backbones (transferkit.backbones.recommended): numbers, then where each comes from."""
    from transferkit.backbones.recommended import LICENCE_SOURCE, PARAMS_SOURCE

    table = wrapping_table("model (--model)", "params", "ImageNet top-1", "pretraining data", "licence", "top-1 source")
    sources = list(dict.fromkeys(r["top1_source"] for r in rows))
    for r in rows:
        table.add_row(
            r["name"],
            f"{r['params'] / 1e6:.1f}M",
            f"{r['top1']:.1f}% @ {r['top1_px']} px",
            r["pretraining"],
            r["licence"],
            f"[{sources.index(r['top1_source']) + 1}]",
        )
    out.print("[bold]Hub backbones known to transfer well[/] (weights download on first use; nothing is downloaded now):")
    out.print(table)
    for i, source in enumerate(sources, 1):
        out.print(f"[{i}] {source}", markup=False, highlight=False)
    out.print(f"params: {PARAMS_SOURCE}; licence: {LICENCE_SOURCE}.", highlight=False)
