"""Per-layer error of an int8 artifact: each layer's output in the quantized model against the same layer of
its float counterpart, on the verification images.

- QDQ ONNX: the float ONNX and the QDQ ONNX share node names (the QDQ graph is the float graph with
  QuantizeLinear/DequantizeLinear pairs inserted), so every float node's output is made a graph output in both
  and compared. Both run in ONNX Runtime with graph optimizations off, so each value is exactly what the graph
  says (ORT's fusions would fold some of them away).
- TFLite: onnx2tf writes the float32 and the int8 model from one TensorFlow graph, so their ops correspond
  one to one; LiteRT (reference kernels, `experimental_preserve_all_tensors`) keeps every intermediate tensor
  and int8 ones are dequantized with their scale and zero point. TensorFlow names are mapped back to the ONNX
  layer names where the convolutions of both line up (the same count of each kind, in order).

Metric: relative error = ||q - f|| / ||f|| of a layer's output over all images. Errors accumulate along the
network, so layers are ranked by the error they *add*: their relative error minus the largest one among the
layers that feed them. That names the layer where the damage starts, not the ones downstream of it.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

MAX_IMAGES = 64  # enough to rank layers; keeps the intermediate tensors small
WORST = 3  # layers named in messages and the summary
TABLE_ROWS = 10
METRIC = ("relative error ||q - f|| / ||f|| of each layer's output over the images; added = its relative error "
          "minus the largest one among the layers feeding it (where the damage starts)")


class _Accumulator:
    def __init__(self):
        self.diff2: dict[str, float] = {}
        self.ref2: dict[str, float] = {}
        self.max_abs: dict[str, float] = {}

    def add(self, key: str, f: np.ndarray, q: np.ndarray) -> None:
        f, q = f.astype(np.float64), q.astype(np.float64)
        self.diff2[key] = self.diff2.get(key, 0.0) + float(np.square(q - f).sum())
        self.ref2[key] = self.ref2.get(key, 0.0) + float(np.square(f).sum())
        self.max_abs[key] = max(self.max_abs.get(key, 0.0), float(np.abs(q - f).max(initial=0.0)))

    def rel(self, key: str) -> float:
        return float(np.sqrt(self.diff2[key] / self.ref2[key])) if self.ref2[key] > 0 else float(np.sqrt(self.diff2[key]))


def onnx_layer_name(node_name: str, op_type: str) -> str:
    """TorchScript ONNX node names carry the module scope: '/blocks/blocks.0/blocks.0.0/conv_dw/conv/Conv'
    -> 'blocks.0.0.conv_dw.conv (Conv)'."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 2:
        return f"{node_name or op_type} ({op_type})"
    path = ""
    for part in parts[:-1]:
        path = part if (not path or part.startswith(path + ".")) else f"{path}.{part}"
    suffix = parts[-1]
    op = suffix if suffix.split("_")[0] == op_type else op_type
    return f"{path} ({op})"


def _ranked(rows: list[dict], images: int, what: str) -> dict:
    worst = sorted(rows, key=lambda r: -r["added"])[:WORST]
    return {"compared": what, "images": images, "metric": METRIC, "layers": rows,
            "worst": [r["layer"] for r in worst]}


