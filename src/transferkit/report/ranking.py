"""The backbone ranking as people read it: table rows, sentences, the accuracy-vs-latency chart with its Pareto front."""

from __future__ import annotations

from transferkit.compare.ranking import Ranking
from transferkit.report.plots import new_figure, png_base64
from transferkit.stats.wording import format_interval

RANK_COLUMNS = (
    "rank",
    "backbone",
    "probe acc, k-fold train+val (95% CI)",
    "vs best (points, 95% CI)",
    "LogME",
    "test acc (95% CI)",
    "params",
    "GFLOPs",
    "ms/example b1",
    "ms/example b32",
    "feature dim",
    "extraction",
    "peak memory +",
)


def ranking_rows(r: Ranking) -> list[list[str]]:
    """The ranking as strings, best first (RANK_COLUMNS)."""
    rows = []
    for i, s in enumerate(r.scores, 1):
        d, c = s.against_best, s.costs
        gap = (
            "best"
            if d is None
            else (f"{d.difference * 100:+.1f} ({d.low * 100:.1f} to {d.high * 100:.1f})" + ("" if d.significant else ", within noise"))
        )
        test = format_interval(s.test_accuracy, s.test_low, s.test_high)
        rows.append(
            [
                str(i),
                s.model + (" *" if s.model == r.recommended else ""),
                format_interval(s.cv["accuracy"], s.cv["low"], s.cv["high"]),
                gap,
                f"{s.logme:.3f}",
                test,
                f"{c.params / 1e6:.1f}M",
                "-" if c.gflops is None else f"{c.gflops:.3f}",
                f"{c.latency_ms_batch1:.2f}",
                f"{c.latency_ms_batch32:.2f}",
                str(c.feature_dim),
                f"{c.extraction_seconds:.1f} s ({c.extraction})",
                f"{c.peak_memory_mib:.0f} MiB",
            ]
        )
    return rows


def agreement_sentence(r: Ranking) -> str:
    """How LogME's order agrees with the probe's, in words."""
    if r.agreement is None:
        return "LogME vs the probe: no rank agreement to compute (one of them ranks every backbone the same)."
    a = r.agreement
    return (
        f"LogME vs the cross-validated probe: Kendall's tau = {a.tau:+.2f} over {a.n} backbones (p = {a.p_value:.2g}; "
        "+1: the same order, -1: reversed)."
    )


def method_note(r: Ranking) -> str:
    s = r.best
    return (
        f"Ranked by the linear probe's stratified {s.cv['k']}-fold accuracy on the {s.cv['n']} train+val examples "
        "(validation evidence; test accuracy is shown beside it, not used). vs best: the paired bootstrap 95% interval "
        "on the same out-of-fold predictions. Latency: median per example through the forward pass predict runs "
        f"({s.costs.engine}); GFLOPs: torch's flop counter, 2 per multiply-add. * recommended. Pareto front "
        f"(no other backbone both more accurate and faster at batch 1): {', '.join(r.front)}."
    )


def plot_pareto(r: Ranking) -> str:
    """Probe accuracy (with its interval) against batch-1 latency; the Pareto front joined, the recommendation ringed."""
    fig, ax = new_figure()
    for s in r.scores:
        acc, c = s.cv["accuracy"] * 100, s.costs
        err = [[acc - s.cv["low"] * 100], [s.cv["high"] * 100 - acc]]
        ax.errorbar(
            c.latency_ms_batch1, acc, yerr=err, fmt="o", capsize=4, markersize=7, color="#1f77b4" if s.model in r.front else "#999999"
        )
        ax.annotate(s.model, (c.latency_ms_batch1, acc), textcoords="offset points", xytext=(5, 5), parse_math=False)
    front = sorted((s for s in r.scores if s.model in r.front), key=lambda s: s.costs.latency_ms_batch1)
    ax.plot(
        [s.costs.latency_ms_batch1 for s in front],
        [s.cv["accuracy"] * 100 for s in front],
        color="#1f77b4",
        linestyle="--",
        label="Pareto front",
    )
    chosen = next(s for s in r.scores if s.model == r.recommended)
    ax.scatter(
        [chosen.costs.latency_ms_batch1],
        [chosen.cv["accuracy"] * 100],
        s=260,
        facecolors="none",
        edgecolors="#2ca02c",
        linewidths=2,
        label=f"recommended: {chosen.model}",
    )
    ax.set_xlabel(f"latency per example at batch 1 (ms, {chosen.costs.engine})")
    ax.set_ylabel("probe accuracy, k-fold on train+val (%); bars: 95% CI")
    ax.set_title("Backbones: accuracy vs latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_base64(fig)


def ranking_context(r: Ranking | None) -> dict | None:
    """What the comparison page's backbone section shows (None without a ranking)."""
    if r is None:
        return None
    return {
        "columns": RANK_COLUMNS,
        "rows": ranking_rows(r),
        "reason": r.reason,
        "agreement": agreement_sentence(r),
        "note": method_note(r),
        "png": plot_pareto(r),
    }


def ranking_markdown(r: Ranking) -> list[str]:
    """The backbone section of report.md."""
    lines = ["## Backbones", "", f"**{r.reason}**", "", "| " + " | ".join(RANK_COLUMNS) + " |", "|" + "---|" * len(RANK_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in ranking_rows(r)]
    return [*lines, "", agreement_sentence(r), "", method_note(r), ""]
