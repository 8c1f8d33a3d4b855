"""Property-based fuzzing of the parsers that read user input: they return a value or raise a transferkit error."""

import csv
import io
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import make_image
from transferkit.data import DataSummary, FileImages, read_csv
from transferkit.errors import DataError, RunError, UsageError
from transferkit.runs.directory import validate_meta
from transferkit.training.strategies import ALIASES, KINDS, Strategy, parse_strategy

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------- strategy specs

words = st.sampled_from([*KINDS, *ALIASES, "FineTune", " lp-ft ", "finetune ", "all", "last", ""])
digits = st.text(st.characters(categories=["Nd", "No"]), max_size=4) | st.integers(-5, 10**6).map(str)
near_specs = st.builds(
    lambda w, sep, key, eq, n: f"{w}{sep}{key}{eq}{n}",
    words,
    st.sampled_from(["", ":", "::", ": "]),
    st.sampled_from(["", "last", "LAST", "all", "first"]),
    st.sampled_from(["", "=", "=="]),
    digits,
)


@FUZZ
@given(st.text() | near_specs)
@example("finetune:last=²")  # superscript two: str.isdigit() says yes, int() says no
@example("finetune:last=" + "9" * 5000)  # past Python's int-from-string digit limit
def test_parse_strategy_parses_round_trips_or_raises_usage_error(spec):
    try:
        strategy = parse_strategy(spec)
    except UsageError as e:
        refusal = str(e)
    else:
        assert isinstance(strategy, Strategy) and strategy.kind in KINDS
        assert parse_strategy(strategy.spec) == strategy
        return
    assert refusal  # a refusal says why


@given(st.one_of(st.none(), st.integers(), st.binary(), st.lists(st.text())))
def test_parse_strategy_rejects_non_strings_as_usage_error(spec):
    try:
        parse_strategy(spec)
    except UsageError:
        return
    raise AssertionError(f"accepted {spec!r}")


# ---------------------------------------------------------------- CSV files

PNG = io.BytesIO()
make_image((200, 40, 40), 0, size=16).save(PNG, format="PNG")
cells = st.text(max_size=12) | st.sampled_from(["img.png", " img.png ", "missing.png", ".", "", "/", "a\x00b", "red"])
headers = st.sampled_from([["path", "label"], ["Path ", " LABEL"], ["label", "path", "extra"], ["path"], ["file", "cls"], []]) | st.lists(
    st.text(max_size=8), max_size=4
)


@st.composite
def csv_bytes(draw) -> bytes:
    rows = [draw(headers), *draw(st.lists(st.lists(cells, max_size=4), max_size=8))]
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    text = buf.getvalue()
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    return text.encode(encoding, errors="replace")


@FUZZ
@given(content=csv_bytes() | st.binary(max_size=300), strict=st.booleans(), classes=st.none() | st.just(["red", "blue"]))
@example(content=b"file,cls\na.png,b,extra\n", strict=False, classes=None)  # surplus field in the first row
@example(content=b"path,label\nimg.png\n", strict=False, classes=None)  # a row without a label
@example(content=b"path,label\n", strict=False, classes=None)  # a header and nothing else
def test_read_csv_returns_images_or_raises_data_error(content, strict, classes):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "img.png").write_bytes(PNG.getvalue())
        path = Path(d) / "labels.csv"
        path.write_bytes(content)
        summary = DataSummary(str(path))
        try:
            images = read_csv(path, summary, strict, classes)
        except DataError as e:
            refusal = str(e)
        else:
            refusal = None
        if refusal is not None:
            assert str(path) in refusal  # a refusal names the file
            return
    assert isinstance(images, FileImages)
    assert len(images.paths) == len(images.labels) == len(images.digests)
    assert all(0 <= v < len(images.classes) for v in images.labels.tolist())
    assert all(p.name == "img.png" for p in images.paths)  # the only file there that decodes
    assert all(isinstance(c, str) and c for c in images.classes)
    assert summary.found >= len(images) + summary.n_skipped - sum(len(v) for k, v in summary.skipped.items() if k == "unknown class")


# ---------------------------------------------------------------- run metadata

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
near_meta = st.fixed_dictionaries(
    {
        "format_version": st.sampled_from([1, 0, -1, 2, True, 1.0, "1"]) | json_values,
        "backbone": st.fixed_dictionaries({"arch": st.text(max_size=8) | json_values}, optional={"name": st.text(max_size=8) | json_values})
        | json_values,
        "classes": st.lists(st.text(max_size=3), max_size=4) | json_values,
        "data_config": st.fixed_dictionaries({}, optional={"input_size": st.just([3, 64, 64]) | json_values}) | json_values,
        "strategy": st.fixed_dictionaries({}, optional={"spec": near_specs | json_values}) | json_values,
    },
    optional={"metrics": json_values},
)


@FUZZ
@given(json_values | near_meta)
@example(
    {"format_version": 0, "backbone": {"arch": "resnet18"}, "classes": ["a", "b"], "data_config": {}, "strategy": {}}
)  # no such format
@example(
    {"format_version": 1, "backbone": {"arch": "resnet18"}, "classes": ["a", "b"], "data_config": {}, "strategy": {"spec": 3}}
)  # loading would hand 3 to parse_strategy
def test_validate_meta_returns_the_dict_or_raises_run_error(meta):
    where = Path("run/transferkit.json")
    try:
        result = validate_meta(meta, where)
    except RunError as e:
        refusal = str(e)
    else:
        refusal = None
    if refusal is not None:
        assert str(where) in refusal  # a refusal names the file
        return
    assert result is meta
    # Everything ImageClassifier.load reads from a validated file has the type it needs.
    assert isinstance(meta["backbone"].get("name", meta["backbone"]["arch"]), str)
    parse_strategy(meta["strategy"].get("spec", "feature-extraction"))
    assert meta["classes"] and len(set(meta["classes"])) == len(meta["classes"])
