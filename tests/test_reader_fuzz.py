"""Property tests of every reader: arbitrary bytes, and valid files truncated or with bits flipped, give a value or a
QandcError, never another exception, never a hang. ONNX and torch.export programs are read in a child process, so a
crash of a native library fails the case instead of ending the run."""

import functools
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save

from qandc.artifacts import read_json, read_safetensors
from qandc.calibration.pool import Pool
from qandc.data import load_fashion_mnist
from qandc.errors import QandcError
from qandc.metrics.evaluate import read_samples
from qandc.model import load_checkpoint, save_checkpoint
from qandc.model.checkpoint import read_sidecar
from qandc.readers import JSON_MAX_DEPTH, read_npz

ROOT = Path(__file__).resolve().parent.parent
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@functools.cache
def valid(kind: str) -> bytes:
    """A small valid file of each kind, the seed of the mutations."""
    buffer = io.BytesIO()
    if kind == "checkpoint":
        torch.save(tiny_model(depth=1, hidden_size=16, num_heads=2).state_dict(), buffer)
    elif kind == "safetensors":
        return save({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.int8)})
    elif kind == "npz":
        np.savez(buffer, images=np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28), labels=np.array([1, 2]))
    elif kind == "npz-compressed":
        np.savez_compressed(buffer, images=np.zeros((2, 28, 28), np.uint8))
    elif kind == "png":
        Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)).save(buffer, format="PNG")
    elif kind == "json":
        return json.dumps({"model": {"num_heads": 2, "guidance": "all"}, "steps": [1, 2, [3, {"a": None}]]}).encode()
    elif kind == "idx-gz":
        import gzip
        return gzip.compress(bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (2, 28, 28)) + bytes(1568))
    return buffer.getvalue()


def mutated(kind: str):
    """Valid bytes of `kind` cut at some length, with some bits flipped, and some bytes appended."""
    data = valid(kind)
    return st.tuples(st.integers(0, len(data)), st.lists(st.integers(0, 8 * len(data) - 1), max_size=6),
                     st.binary(max_size=16)).map(lambda m: _mutate(data, *m))


def _mutate(data: bytes, cut: int, flips: list[int], tail: bytes) -> bytes:
    out = bytearray(data)
    for bit in flips:
        out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out[:cut]) + tail


def any_bytes_or(kind: str):
    return st.binary(max_size=2048) | mutated(kind)


def value_or_qandc_error(call):
    """call()'s value, or None when it raised QandcError; any other exception fails the test."""
    try:
        return call()
    except QandcError:
        return None


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(any_bytes_or("checkpoint"))
def test_checkpoint(folder, data):
    (folder / "c.pt").write_bytes(data)
    model = value_or_qandc_error(lambda: load_checkpoint(folder / "c.pt", num_heads=2))
    assert model is None or model.config.hidden_size > 0


@FUZZ
@given(any_bytes_or("json"))
def test_sidecar(folder, data):
    (folder / "s.pt").write_bytes(b"")
    (folder / "s.json").write_bytes(data)
    sidecar = value_or_qandc_error(lambda: read_sidecar(folder / "s.pt"))
    assert sidecar is None or isinstance(sidecar.get("model", {}), dict)


@FUZZ
@given(any_bytes_or("json"))
def test_json(folder, data):
    (folder / "j.json").write_bytes(data)
    assert isinstance(value_or_qandc_error(lambda: read_json(folder / "j.json")) or {}, dict)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 50_000), st.sampled_from(["[", '{"a":']))
def test_json_nesting(folder, depth, opener):
    closer = "]" if opener == "[" else "}"
    (folder / "n.json").write_text('{"x": ' + opener * depth + "1" * (opener != "[") + closer * depth + "}")
    data = value_or_qandc_error(lambda: read_json(folder / "n.json"))
    assert (data is not None) == (depth < JSON_MAX_DEPTH)


@FUZZ
@given(any_bytes_or("safetensors"))
def test_safetensors(folder, data):
    (folder / "t.safetensors").write_bytes(data)
    tensors = value_or_qandc_error(lambda: read_safetensors(folder / "t.safetensors"))
    assert tensors is None or all(isinstance(t, torch.Tensor) for t in tensors.values())


@FUZZ
@given(st.binary(max_size=2048) | mutated("npz") | mutated("npz-compressed"))
def test_npz(folder, data):
    (folder / "a.npz").write_bytes(data)
    arrays = value_or_qandc_error(lambda: read_npz(folder / "a.npz", "npz"))
    assert arrays is None or all(isinstance(a, np.ndarray) and a.dtype != object for a in arrays.values())
    samples = value_or_qandc_error(lambda: read_samples(folder / "a.npz"))
    assert samples is None or samples[0].shape[1:] == (28, 28)
    (folder / "pool").mkdir(exist_ok=True)
    (folder / "pool" / "pool.json").write_text("{}")
    (folder / "pool" / "pool.npz").write_bytes(data)
    value_or_qandc_error(lambda: Pool.load(folder / "pool"))


