"""Backbone ranking: the fastest within noise of the best is recommended; compare --models on digits, cached, rendered."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from conftest import CHROMIUM_FLAGS, chromium_path, invoke_cli
from transferkit.compare.ranking import BackboneScore, Costs, pareto_front, rank, time_backbones
from transferkit.report.ranking import ranking_rows
from transferkit.stats.crossval import cross_validated_probe
from transferkit.stats.paired import paired_difference

N = 1000


def _score(model: str, n_right: int, latency: float, *, shift: int = 0) -> BackboneScore:
    """A backbone whose out-of-fold predictions get the first n_right examples right (rolled by shift)."""
    right = np.roll(np.arange(N) < n_right, shift)
    costs = Costs(
        params=1_000_000,
        gflops=0.1,
        latency_ms_batch1=latency,
        latency_ms_batch32=latency / 8,
        feature_dim=1280,
        extraction_seconds=1.0,
        extraction="computed",
        peak_memory_mib=10.0,
        engine="torch",
    )
    cv = {"accuracy": right.mean(), "low": right.mean() - 0.02, "high": right.mean() + 0.02, "n": N, "k": 5}
    return BackboneScore(
        model, cv, logme=float(n_right), test_accuracy=right.mean(), test_low=None, test_high=None, costs=costs, oof_correct=right
    )


def test_the_fastest_backbone_within_noise_of_the_best_is_recommended_with_its_evidence():
    big, small, poor = _score("big", 950, 30.0), _score("small", 946, 10.0, shift=30), _score("poor", 850, 5.0)
    r = rank([small, poor, big])
    assert [s.model for s in r.scores] == ["big", "small", "poor"]  # by the probe's accuracy
    assert not small.against_best.significant and poor.against_best.significant
    ref = paired_difference(small.oof_correct, big.oof_correct)
    assert (small.against_best.low, small.against_best.high) == (ref.low, ref.high)
    assert r.recommended == "small"
    assert r.reason.startswith("small is as accurate as big within noise by the 5-fold probe on 1000 train+val examples")
    assert "3.0x faster at batch 1: choose it." in r.reason
    assert r.front == ["poor", "small", "big"]  # each is the most accurate at its latency or below
    rows = ranking_rows(r)
    assert rows[1][1] == "small *" and rows[0][3] == "best" and rows[1][3].endswith("within noise")
    assert r.agreement.tau == pytest.approx(1.0)  # these LogME stand-ins order them as the probe does


def test_a_faster_backbone_measurably_less_accurate_is_not_recommended():
    best, fast = _score("best", 950, 30.0), _score("fast", 900, 3.0)
    r = rank([fast, best])
    assert r.recommended == "best" and fast.against_best.significant
    assert "every other backbone is measurably less accurate" in r.reason
    assert pareto_front(r.scores) == ["fast", "best"]


def test_a_dominated_backbone_is_off_the_front():
    assert pareto_front([_score("a", 950, 10.0), _score("b", 940, 20.0), _score("c", 960, 40.0)]) == ["a", "c"]


@pytest.fixture(scope="module")
def ranked_twice(tmp_path_factory):
    """compare --models on the digits demo, twice with one cache: the second run must extract nothing."""
    root = tmp_path_factory.mktemp("rank")
    env = {"TRANSFERKIT_CACHE": str(root / "cache")}
    models = "builtin:efficientnet_lite0,builtin:efficientnet_lite1"
    runs = [invoke_cli("compare", "--models", models, "--out", str(root / f"out{i}"), "-q", env=env) for i in (1, 2)]
    return root, runs, [json.loads((root / f"out{i}" / "compare.json").read_text()) for i in (1, 2)]


def test_compare_models_ranks_with_intervals_logme_costs_and_a_recommendation(ranked_twice):
    _, (first, _), (data, _) = ranked_twice
    ranking = data["backbone_ranking"]
    assert [r["strategy"] for r in data["results"]] == ["feature-extraction"] * 2  # several models: the cheap ranking
    scores = ranking["scores"]
    assert {s["model"] for s in scores} == {"builtin:efficientnet_lite0", "builtin:efficientnet_lite1"}
    assert scores[0]["cv"]["accuracy"] >= scores[1]["cv"]["accuracy"]
    for s in scores:
        assert s["cv"]["low"] < s["cv"]["accuracy"] < s["cv"]["high"] and s["cv"]["n"] == 1529
        assert np.isfinite(s["logme"]) and len(s["oof_correct"]) == 1529
        assert sum(s["oof_correct"]) == round(s["cv"]["accuracy"] * 1529)
        c = s["costs"]
        assert c["params"] > 3e6 and c["gflops"] > 0.01 and c["feature_dim"] == 1280
        assert c["latency_ms_batch1"] > 0 and c["latency_ms_batch32"] > 0 and c["extraction"] == "computed"
    assert ranking["recommended"] in {s["model"] for s in scores} and ranking["recommended"] in ranking["reason"]
    assert ranking["reason"] in first.stdout and "which backbone?" in first.stdout
    assert scores[1]["against_best"]["n"] == 1529


def test_the_ranking_matches_a_direct_cross_validated_probe_on_the_cached_features(ranked_twice, monkeypatch):
    """The ranking's probe is evidence.cross_validated_probe on train+val features, so it is reproducible from them."""
    from transferkit import ImageClassifier
    from transferkit.compare.run import train_val_features
    from transferkit.data import load_data

    root, _, (data, _) = ranked_twice
    splits = load_data("digits", seed=0)
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(root / "cache"))
    clf = ImageClassifier("builtin:efficientnet_lite0", strategy="feature-extraction", progress=False).fit(splits)
    x, y = train_val_features(clf, splits)
    assert {clf.feature_cache_[s] for s in ("train", "val", "test")} == {"hit"}
    direct = cross_validated_probe(x, y, k=5, seed=0)
    got = next(s for s in data["backbone_ranking"]["scores"] if s["model"] == "builtin:efficientnet_lite0")
    assert got["cv"]["accuracy"] == direct.accuracy
    assert got["costs"]["latency_ms_batch1"] > 0 and time_backbones([clf], splits.test, budget_s=0.1)[0][0] > 0


