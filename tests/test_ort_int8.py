"""INT8 Q/DQ rewritten to uint8 for ONNX Runtime (`qandc.ort_int8`): the same numbers, U8U8 kernels only, and exact
on an AVX2 CPU without VNNI (emulated by qemu where it is installed), where the int8 graph loses accuracy."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_model
from qandc.sampling import CachePlan

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("modelopt.torch.quantization")

from qandc.calibration import CalibrationSettings, SelectorParams, calibrate  # noqa: E402
from qandc.engines import build_engines  # noqa: E402
from qandc.exporter import export  # noqa: E402
from qandc.ort_int8 import session, to_u8  # noqa: E402

PLAN = CachePlan.interval(3)
INTEGER_OPS = {"MatMulIntegerToFloat", "QLinearMatMul", "QGemm", "MatMulInteger", "QLinearConv",
               "DynamicQuantizeMatMul", "QAttention"}
# run under qemu: the int8 graph as it is and rewritten, outputs to ARGV[2]
EMULATED = """
import sys, numpy as np, onnxruntime as ort
from qandc.ort_int8 import session
feeds = dict(np.load(sys.argv[2]))
plain = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"]).run(None, feeds)
u8 = session(sys.argv[1]).run(None, feeds)
np.savez(sys.argv[3], plain=plain[0], u8=u8[0])
"""


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    settings = CalibrationSettings(preset="w8a8-int8", selector="random", budget=20, plan=PLAN, pool_samples=4,
                                   steps=8, selector_params=SelectorParams(k=4), vc="var", vc_samples=4, batch_size=4)
    model = tiny_model(guidance="all")
    calibrate(model, root / "recipe", settings)
    export(model, root / "onnx", recipe_dir=root / "recipe")
    return root


def _feeds():
    generator = torch.Generator().manual_seed(0)
    return {"x": torch.randn(3, 4, 8, 8, generator=generator).numpy(), "t": np.array([5, 400, 999]),
            "y": np.array([0, 3, 10])}


def _unoptimised(model_or_path):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # Q/DQ as the reference ops
    return ort.InferenceSession(model_or_path, options, providers=["CPUExecutionProvider"])


def test_u8_graph_computes_the_same_numbers(int8_export):
    path = int8_export / "onnx" / "full.onnx"
    model = onnx.load(str(path))
    assert to_u8(model) == 20  # a weight and an activation Q/DQ pair for each of the 10 quantized linears
    onnx.checker.check_model(model, full_check=True)
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert {types[n.input[2]] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")} == {
        onnx.TensorProto.UINT8}
    feeds = _feeds()
    for want, got in zip(_unoptimised(str(path)).run(None, feeds), _unoptimised(model.SerializeToString()).run(None,
                                                                                                            feeds)):
        assert np.array_equal(want, got)


def test_ort_engines_fuse_u8u8_kernels_only(int8_export, tmp_path):
    build_engines(int8_export / "onnx", tmp_path, "onnxruntime")
    graph = onnx.load(str(tmp_path / "full.ort.onnx")).graph
    types = {t.name: t.data_type for t in graph.initializer}
    integer = [n for n in graph.node if n.op_type in INTEGER_OPS]
    assert len(integer) == 8  # qkv, proj, fc1, fc2 of both blocks (adaLN stays a float Gemm of dequantized weights)
    assert {types[i] for n in integer for i in n.input if i in types and types[i] in (2, 3)} == {
        onnx.TensorProto.UINT8}  # weights and zero points: uint8, no int8
    assert {types[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"} == {onnx.TensorProto.UINT8}


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None or sys.platform != "linux",
                    reason="needs qemu-user (Debian: qemu-user) to emulate an AVX2 CPU without VNNI")
def test_exact_on_an_avx2_cpu_without_vnni(int8_export, tmp_path):
    path = int8_export / "onnx" / "full.onnx"
    feeds = _feeds()
    np.savez(tmp_path / "feeds.npz", **feeds)
    subprocess.run(["qemu-x86_64", "-cpu", "Haswell", sys.executable, "-c", EMULATED, str(path),
                    str(tmp_path / "feeds.npz"), str(tmp_path / "out.npz")], check=True, capture_output=True,
                   env={"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": "/usr/bin:/bin"}, timeout=300)
    emulated, want = np.load(tmp_path / "out.npz"), _unoptimised(str(path)).run(None, feeds)[0]

    def rel(got):
        return float(np.linalg.norm(got - want) / np.linalg.norm(want))

    assert rel(emulated["plain"]) > 3e-4  # U8S8 saturates in int16: ~1.3e-3
    assert rel(emulated["u8"]) < 1e-6
    assert np.array_equal(emulated["u8"], session(path).run(None, feeds)[0])  # the same numbers as here (VNNI or not)
