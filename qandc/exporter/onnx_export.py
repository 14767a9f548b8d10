"""ONNX export of the engine graphs of a cache plan, plain float or with Q/DQ nodes from a quant recipe.

Each graph's inputs and outputs are those its declaration gives (`qandc.model.graphs`): x, t, y, the cache tensors
named by branch (`blocks.<i>.attn|mlp`, forecast factors `.d1`, `.d2`), the Taylor weights when the plan forecasts;
`out` and the refreshed cache tensors. Every tensor is float32 but t and y (int64). Batch (axis 0) is dynamic. An input
named like an output (the previous factors of a branch the graph refreshes) is named NAME.previous in the file
(`onnx_input_names`: ONNX names each tensor once).
INT8 recipes export as standard QuantizeLinear / DequantizeLinear (per-channel weight scales, per-tensor activation
scales). ModelOpt exports FP8 as TensorRT-only `trt::TRT_FP8QuantizeLinear` / `TRT_FP8DequantizeLinear`; they are
rewritten into standard opset-19 Q/DQ with a float8e4m3fn zero point, which ONNX Runtime and TensorRT both read.
Models over 2 GiB keep their weights as external data beside the graph. Each graph is validated by onnx.checker
(full check) and run once through polygraphy's ONNX Runtime runner against the traced module, INT8 Q/DQ rewritten to
uint8 as the ONNX Runtime engines run it (`qandc.ort_int8`: exact on CPUs without VNNI too).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
import torch.nn as nn

from .. import ort_int8
from ..artifacts import atomic_path
from ..chatter import quiet
from ..errors import QandcError
from ..requires import require
from ..formats.manifest import onnx_input_names
from ..model.forecast import FACTOR_SUFFIXES
from ..model.graphs import GraphSpec

OPSET = 19
TWO_GIB = 2 ** 31
TRT_FP8 = {"TRT_FP8QuantizeLinear": "QuantizeLinear", "TRT_FP8DequantizeLinear": "DequantizeLinear"}


def _standard_fp8(graph_proto) -> int:
    """Rewrite TensorRT's FP8 Q/DQ custom ops into standard ONNX Q/DQ; returns how many nodes changed."""
    from onnx import TensorProto, helper

    zero = "qandc_fp8_zero_point"
    changed, outputs = 0, set()
    for node in graph_proto.graph.node:
        if node.domain == "trt" and node.op_type in TRT_FP8:
            node.op_type, node.domain = TRT_FP8[node.op_type], ""
            del node.input[2:]
            node.input.append(zero)
            outputs.update(node.output)
            changed += 1
    if changed:  # the exporter typed the custom ops' outputs as float: let shape inference type them anew
        kept = [v for v in graph_proto.graph.value_info if v.name not in outputs]
        del graph_proto.graph.value_info[:]
        graph_proto.graph.value_info.extend(kept)
        graph_proto.graph.initializer.append(helper.make_tensor(zero, TensorProto.FLOAT8E4M3FN, [], [0.0]))
    unknown = {n.op_type for n in graph_proto.graph.node if n.domain == "trt"}
    if unknown:
        raise QandcError(f"the export holds TensorRT-only ops qandc cannot rewrite: {', '.join(sorted(unknown))}")
    kept = [o for o in graph_proto.opset_import if o.domain != "trt"]
    del graph_proto.opset_import[:]
    graph_proto.opset_import.extend(kept)
    return changed


def validate_with_polygraphy(path: Path, feeds: dict, expected: dict[str, torch.Tensor]) -> float:
    """Run the saved graph (INT8 Q/DQ as uint8, `ort_int8.session`) with polygraphy's ONNX Runtime runner on `feeds`;
    return the largest error against the traced module's `expected` outputs, relative to each output's norm (a
    forecast factor's: its branch value's, as a difference of close values has little norm of its own).
    Non-finite outputs are an error."""
    require("onnxruntime", "export validation")  # ort_int8.session builds the session
    OnnxrtRunner = require("polygraphy.backend.onnxrt", "export validation").OnnxrtRunner
    with contextlib.redirect_stdout(io.StringIO()), OnnxrtRunner(ort_int8.session(path)) as runner:
        outputs = runner.infer({k: v.detach().cpu().numpy() for k, v in feeds.items()})
    worst = 0.0
    for name, got in outputs.items():
        got = torch.as_tensor(got)
        if not torch.isfinite(got).all():
            raise QandcError(f"{path}: output {name} is not finite under ONNX Runtime")
        scale = expected[factor_branch(name)].cpu().norm().clamp(min=1e-30)
        worst = max(worst, float((got - expected[name].cpu()).norm() / scale))
    return worst


def factor_branch(name: str) -> str:
    """The tensor a forecast factor belongs to (`blocks.0.attn.d2` -> `blocks.0.attn`); any other name itself."""
    return next((name.removesuffix(s) for s in FACTOR_SUFFIXES[1:] if name.endswith(s)), name)


def export_graph(module: nn.Module, feeds: dict[str, torch.Tensor], spec: GraphSpec, path: Path) -> dict:
    """Trace `module` (a graph declared by `spec`) on `feeds` to ONNX at `path` (atomically), FP8 ops
    standardised, checked; returns node counts and validation results."""
    onnx = require("onnx", "export")

    inputs = tuple(feeds[n] for n in spec.input_names)
    names = onnx_input_names(spec)
    buffer = io.BytesIO()
    with torch.no_grad(), quiet():
        torch.onnx.export(module, inputs, buffer, dynamo=False, opset_version=OPSET, input_names=names,
                          output_names=spec.output_names,
                          dynamic_axes={name: {0: "batch"} for name in names + spec.output_names})
    proto = onnx.load_model_from_string(buffer.getvalue())
    rewritten = _standard_fp8(proto)
    large = proto.ByteSize() >= TWO_GIB
    if not large:
        onnx.checker.check_model(proto, full_check=True)
    with atomic_path(path) as tmp:  # external data (over 2 GiB) goes to PATH.data, which the graph names
        onnx.save_model(proto, str(tmp), save_as_external_data=large, location=f"{path.name}.data")
    if large:
        onnx.checker.check_model(str(path))
    ops = [n.op_type for n in proto.graph.node]
    with torch.no_grad():
        expected = dict(zip(spec.output_names, module(*inputs)))
    return {"nodes": len(ops), "quantize_linear": ops.count("QuantizeLinear"),
            "dequantize_linear": ops.count("DequantizeLinear"), "fp8_rewritten": rewritten, "external_data": large,
            "onnx_checker": "passed", "polygraphy_onnxrt_rel_error": validate_with_polygraphy(
                path, dict(zip(names, inputs)), expected)}
