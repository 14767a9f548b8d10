"""The TensorRT backend type-checks against TensorRT 10.13's API stubs (tests/trt_typecheck.py), without TensorRT."""

import importlib.util

import pytest
import trt_typecheck as tc


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    """(patched stubs folder, mypy cache folder), or a skip when mypy or the stubs are not installed."""
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (it is in the test extra: pip install -e '.[test]')")
    version = tc.stubs_version()
    if version is None:
        pytest.skip(f"tensorrt-stubs are not installed in {tc.STUBS} (make setup installs them there)")
    assert version.startswith("10.13."), f"tensorrt-stubs {version} installed; the backend targets TensorRT 10.13"
    folder = tmp_path_factory.mktemp("trt-types")
    return tc.patched_stubs(folder / "stubs"), folder / "mypy-cache"


def test_backend_has_no_type_errors(stubs):
    folder, cache = stubs
    result = tc.run_mypy(folder, "--cache-dir", str(cache), str(tc.BACKEND))
    assert result.returncode == 0, result.stdout + result.stderr


def test_wrong_tensorrt_calls_in_the_backend_are_reported(stubs, tmp_path):
    """A misspelt method and an argument of the wrong type, put into a copy of the backend, fail the check."""
    folder, cache = stubs
    source = tc.BACKEND.read_text()
    mutations = {".create_network(": ".create_netwrok(",
                 "parse_from_file(str(onnx_path))": "parse_from_file(onnx_path)"}
    for right, wrong in mutations.items():
        assert source.count(right) == 1, f"the backend no longer has {right!r} once: update this test's mutations"
        source = source.replace(right, wrong)
    shadow = tmp_path / "tensorrt_backend.py"
    shadow.write_text(source)
    result = tc.run_mypy(folder, "--cache-dir", str(cache), "--shadow-file", str(tc.BACKEND), str(shadow),
                         str(tc.BACKEND))
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert '"Builder" has no attribute "create_netwrok"' in out and "[attr-defined]" in out, out
    assert 'Argument 1 to "parse_from_file" of "OnnxParser" has incompatible type "Path"; expected "str"' in out, out