def onnx_layer_errors(float_onnx: Path, quant_onnx: Path, x: np.ndarray) -> dict:
    """Every float node matched by name (and op type) in the QDQ graph, run on up to MAX_IMAGES images `x`."""
    import onnx

    fmodel, qmodel = onnx.load(str(float_onnx)), onnx.load(str(quant_onnx))
    qnodes = {n.name: n for n in qmodel.graph.node}
    pairs = []  # (float node, float output, quant output)
    for node in fmodel.graph.node:
        other = qnodes.get(node.name)
        if node.name and other is not None and other.op_type == node.op_type and node.output and other.output:
            pairs.append((node, node.output[0], other.output[0]))
    images = x[:MAX_IMAGES]
    fvals = _run_onnx_with_outputs(fmodel, [p[1] for p in pairs], images)
    qvals = _run_onnx_with_outputs(qmodel, [p[2] for p in pairs], images)
    acc = _Accumulator()
    for node, fo, qo in pairs:
        for f, q in zip(fvals[fo], qvals[qo]):
            acc.add(node.name, f, q)
    producer = {out: n for n in fmodel.graph.node for out in n.output}
    compared = {n.name for n, _, _ in pairs}
    rel = {name: acc.rel(name) for name in compared}

    def feeding_error(tensor: str, seen: set) -> float:
        node = producer.get(tensor)
        if node is None or node.name in seen:
            return 0.0  # a graph input or an initializer
        seen.add(node.name)
        if node.name in compared:
            return rel[node.name]
        return max((feeding_error(t, seen) for t in node.input), default=0.0)

    rows = []
    for node, _, _ in pairs:
        upstream = max((feeding_error(t, set()) for t in node.input), default=0.0)
        rows.append({"layer": onnx_layer_name(node.name, node.op_type), "node": node.name, "op": node.op_type,
                     "rel_error": rel[node.name], "added": rel[node.name] - upstream,
                     "max_abs": acc.max_abs[node.name]})
    return _ranked(rows, len(images), "float ONNX vs QDQ ONNX in ONNX Runtime (graph optimizations off)")


def _run_onnx_with_outputs(model, names: list[str], x: np.ndarray) -> dict[str, list[np.ndarray]]:
    import onnx
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())
    present = {o.name for o in model.graph.output}
    for name in dict.fromkeys(names):
        if name not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    values: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for image in x:
        result = dict(zip(outputs, session.run(None, {input_name: image[None]})))
        for n in names:
            values[n].append(result[n])
    return values


def _tf_name(name: str) -> str:
    """'model_2/tf.math.add/Add;model_2/tf.nn.convolution/convolution;Const_88' -> 'tf.math.add/Add;tf.nn...'"""
    parts = [re.sub(r"^model(_\d+)?/", "", p) for p in name.split(";") if p and not re.fullmatch(r"Const(_\d+)?", p)]
    return ";".join(parts) or name


_CONV_KINDS = {"CONV_2D": "conv", "DEPTHWISE_CONV_2D": "depthwise", "FULLY_CONNECTED": "dense"}


def _onnx_conv_names(onnx_path: Path | None) -> dict[str, list[str]]:
    """The ONNX model's convolution-like layers by kind, in graph order (for naming TFLite ops)."""
    if onnx_path is None:
        return {}
    import onnx

    model = onnx.load(str(onnx_path))
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    kinds: dict[str, list[str]] = {"conv": [], "depthwise": [], "dense": []}
    for node in model.graph.node:
        if node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            weight = shapes.get(node.input[1], [])
            kind = "depthwise" if group > 1 and weight and weight[1] == 1 else "conv"
            kinds[kind].append(onnx_layer_name(node.name, node.op_type))
        elif node.op_type in ("Gemm", "MatMul"):
            kinds["dense"].append(onnx_layer_name(node.name, node.op_type))
    return kinds