def test_a_second_compare_models_run_reads_every_backbone_from_the_cache(ranked_twice):
    _, _, (first, second) = ranked_twice
    for a, b in zip(first["backbone_ranking"]["scores"], second["backbone_ranking"]["scores"]):
        assert a["costs"]["extraction"] == "computed" and b["costs"]["extraction"] == "cached"
    assert [s["cv"]["accuracy"] for s in first["backbone_ranking"]["scores"]] == [
        s["cv"]["accuracy"] for s in second["backbone_ranking"]["scores"]
    ]


@pytest.mark.browser
def test_the_pareto_chart_renders_in_headless_chromium(ranked_twice, tmp_path):
    root, _, _ = ranked_twice
    html = root / "out1" / "report.html"
    text = html.read_text()
    assert "Backbones" in text and "accuracy vs latency, Pareto front" in text
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([chromium_path(), *flags, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120)
    assert f'data-loaded="{text.count("<img ")}"' in dom.stdout and "data-failed" not in dom.stdout
    assert "## Backbones" in (root / "out1" / "report.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "builtin:efficientnet_lite0", "--models", "builtin:efficientnet_lite1"], "not both"),
        (["--models", "builtin:efficientnet_lite0,builtin:efficientnet_lite0"], "distinct"),
        (["--models", "builtin:efficientnet_lite0,builtin:efficientnet_lite1", "--cv", "0"], "--cv 0"),
        (["--models", "builtin:efficientnet_lite0,builtin:efficientnet_lite1", "--fractions", "0.5,1"], "one backbone"),
    ],
)
def test_contradictory_model_options_are_refused_before_any_work(args, message, tmp_path):
    proc = invoke_cli("compare", *args, "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / "compare.json").exists()


def test_fit_with_models_picks_the_backbone_by_the_probe_then_auto_decides_and_the_run_records_why(tmp_path):
    from conftest import write_folder

    data = write_folder(tmp_path / "colours", per_class=10)
    out = tmp_path / "run"
    proc = invoke_cli(
        "fit", str(data), "--models", "builtin:efficientnet_lite0,builtin:efficientnet_lite1", "--image-size", "32", "--out", str(out), "-q"
    )
    meta = json.loads((out / "transferkit.json").read_text())
    choice = meta["backbone_choice"]
    scores = choice["ranking"]["scores"]
    assert choice["chosen"] == scores[0]["model"] == meta["backbone"]["name"]
    assert scores[0]["cv"]["accuracy"] >= scores[1]["cv"]["accuracy"]
    assert choice["reason"].startswith(f"{choice['chosen']} ranks first of 2 backbones by the")
    assert "oof_correct" not in scores[0] and meta["strategy"]["requested"] == "auto" and meta["strategy"]["auto"]
    assert f"Backbone {choice['chosen']}" in proc.stdout and "auto chose" in proc.stdout
    refused = invoke_cli(
        "fit",
        str(data),
        "--models",
        "builtin:efficientnet_lite0,builtin:efficientnet_lite1",
        "--model",
        "builtin:efficientnet_lite0",
        "--out",
        str(tmp_path / "r2"),
        check=False,
    )
    assert refused.returncode == 2 and "leave --model out" in refused.stderr
