"""INT8 Q/DQ graphs as ONNX Runtime runs them: rewritten to uint8, so its CPU kernels are U8U8 on every x86 CPU.

On x86, ONNX Runtime turns int8 activation Q/DQ into uint8 (zero point + 128) and fuses Q/DQ MatMuls into
MatMulIntegerToFloat with those uint8 activations and the int8 weights: MLAS's U8S8 GEMM. Without VNNI, its AVX2
kernel multiplies with vpmaddubsw, which adds two adjacent u8*s8 products into a saturating int16
(2 * 255 * 127 > 32767): a silent accuracy loss, 1.3e-3 relative error on the tiny test DiT. The U8U8 kernel widens
to int16 and adds in int32 (vpmaddwd): exact. `to_u8` makes both operands uint8 before ONNX Runtime sees the graph;
the export itself stays int8 symmetric, as TensorRT wants it.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from .requires import require

# ONNX Runtime reads the external data of a model given as bytes from this folder
EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"


def to_u8(model, base_dir: str = "") -> int:
    """Rewrite `model` in place: every int8 QuantizeLinear -> DequantizeLinear pair and every int8 constant read by
    a DequantizeLinear become uint8 with the zero point (per tensor or per channel) + 128, which is the same number.
    Returns how many DequantizeLinear nodes changed. `base_dir`: where external data lies."""
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    consts = {t.name: t for t in graph.initializer}
    consts.update({n.output[0]: a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute
                   if a.name == "value"})
    producers = {o: n for n in graph.node for o in n.output}
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    outputs = {o.name for o in graph.output}

    def int8_zero_point(node) -> bool:
        return (node.domain in ("", "ai.onnx") and len(node.input) > 2 and node.input[2] in consts
                and consts[node.input[2]].data_type == TensorProto.INT8
                and not any(a.name == "output_dtype" for a in node.attribute))

    shifted = {}

    def u8(name: str) -> str:
        """The uint8 copy (+128) of int8 constant `name`, added once."""
        if name not in shifted:
            values = numpy_helper.to_array(consts[name], base_dir).astype(np.int16) + 128
            graph.initializer.append(numpy_helper.from_array(values.astype(np.uint8), f"{name}_u8"))
            shifted[name] = f"{name}_u8"
        return shifted[name]

    changed, retyped = 0, set()
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear" and int8_zero_point(n)]:
        x, q = dq.input[0], producers.get(dq.input[0])
        if x in consts and consts[x].data_type == TensorProto.INT8:
            dq.input[0] = u8(x)
        elif (q is not None and q.op_type == "QuantizeLinear" and int8_zero_point(q) and x not in outputs
              and all(c.op_type == "DequantizeLinear" and int8_zero_point(c) for c in consumers[x])):
            if x not in retyped:
                q.input[2] = u8(q.input[2])
                retyped.add(x)
        else:
            continue
        dq.input[2] = u8(dq.input[2])
        changed += 1
    for info in graph.value_info:
        if info.name in retyped:
            info.type.tensor_type.elem_type = TensorProto.UINT8
    used = {name for node in graph.node for name in node.input} | outputs
    unused = set(shifted) - used  # the int8 originals no node reads any more
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] in unused]:
        graph.node.remove(node)
    for tensor in [t for t in graph.initializer if t.name in unused]:
        graph.initializer.remove(tensor)
    return changed


def session(path: Path, options=None, providers: list[str] = ("CPUExecutionProvider",)):
    """An ONNX Runtime session of the model at `path`, rewritten by `to_u8` (its external data read in place)."""
    onnxruntime = require("onnxruntime", "ONNX Runtime sessions")
    onnx = require("onnx", "ONNX Runtime sessions")  # INT8 graphs run rewritten by onnx

    model = onnx.load(str(path), load_external_data=False)
    to_u8(model, str(Path(path).parent))
    options = options or onnxruntime.SessionOptions()
    options.add_session_config_entry(EXTERNAL_FOLDER, str(Path(path).parent))
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=list(providers))
