"""The comparison verdict names a winner only on evidence: fixtures built to differ by noise or by a lot."""

import numpy as np
import pytest

from transferkit.compare.results import Comparison, StrategyResult
from transferkit.report.comparison import comparison_markdown, table_rows
from transferkit.stats.paired import paired_difference

N = 268  # the digits demo's test images


def _result(strategy: str, right: list[np.ndarray], seconds: float) -> StrategyResult:
    """A strategy whose seeds got the examples marked True right (true label 0, predicted 0 when right, else 1)."""
    runs = [
        {
            "seed": i,
            "test_accuracy": float(r.mean()),
            "val_accuracy": float(r.mean()),
            "seconds": seconds,
            "predictions": {"id": [f"img{j}" for j in range(N)], "true": [0] * N, "pred": (~r).astype(int).tolist(), "prob": [0.9] * N},
        }
        for i, r in enumerate(right)
    ]
    acc = float(np.mean([r.mean() for r in right]))
    return StrategyResult(
        strategy=strategy,
        label=strategy,
        trainable_params=1000,
        total_params=10_000,
        epochs=0 if strategy == "feature-extraction" else 5,
        seconds=seconds,
        peak_memory_mib=10.0,
        val_accuracy=acc,
        test_accuracy=acc,
        macro_f1=acc,
        train_per_class=20.0,
        metrics={"predictions": runs[0]["predictions"]},
        runs=runs,
    )


def _comparison(*results: StrategyResult, seeds: int = 1) -> Comparison:
    return Comparison(data="fixture", model="m", seed=0, results=list(results), seeds=seeds, split_sizes={"test": N})


def _right(n_right: int, extra: int = 0) -> np.ndarray:
    r = np.zeros(N, bool)
    r[: n_right + extra] = True
    return r


def test_two_examples_apart_is_no_measurable_difference_and_the_cheapest_is_recommended():
    c = _comparison(_result("feature-extraction", [_right(250)], 1.0), _result("lp-ft", [_right(250, 2)], 40.0))
    text = c.verdict()
    assert text.startswith("No measurable difference on 268 test examples between lp-ft (94.0%) and feature-extraction")
    assert "+0.7 points" in text and "includes 0" in text
    assert "The cheapest within noise is feature-extraction (93.3%), 1/40 of the training time of lp-ft: choose it." in text
    assert "differences inside these intervals are noise" in text  # one seed: said out loud
    (row,) = c.paired()
    reference = paired_difference(_right(250, 2), _right(250))
    assert row["difference"] == reference.difference and (row["low"], row["high"]) == (reference.low, reference.high)
    assert row["mcnemar_p"] == reference.mcnemar_p == 0.5 and not row["significant"]


def test_a_strong_difference_names_the_winner_with_its_interval():
    c = _comparison(_result("feature-extraction", [_right(200)], 1.0), _result("lp-ft", [_right(200, 40)], 9.5))
    text = c.verdict()
    assert text.startswith("lp-ft is the most accurate (89.6%), measurably ahead of every other strategy on 268 test")
    assert "+14.9 points (95% CI" in text and "over the runner-up feature-extraction" in text
    assert "9.5x slower to train than feature-extraction" in text and "0.0x" not in text
    assert c.paired()[0]["significant"] and c.paired()[0]["low"] > 0


def test_the_same_strategy_with_two_seeds_is_noise_and_the_table_shows_the_spread():
    rng = np.random.default_rng(0)
    base = rng.random(N) < 0.9
    flip = base.copy()
    flip[rng.choice(N, 3, replace=False)] ^= True  # another seed: 3 examples change
    a = _result("finetune:all", [base, flip], 30.0)
    b = _result("finetune:last=2", [flip, base], 10.0)
    b.test_accuracy += 1e-9  # b reads as the best by a hair
    c = _comparison(a, b, seeds=2)
    assert "No measurable difference" in c.verdict() and "--seeds 3" not in c.verdict()
    rows = table_rows(c.results)
    spread = a.spread("test_accuracy")
    assert spread["seeds"] == 2 and spread["sd"] > 0
    assert f"{spread['mean']:.4f} ± {spread['sd']:.4f} ({spread['min']:.4f}-{spread['max']:.4f})" in rows[0]
    assert "## Paired differences against finetune:last=2" in comparison_markdown(c)


@pytest.mark.parametrize(
    ("seconds", "phrase"),
    [
        ((1.0, 40.0), "1/40 of the training time of b"),
        ((19.0, 2.0), "9.5x slower to train than b"),
        ((2.0, 2.02), "about the same training time as b"),
    ],
)
def test_costs_read_right(seconds, phrase):
    from transferkit.compare.verdict import cost_phrase

    a, b = (_result(name, [_right(200)], s) for name, s in zip("ab", seconds))
    assert cost_phrase(a, b) == phrase


def test_a_winner_whose_interval_starts_just_above_zero_never_prints_a_zero_end():
    """A significant difference whose lower end rounds to 0.0 shows more digits: "0.0-2.1" read as "includes 0"."""
    from transferkit.compare.verdict import _points
    from transferkit.stats.paired import PairedDifference

    d = PairedDifference(
        n=268,
        accuracy_a=0.994,
        accuracy_b=0.984,
        difference=0.0104,
        low=0.0004,
        high=0.021,
        mcnemar_p=0.016,
        only_a_correct=4,
        only_b_correct=0,
    )
    assert "(95% CI 0.04-2.1;" in _points(d)
    assert "(95% CI 0.0-" not in _points(d)


def test_several_seeds_average_balanced_accuracy_and_say_how_the_table_summarises():
    from transferkit.report.comparison import table_note

    a = _result("finetune:all", [_right(250), _right(260)], 30.0)
    for run, value in zip(a.runs, (0.90, 0.96)):
        run["balanced_accuracy"] = value
    assert table_rows([a])[0][8] == "0.9300"
    assert "mean ± sd (min-max) over the seeds" in table_note(2) and "seeds" not in table_note(1)