def tflite_layer_errors(float_tflite: Path, int8_tflite: Path, x_nhwc: np.ndarray, onnx_path: Path | None = None) -> dict:
    """Every op output of the int8 model against the same op's output in the float32 model of the same
    conversion; up to MAX_IMAGES float NHWC images `x_nhwc` (normalised)."""
    from .verify import LiteRT, quantize

    images = x_nhwc[:MAX_IMAGES]
    f_rt, q_rt = LiteRT(float_tflite, kernels="reference", preserve=True), LiteRT(int8_tflite, kernels="reference", preserve=True)
    f_ops, q_ops = f_rt.interpreter._get_ops_details(), q_rt.interpreter._get_ops_details()
    f_tensors = {t["index"]: t for t in f_rt.interpreter.get_tensor_details()}
    q_tensors = {t["index"]: t for t in q_rt.interpreter.get_tensor_details()}
    # ops correspond in order; an int8 model may add QUANTIZE/DEQUANTIZE at its ends, which are skipped
    q_main = [op for op in q_ops if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE")]
    f_main = [op for op in f_ops if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE")]
    pairs = []
    for fo, qo in zip(f_main, q_main):
        if fo["op_name"] != qo["op_name"]:
            break  # the graphs diverge: compare only the common prefix
        ft, qt = f_tensors[fo["outputs"][0]], q_tensors[qo["outputs"][0]]
        if list(ft["shape"]) == list(qt["shape"]):
            pairs.append((fo, ft, qt))
    acc = _Accumulator()
    q_scale = {qt["index"]: qt["quantization"] for _, _, qt in pairs}
    in_q = q_rt.input
    for image in images:
        f_rt.interpreter.set_tensor(f_rt.input["index"], image[None].astype(np.float32))
        f_rt.interpreter.invoke()
        q_in = image[None] if in_q["dtype"] == np.float32 else quantize(image[None], *in_q["quantization"], in_q["dtype"])
        q_rt.interpreter.set_tensor(in_q["index"], q_in)
        q_rt.interpreter.invoke()
        for fo, ft, qt in pairs:
            f = f_rt.interpreter.get_tensor(ft["index"])
            q = q_rt.interpreter.get_tensor(qt["index"])
            scale, zero_point = q_scale[qt["index"]]
            if q.dtype != np.float32 and scale:
                q = (q.astype(np.float32) - zero_point) * scale
            acc.add(str(ft["index"]), f, q)
    onnx_names = _onnx_conv_names(onnx_path)
    by_kind = {kind: [fo for fo, _, _ in pairs if _CONV_KINDS.get(fo["op_name"]) == kind] for kind in onnx_names}
    names = {}
    for kind, ops in by_kind.items():
        if ops and len(ops) == len(onnx_names[kind]):
            names.update({id(op): n for op, n in zip(ops, onnx_names[kind])})
    producer = {t: fo for fo, _, _ in pairs for t in fo["outputs"]}
    all_producers = {t: op for op in f_ops for t in op["outputs"]}
    rel = {ft["index"]: acc.rel(str(ft["index"])) for _, ft, _ in pairs}

    def feeding_error(tensor: int, seen: set) -> float:
        if tensor in producer:
            return rel[producer[tensor]["outputs"][0]]
        op = all_producers.get(tensor)
        if op is None or op["index"] in seen:
            return 0.0
        seen.add(op["index"])
        return max((feeding_error(t, seen) for t in op["inputs"] if t >= 0), default=0.0)

    rows = []
    for fo, ft, _ in pairs:
        upstream = max((feeding_error(t, set()) for t in fo["inputs"] if t >= 0), default=0.0)
        tf_name = _tf_name(ft["name"])
        layer = f"{names[id(fo)]} -> {fo['op_name']}" if id(fo) in names else f"#{fo['index']} {fo['op_name']} {tf_name}"
        rows.append({"layer": layer, "node": tf_name, "op": fo["op_name"], "rel_error": rel[ft["index"]],
                     "added": rel[ft["index"]] - upstream, "max_abs": acc.max_abs[str(ft["index"])]})
    return _ranked(rows, len(images), "float32 vs int8 TFLite of one onnx2tf conversion in LiteRT (reference kernels)")


def hint(report: dict | None) -> str:
    if not report or not report.get("worst"):
        return ""
    rows = {r["layer"]: r for r in report["layers"]}
    named = ", ".join(f"{name} (rel. error {rows[name]['rel_error']:.3g}, +{rows[name]['added']:.3g})"
                      for name in report["worst"])
    return f"; worst layers: {named} (layer_errors.md)"


def markdown(report: dict, title: str) -> str:
    """The TABLE_ROWS layers that add the most error, then where to find all of them."""
    rows = sorted(report["layers"], key=lambda r: -r["added"])[:TABLE_ROWS]
    lines = [f"# Per-layer int8 error: {title}", "",
             f"{report['compared']}, {report['images']} verification images. {METRIC[0].upper()}{METRIC[1:]}.", "",
             "| rank | layer | op | relative error | added | max abs error |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['layer']} | {r['op']} | {r['rel_error']:.4f} | {r['added']:+.4f} | {r['max_abs']:.4g} |")
    lines += ["", f"All {len(report['layers'])} compared layers, in graph order: manifest.json, `layer_errors.layers`.", ""]
    return "\n".join(lines)