def test_npz_round_trip(folder):
    """read_npz gives what np.savez wrote, C and Fortran order, any dtype numpy stores without pickles."""
    arrays = {"c": np.arange(24, dtype=np.float16).reshape(2, 3, 4), "f": np.asfortranarray(np.ones((3, 5))),
              "s": np.array("stamp"), "e": np.zeros((0, 3), np.int64), "b": np.array([True, False])}
    np.savez_compressed(folder / "r.npz", **arrays)
    read = read_npz(folder / "r.npz", "npz")
    assert read.keys() == arrays.keys()
    for name, array in arrays.items():
        assert read[name].dtype == array.dtype and np.array_equal(read[name], array)


@FUZZ
@given(any_bytes_or("png"))
def test_png(folder, data):
    (folder / "pngs").mkdir(exist_ok=True)
    (folder / "pngs" / "3_a.png").write_bytes(data)
    samples = value_or_qandc_error(lambda: read_samples(folder / "pngs"))
    assert samples is None or samples[0].shape == (1, 28, 28)


@FUZZ
@given(any_bytes_or("idx-gz"))
def test_fashion_mnist_idx(folder, data):
    (folder / "idx").mkdir(exist_ok=True)
    (folder / "idx" / "train-images-idx3-ubyte.gz").write_bytes(data)
    (folder / "idx" / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 2, 1, 2]))
    loaded = value_or_qandc_error(lambda: load_fashion_mnist("train", folder / "idx"))
    assert loaded is None or loaded[0].shape == (2, 28, 28)


WORKER = """
import sys
import zipfile
from pathlib import Path
from qandc.errors import QandcError
from qandc.engines.onnxruntime_backend import OrtEngine, optimise
from qandc.model.graphs import GraphSpec
from qandc.engines.inductor_backend import InductorEngine
for path in map(Path, sys.argv[1:]):
    try:
        if path.suffix == ".onnx":
            OrtEngine(optimise(path, path.with_suffix(".ort.onnx")), GraphSpec("full", (), ()))
        else:
            InductorEngine(path, None, compile=False)
    except QandcError:
        pass
"""


@functools.cache
def valid_onnx() -> bytes:
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # shrinking a batch in a child process takes minutes
@given(st.data())
def test_onnx_and_exported_programs_in_a_child(folder, data):
    """Batches of arbitrary or mutated ONNX models and torch.export programs, read in one child process: it must
    exit 0 (every file a value or a QandcError), not crash or raise."""
    pytest.importorskip("onnxruntime")
    seed = valid_onnx()
    onnx_bytes = st.binary(max_size=1024) | st.tuples(
        st.integers(0, len(seed)), st.lists(st.integers(0, 8 * len(seed) - 1), max_size=4), st.binary(max_size=8)
    ).map(lambda m: _mutate(seed, *m))
    files = []
    for i, content in enumerate(data.draw(st.lists(onnx_bytes, min_size=8, max_size=8))):
        files.append(folder / f"m{i}.onnx")
        files[-1].write_bytes(content)
    for i, content in enumerate(data.draw(st.lists(st.binary(max_size=1024) | mutated("npz"), max_size=3))):
        files.append(folder / f"p{i}.pt2")
        files[-1].write_bytes(content)
    run = subprocess.run([sys.executable, "-c", WORKER, *map(str, files)], capture_output=True, text=True,
                         timeout=120, cwd=folder, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]


def test_valid_files_read(folder):
    """The seeds themselves read back: the readers refuse damage, not valid files."""
    (folder / "v.pt").write_bytes(valid("checkpoint"))
    assert load_checkpoint(folder / "v.pt", num_heads=2).config.hidden_size == 16
    with zipfile.ZipFile(folder / "v.pt") as plain, zipfile.ZipFile(folder / "d.pt", "w", zipfile.ZIP_DEFLATED) as z:
        for info in plain.infolist():
            z.writestr(info.filename, plain.read(info))
    assert load_checkpoint(folder / "d.pt", num_heads=2).config.hidden_size == 16  # compressed, not a bomb
    (folder / "v.npz").write_bytes(valid("npz"))
    assert read_samples(folder / "v.npz")[1].tolist() == [1, 2]
    save_checkpoint(tiny_model(depth=1, hidden_size=16, num_heads=2), folder / "w.pt")
    assert read_sidecar(folder / "w.pt")["model"]["num_heads"] == 2
