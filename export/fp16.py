"""fp32 -> fp16 ONNX conversion that keeps the graph's uint8 input and float32 output.

The weights and activations become float16 (half the file, tensor cores on a GPU); the I/O
contract does not change, so clients and Triton configs are the same for every precision.
Converters, in order of preference: ``onnxconverter_common.float16`` (if installed), the copy
inside ``onnxruntime.transformers`` (ships with onnxruntime), else ``convert_graph_fp16`` below.
The final L2 normalisation stays in float32: a sum of squares of 512-2048 values can overflow
float16's 65504.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Ops kept in float32: the L2 normalisation at the end of the graph (ReduceL2, its eps Clip,
# the Expand of the norm and the Div by it).
KEEP_FP32_OPS = ["ReduceL2", "Clip", "Expand", "Div"]


def _library_converter() -> Callable[..., onnx.ModelProto] | None:
    try:
        from onnxconverter_common.float16 import convert_float_to_float16
    except ImportError:
        try:
            from onnxruntime.transformers.float16 import convert_float_to_float16
        except ImportError:
            return None
    return convert_float_to_float16  # type: ignore[no-any-return]


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of ``model`` with unchanged input/output types."""
    convert = _library_converter()
    if convert is None:
        return convert_graph_fp16(model)
    converted = convert(model, keep_io_types=True, op_block_list=KEEP_FP32_OPS)
    # The converters append their Cast nodes at the end, sometimes twice.
    drop_duplicate_nodes(converted.graph)
    topological_sort(converted.graph)
    return converted


def drop_duplicate_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes that repeat an earlier node's outputs with the same op and inputs."""
    seen: dict[tuple[str, ...], onnx.NodeProto] = {}
    keep = []
    for node in graph.node:
        key = tuple(node.output)
        first = seen.get(key)
        if first is None:
            seen[key] = node
            keep.append(node)
        elif (first.op_type, list(first.input), list(first.attribute)) != (node.op_type, list(node.input),
                                                                            list(node.attribute)):
            raise ValueError(f"two different nodes write {key}: {first.name} and {node.name}")
    if len(keep) != len(graph.node):
        copies = [onnx.NodeProto() for _ in keep]
        for copy, node in zip(copies, keep, strict=True):
            copy.CopyFrom(node)
        del graph.node[:]
        graph.node.extend(copies)


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` in place so every node comes after the producers of its inputs."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        remaining = [n for n in pending if not all(i in ready for i in n.input)]
        progressed = [n for n in pending if all(i in ready for i in n.input)]
        if not progressed:
            missing = sorted({i for n in remaining for i in n.input if i not in ready})
            raise ValueError(f"graph has a cycle or dangling inputs: {missing[:5]}")
        for node in progressed:
            ordered.append(node)
            ready.update(node.output)
        pending = remaining
    copies = [onnx.NodeProto() for _ in ordered]
    for copy, node in zip(copies, ordered, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def _fp16_tensor(tensor: TensorProto) -> TensorProto:
    if tensor.data_type != TensorProto.FLOAT:
        return tensor
    array = numpy_helper.to_array(tensor).astype(np.float16)
    return numpy_helper.from_array(array, tensor.name)


def convert_graph_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The small fallback converter, for a graph whose only float input is made by a Cast.

    float32 initializers and Constant tensors become float16, ``Cast(to=FLOAT)`` becomes
    ``Cast(to=FLOAT16)``, and each float32 graph output gets a Cast back to float32. Shapes
    are re-inferred. Works for the encoder graph (uint8 in, Conv/Relu/Add/Pool, normalise).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for i, init in enumerate(graph.initializer):
        graph.initializer[i].CopyFrom(_fp16_tensor(init))
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.type == onnx.AttributeProto.TENSOR:
                attr.t.CopyFrom(_fp16_tensor(attr.t))
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
    for output in graph.output:
        if output.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        inner = f"{output.name}_fp16"
        for node in graph.node:
            node.output[:] = [inner if o == output.name else o for o in node.output]
            node.input[:] = [inner if i == output.name else i for i in node.input]
        graph.node.append(helper.make_node("Cast", [inner], [output.name], to=TensorProto.FLOAT))
    del graph.value_info[:]
    return onnx.shape_inference.infer_shapes(out, strict_mode=True)
