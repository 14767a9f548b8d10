"""Property-based tests of what qandc parses: the cache-plan grammar and JSON, and the JSON files it reads (any bytes,
any JSON, fuzzed recipes and manifests) give a value or a QandcError, never another exception."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_model
from qandc.artifacts import read_json
from qandc.formats.recipe import QuantRecipe
from qandc.cli import main
from qandc.errors import QandcError
from qandc.sampling import CachePlan

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
branch_names = st.builds(lambda i, kind: f"blocks.{i}.{kind}", st.integers(0, 40), st.sampled_from(["attn", "mlp"]))


def fuzzed(base: dict, fixed: dict):
    """`base` with each key kept, dropped or given any JSON value, plus any extra keys; `fixed` keys as given."""
    optional = {k: st.one_of(st.just(v), json_values) for k, v in base.items() if k not in fixed}
    return st.tuples(st.fixed_dictionaries({k: st.just(v) for k, v in fixed.items()}, optional=optional),
                     st.dictionaries(st.text(max_size=10), json_values, max_size=2)).map(lambda p: {**p[1], **p[0]})


def _expected_or_qandc_error(call):
    """call()'s value, or None when it raised QandcError; any other exception fails the test."""
    try:
        return call()
    except QandcError:
        return None


# --- the cache-plan grammar --------------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(st.integers(1, 999), st.one_of(st.sampled_from(["all", "attn", "mlp"]), st.lists(branch_names, min_size=1,
                                                                                     max_size=6, unique=True)),
       st.booleans(), st.sets(st.sampled_from(["branches", "regate"])), st.randoms())
def test_plan_grammar_round_trips(interval, branches, regate, written, random):
    """Any plan the grammar can state parses back to itself, fields in any order, defaults left out."""
    parts = {"interval": str(interval), "branches": branches if isinstance(branches, str) else "+".join(branches),
             "regate": str(int(regate))}
    spec = [f"{key}={parts[key]}" for key in ["interval", *written]]
    random.shuffle(spec)
    plan = CachePlan.parse(",".join(spec))
    assert plan == CachePlan.interval(interval, branches if "branches" in written else "all",
                                      regate if "regate" in written else False)
    assert CachePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


grammar_fragments = st.lists(st.one_of(
    st.sampled_from(["interval", "branches", "regate", "every", "", " "]).flatmap(
        lambda key: st.sampled_from(["=", "", "=="]).flatmap(
            lambda sep: st.one_of(st.integers(-3, 12).map(str), st.sampled_from(["all", "attn", "mlp", "", "x"]),
                                  branch_names, st.text(max_size=5)).map(lambda value: f"{key}{sep}{value}")))),
    max_size=4).map(",".join)


@settings(max_examples=100, deadline=None)
@given(st.one_of(grammar_fragments, st.text(max_size=30).filter(lambda s: not s.strip().endswith(".json"))))
def test_plan_grammar_refuses_with_qandc_error_only(spec):
    plan = _expected_or_qandc_error(lambda: CachePlan.parse(spec))
    if plan is not None:  # a spec the grammar accepts is a valid plan
        assert plan.every >= 1 and CachePlan.from_dict(plan.to_dict()) == plan


@settings(max_examples=100, deadline=None)
@given(st.one_of(json_values, st.dictionaries(st.sampled_from(["interval", "schedule", "branches", "regate"]),
                                              st.one_of(json_values, st.lists(st.sampled_from(["full", "reuse"])),
                                                        st.lists(branch_names)))))
def test_plan_json_gives_a_plan_or_qandc_error(data):
    plan = _expected_or_qandc_error(lambda: CachePlan.from_dict(data))
    if plan is not None:
        assert CachePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
        assert plan.full_steps(len(plan.schedule) if plan.schedule else 5)[0]


# --- JSON files: any bytes, fuzzed recipes and manifests ---------------------------------------------------------

@FUZZ
@given(st.one_of(st.binary(max_size=64), json_values.map(lambda v: json.dumps(v).encode())))
def test_read_json_gives_an_object_or_qandc_error(tmp_path, content):
    (tmp_path / "a.json").write_bytes(content)
    data = _expected_or_qandc_error(lambda: read_json(tmp_path / "a.json"))
    assert data is None or isinstance(data, dict)


RECIPE = QuantRecipe(preset="w8a8-int8", layers=["blocks.0.mlp.fc1"], plan=CachePlan.interval(2), steps=4,
                     sampler="ddpm", cfg_scale=1.5, vc={"form": "var", "samples": 2, "seed": 1}).to_dict()


@FUZZ
@given(fuzzed(RECIPE, {"format_version": 1}))
def test_recipe_json_gives_a_recipe_or_qandc_error(tmp_path, data):
    (tmp_path / "recipe.json").write_text(json.dumps(data))
    recipe = _expected_or_qandc_error(lambda: QuantRecipe.load(tmp_path))
    if recipe is not None:  # a recipe that loads is usable as it is
        assert recipe.cache_plan.every >= 1 and recipe.modelopt_config()["quant_cfg"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from qandc.engines import build_engines
    from qandc.exporter import export

    root = tmp_path_factory.mktemp("fuzz")
    export(tiny_model(guidance="all"), root / "onnx", CachePlan.interval(2))
    build_engines(root / "onnx", root / "engines", "onnxruntime")
    return root / "engines", json.loads((root / "engines" / "manifest.json").read_text())


@FUZZ
@given(data=st.data())
def test_engine_manifest_gives_engines_or_qandc_error(engines, data):
    from qandc.engines import load_engines

    folder, manifest = engines
    original = (folder / "manifest.json").read_text()
    try:
        (folder / "manifest.json").write_text(json.dumps(data.draw(fuzzed(manifest, {"kind": "engines",
                                                                                     "format_version": 1}))))
        _expected_or_qandc_error(lambda: load_engines(folder))
    finally:
        (folder / "manifest.json").write_text(original)


@FUZZ
@given(data=st.data())
def test_inspect_reports_or_refuses_any_manifest(engines, data, capsys):
    folder, manifest = engines
    original = (folder / "manifest.json").read_text()
    try:
        (folder / "manifest.json").write_text(json.dumps(data.draw(fuzzed(manifest, {}))))
        assert main(["inspect", str(folder)]) in (0, 2)
    finally:
        (folder / "manifest.json").write_text(original)
    capsys.readouterr()


@FUZZ
@given(data=st.data())
def test_run_treats_any_damaged_manifest_as_a_stage_to_redo(engines, data):
    from qandc.formats.manifest import EngineManifest
    from qandc.run import _valid

    folder, manifest = engines
    original = (folder / "manifest.json").read_text()
    try:
        files = data.draw(fuzzed(manifest, {})).get("files")
        (folder / "manifest.json").write_text(json.dumps({**manifest, "files": files}))
        expected = isinstance(files, dict) and files.items() <= manifest["files"].items() \
            and set(manifest["engines"].values()) <= set(files)
        assert _valid(folder, EngineManifest, {}) == expected
    finally:
        (folder / "manifest.json").write_text(original)
