"""The operator graph a profile is computed on: per-layer MACs, parameters and activation tensors.

Two sources give the same `Graph`:
- `trace_model(model, resolution)`: a PyTorch model traced with torch.fx and lowered the way ONNX -> onnx2tf ->
  TFLite lowers it (BatchNorm folded; ReLU/ReLU6 and a constant add fused into the producing conv; a strided
  conv with symmetric padding becomes PAD + VALID conv because TF's SAME pads asymmetrically; hard-swish is one
  HARD_SWISH op; flatten/dropout/identity cost nothing). This is the estimate, available before any export.
- `read_tflite(path)`: the graph of an exported .tflite flatbuffer, exactly as the interpreter will run it.

Tensors are NHWC (or N x features); `elements` excludes nothing, bytes depend on the deployed precision.
"""
from __future__ import annotations

import copy
import math
import operator
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import EdgekdError
from ..models.layers import HardSigmoid, HardSwish

BYTES_PER_ELEMENT = {"int8": 1, "fp16": 2, "fp32": 4}
# ops whose cost is a multiply-accumulate per weight use; the rest are elementwise (counted in `elements_processed`)
MAC_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


@dataclass
class Op:
    name: str  # module path (traced) or output tensor name (.tflite)
    kind: str  # TFLite builtin name: CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, ADD, MUL, MEAN, PAD, ...
    inputs: list[str]  # activation tensors read (constants are not listed)
    output: str
    macs: int = 0
    weight_elements: int = 0  # kernel elements (int8 in a full-integer model)
    bias_elements: int = 0  # bias elements (int32 in a full-integer model)
    quant_channels: int = 0  # per-channel quantisation channels (output channels of a conv/dw conv)
    elements_processed: int = 0  # input elements an elementwise/pooling op reads
    converter_added: bool = False  # work the TFLite converter adds beyond the PyTorch model (see HardSwish after FC)

    @property
    def params(self) -> int:
        return self.weight_elements + self.bias_elements


@dataclass
class Graph:
    name: str
    source: str  # "traced" or "tflite"
    tensors: dict[str, Tensor]
    ops: list[Op]
    inputs: list[str]
    outputs: list[str]
    notes: list[str] = field(default_factory=list)
    constant_tensors: int | None = None  # exact count when read from a .tflite; estimated from the ops otherwise
    constant_bytes: int | None = None  # exact, when read from a .tflite (the converter shares identical buffers)

    @property
    def macs(self) -> int:
        return sum(op.macs for op in self.ops)

    @property
    def params(self) -> int:
        return sum(op.params for op in self.ops)

    @property
    def model_macs(self) -> int:
        """MACs of the PyTorch model itself (what FLOP counters report); `macs` is what the device runs."""
        return sum(op.macs for op in self.ops if not op.converter_added)

    def op_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(op.kind for op in self.ops).items()))

    def weight_bytes(self, precision: str) -> int:
        """Constant bytes at the deployed precision (int8: int8 kernels, int32 biases)."""
        weights = sum(op.weight_elements for op in self.ops)
        biases = sum(op.bias_elements for op in self.ops)
        if precision == "int8":
            return weights + 4 * biases
        return (weights + biases) * BYTES_PER_ELEMENT[precision]

    def lifetimes(self) -> dict[str, tuple[int, int]]:
        """{tensor: (first op, last op)} as TFLite Micro assigns them (inputs from 0, outputs to the end)."""
        last_op = len(self.ops) - 1
        first: dict[str, int] = {name: 0 for name in self.inputs}
        last: dict[str, int] = {}
        for i, op in enumerate(self.ops):
            first.setdefault(op.output, i)
            for name in op.inputs:
                last[name] = i
        for name in self.outputs:
            last[name] = last_op
        return {name: (first[name], last.get(name, first[name])) for name in first}


# ------------------------------------------------------------------------------------------- tracing PyTorch

class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # kept whole so they map to one TFLite op each, as onnx2tf's pattern matching does
        return isinstance(m, (HardSwish, HardSigmoid)) or super().is_leaf_module(m, qualname)


_ALIAS_MODULES = (nn.Identity, nn.Dropout, nn.Flatten)
_ALIAS_FUNCTIONS = {torch.flatten, torch.reshape, F.dropout}
_ALIAS_METHODS = {"flatten", "view", "reshape", "contiguous", "squeeze", "unsqueeze"}
_FUSABLE_ACTS = (nn.ReLU, nn.ReLU6)
_FUSABLE_ACT_FUNCTIONS = {F.relu, F.relu6, torch.relu}
_ACT_MODULES = {nn.ReLU: "RELU", nn.ReLU6: "RELU6", nn.Sigmoid: "LOGISTIC", nn.Tanh: "TANH",
                HardSwish: "HARD_SWISH", nn.Hardswish: "HARD_SWISH"}
_BINARY = {operator.add: "ADD", torch.add: "ADD", operator.mul: "MUL", torch.mul: "MUL",
           operator.sub: "SUB", torch.sub: "SUB", operator.truediv: "MUL", torch.div: "MUL"}


def _nhwc(shape: Iterable[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    return (shape[0], *shape[2:], shape[1]) if len(shape) == 4 else shape


def trace_model(model: nn.Module, resolution: int, channels: int | None = None, name: str | None = None) -> Graph:
    """The TFLite-like operator graph of `model` for a (1, C, R, R) input."""
    from torch.fx.passes.shape_prop import ShapeProp

    config = getattr(model, "model_config", {}) or {}
    channels = channels or int(config.get("in_chans", 3))
    name = name or config.get("name", type(model).__name__)
    from torch.fx.experimental.optimization import fuse

    try:
        model = copy.deepcopy(model).eval()
        gm = fuse(fx.GraphModule(model, _Tracer().trace(model)), no_trace=True)  # BatchNorm folded
        ShapeProp(gm).propagate(torch.zeros(1, channels, resolution, resolution))
    except Exception as e:  # noqa: BLE001 - any tracing failure has the same fix
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise EdgekdError(f"cannot profile {name}: torch.fx could not trace it ({first}); profile its exported "
                          ".tflite instead") from None
    return _Lowering(gm, name, resolution).run()


class _Lowering:
    def __init__(self, gm: fx.GraphModule, name: str, resolution: int):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.graph = Graph(f"{name}@{resolution}", "traced", {}, [], [], [])
        self.tensor_of: dict[fx.Node, str] = {}  # fx node -> activation tensor it evaluates to
        self.producer: dict[str, Op] = {}

    def run(self) -> Graph:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self._new_tensor(node, "input")
                self.graph.inputs.append("input")
            elif node.op == "output":
                outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
                self.graph.outputs.extend(self.tensor_of[n] for n in outs)
            elif node.op == "get_attr":
                continue  # constants
            else:
                self._lower(node)
        return self.graph

    # -- helpers
    def _shape(self, node: fx.Node) -> tuple[int, ...]:
        return _nhwc(node.meta["tensor_meta"].shape)

    def _new_tensor(self, node: fx.Node, name: str | None = None) -> str:
        name = name or node.name
        self.graph.tensors[name] = Tensor(name, self._shape(node))
        self.tensor_of[node] = name
        return name

    def _inputs(self, node: fx.Node) -> list[str]:
        return [self.tensor_of[a] for a in node.all_input_nodes if a in self.tensor_of]

    def _add(self, node: fx.Node, kind: str, inputs: list[str], label: str | None = None, **costs) -> Op:
        out = self._new_tensor(node)
        op = Op(label or node.name, kind, inputs, out, **costs)
        self.graph.ops.append(op)
        self.producer[out] = op
        return op

    def _alias(self, node: fx.Node) -> None:
        self.tensor_of[node] = self.tensor_of[node.all_input_nodes[0]]

    def _fusable_into_producer(self, node: fx.Node) -> bool:
        """True when `node` can fold into the conv/FC that produced its only input (TFLite fused activation)."""
        src = node.all_input_nodes[0]
        producer = self.producer.get(self.tensor_of.get(src, ""))
        return producer is not None and producer.kind in MAC_OPS and len(src.users) == 1

    # -- lowering
    def _lower(self, node: fx.Node) -> None:
        if node.op == "call_module":
            self._lower_module(node, self.modules[node.target])
        elif node.op == "call_function":
            self._lower_function(node)
        elif node.op == "call_method":
            self._lower_method(node)

    def _lower_module(self, node: fx.Node, m: nn.Module) -> None:
        path = str(node.target)
        inputs = self._inputs(node)
        if isinstance(m, _ALIAS_MODULES):
            self._alias(node)
        elif isinstance(m, nn.Conv2d):
            self._conv(node, m, path, inputs)
        elif isinstance(m, nn.Linear):
            bias = m.out_features if m.bias is not None else 0
            self._add(node, "FULLY_CONNECTED", inputs, path, macs=m.in_features * m.out_features,
                      weight_elements=m.weight.numel(), bias_elements=bias)
        elif isinstance(m, _FUSABLE_ACTS) and self._fusable_into_producer(node):
            self._alias(node)
        elif isinstance(m, (HardSwish, nn.Hardswish)) and self._fusable_into_producer(node) \
                and self.producer[inputs[0]].kind == "FULLY_CONNECTED":
            # the TFLite converter has no 2-D HARD_SWISH: x * relu6(x + 3) / 6 becomes a second FC with the
            # +3 and /6 folded into it (fused relu6) and a MUL of the two FC outputs
            fc = self.producer[inputs[0]]
            twin = f"{node.name}_fc"
            self.graph.tensors[twin] = Tensor(twin, self.graph.tensors[fc.output].shape)
            twin_op = Op(f"{fc.name}.hswish_fc", fc.kind, list(fc.inputs), twin, macs=fc.macs,
                         weight_elements=fc.weight_elements, bias_elements=fc.bias_elements, converter_added=True)
            self.graph.ops.append(twin_op)
            self.producer[twin] = twin_op
            fc.bias_elements = 0
            self._add(node, "MUL", [fc.output, twin], path, elements_processed=self._elements(inputs))
        elif isinstance(m, HardSigmoid):
            # relu6(x + 3) / 6: the add and relu6 fold into a producing conv, the / 6 stays a MUL
            kinds = ["MUL"] if self._fusable_into_producer(node) else ["ADD", "RELU6", "MUL"]
            self._chain(node, kinds, inputs, path)
        elif isinstance(m, nn.SiLU):
            self._chain(node, ["LOGISTIC", "MUL"], inputs, path, keep_input=True)
        elif type(m) in _ACT_MODULES:
            self._add(node, _ACT_MODULES[type(m)], inputs, path, elements_processed=self._elements(inputs))
        elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            kind = "MEAN" if isinstance(m, nn.AdaptiveAvgPool2d) else "MAX_POOL_2D"
            self._add(node, kind, inputs, path, elements_processed=self._elements(inputs))
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            kind = "MAX_POOL_2D" if isinstance(m, nn.MaxPool2d) else "AVERAGE_POOL_2D"
            inputs = self._pad_if_asymmetric(node, m.padding, m.stride, inputs, path)
            self._add(node, kind, inputs, path, elements_processed=self._elements(inputs))
        elif isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)):
            self._add(node, "PAD", inputs, path, elements_processed=self._elements(inputs))
        elif isinstance(m, nn.BatchNorm2d):  # not after a conv, so not folded: a scale and a shift
            self._chain(node, ["MUL", "ADD"], inputs, path)
        else:
            raise EdgekdError(f"cannot profile layer {path} ({type(m).__name__}): the profiler has no cost model "
                              "for it; profile the exported .tflite instead")

    def _conv(self, node: fx.Node, m: nn.Conv2d, path: str, inputs: list[str]) -> None:
        inputs = self._pad_if_asymmetric(node, m.padding, m.stride, inputs, path)
        out = self._shape(node)
        depthwise = m.groups > 1 and m.groups == m.in_channels
        if m.groups > 1 and not depthwise:
            raise EdgekdError(f"cannot profile layer {path}: grouped convolution (groups={m.groups}) has no TFLite "
                              "builtin; use groups=1 or depthwise")
        kernel = math.prod(m.kernel_size)
        macs = math.prod(out) * kernel * (m.in_channels // m.groups)
        bias = m.out_channels if m.bias is not None else 0
        self._add(node, "DEPTHWISE_CONV_2D" if depthwise else "CONV_2D", inputs, path, macs=macs,
                  weight_elements=m.weight.numel(), bias_elements=bias, quant_channels=m.out_channels)

    def _pad_if_asymmetric(self, node: fx.Node, padding, stride, inputs: list[str], path: str) -> list[str]:
        """onnx2tf writes an explicit PAD when PyTorch's symmetric padding differs from TF's SAME (strided)."""
        padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
        stride = (stride, stride) if isinstance(stride, int) else tuple(stride or (1, 1))
        if not any(padding) or all(s == 1 for s in stride):
            return inputs
        n, h, w, c = self.graph.tensors[inputs[0]].shape
        name = f"{node.name}_pad"
        self.graph.tensors[name] = Tensor(name, (n, h + 2 * padding[0], w + 2 * padding[1], c))
        op = Op(f"{path}.pad", "PAD", inputs[:1], name, elements_processed=n * h * w * c)
        self.graph.ops.append(op)
        self.producer[name] = op
        return [name]

    def _chain(self, node: fx.Node, kinds: list[str], inputs: list[str], path: str, keep_input: bool = False) -> None:
        """Several TFLite ops for one PyTorch layer; intermediates get their own tensors."""
        shape = self._shape(node)
        current = inputs
        for i, kind in enumerate(kinds):
            if i == len(kinds) - 1:
                reads = current + (inputs if keep_input else [])
                self._add(node, kind, reads, f"{path}.{kind.lower()}", elements_processed=self._elements(current))
            else:
                name = f"{node.name}_{i}"
                self.graph.tensors[name] = Tensor(name, shape)
                op = Op(f"{path}.{kind.lower()}", kind, current, name, elements_processed=self._elements(current))
                self.graph.ops.append(op)
                self.producer[name] = op
                current = [name]

    def _elements(self, inputs: list[str]) -> int:
        return max((self.graph.tensors[t].elements for t in inputs), default=0)

    def _lower_function(self, node: fx.Node) -> None:
        fn = node.target
        inputs = self._inputs(node)
        if fn in _ALIAS_FUNCTIONS or fn is operator.getitem:
            self._alias(node)
        elif fn in _FUSABLE_ACT_FUNCTIONS and self._fusable_into_producer(node):
            self._alias(node)
        elif fn in (F.relu, torch.relu, F.relu6):
            self._add(node, "RELU" if fn is not F.relu6 else "RELU6", inputs, elements_processed=self._elements(inputs))
        elif fn in _BINARY:
            if len(inputs) == 1 and _BINARY[fn] in ("ADD", "SUB") and self._fusable_into_producer(node):
                self._alias(node)  # a constant added to a conv output folds into its bias
            else:
                self._add(node, _BINARY[fn], inputs, elements_processed=self._elements(inputs))
        elif fn in (torch.sigmoid, F.sigmoid):
            self._add(node, "LOGISTIC", inputs, elements_processed=self._elements(inputs))
        elif fn in (F.adaptive_avg_pool2d, torch.mean):
            self._add(node, "MEAN", inputs, elements_processed=self._elements(inputs))
        elif fn is torch.cat:
            self._add(node, "CONCATENATION", inputs, elements_processed=self._elements(inputs))
        else:
            raise EdgekdError(f"cannot profile {node.name} ({getattr(fn, '__name__', fn)}): the profiler has no cost "
                              "model for it; profile the exported .tflite instead")

    def _lower_method(self, node: fx.Node) -> None:
        inputs = self._inputs(node)
        if node.target in _ALIAS_METHODS:
            self._alias(node)
        elif node.target == "mean":
            self._add(node, "MEAN", inputs, elements_processed=self._elements(inputs))
        elif node.target in ("relu", "relu_") and self._fusable_into_producer(node):
            self._alias(node)
        elif node.target in ("add", "mul", "sigmoid", "relu", "relu_"):
            kind = {"add": "ADD", "mul": "MUL", "sigmoid": "LOGISTIC"}.get(node.target, "RELU")
            self._add(node, kind, inputs, elements_processed=self._elements(inputs))
        else:
            raise EdgekdError(f"cannot profile {node.name} (tensor.{node.target}): the profiler has no cost model "
                              "for it; profile the exported .tflite instead")


# ------------------------------------------------------------------------------------------- reading .tflite

def read_tflite(path: Path) -> Graph:
    """The operator graph of a .tflite file (first subgraph), with MACs from the tensor shapes."""
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema

    path = Path(path)
    try:
        model = schema.Model.GetRootAsModel(path.read_bytes(), 0)
        graph = model.Subgraphs(0)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails anywhere in the flatbuffer
        raise EdgekdError(f"{path} is not a readable .tflite flatbuffer ({type(e).__name__}): re-export it") from None
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}

    def tensor(i: int) -> tuple[Tensor, bool]:
        t = graph.Tensors(i)
        shape = tuple(int(s) for s in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        const = model.Buffers(t.Buffer()).DataLength() > 0
        return Tensor((t.Name() or b"").decode() or f"t{i}", shape), const

    tensors: dict[str, Tensor] = {}
    key = {}  # tensor index -> unique name
    for i in range(graph.TensorsLength()):
        t, const = tensor(i)
        if not const:
            name = t.name if t.name not in tensors else f"{t.name}#{i}"
            tensors[name] = Tensor(name, t.shape)
            key[i] = name
    ops = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        kind = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "UNKNOWN")
        ins = [op.Inputs(j) for j in range(op.InputsLength())]
        outs = [op.Outputs(j) for j in range(op.OutputsLength())]
        consts = [tensor(j)[0] for j in ins if j >= 0 and j not in key]
        acts = [key[j] for j in ins if j in key]
        out = tensors[key[outs[0]]]
        costs: dict = {}
        if kind in MAC_OPS and consts:
            weight = consts[0]
            bias = consts[1] if len(consts) > 1 else None
            if kind == "CONV_2D":  # weight (Cout, kh, kw, Cin)
                costs["macs"] = math.prod(out.shape) * math.prod(weight.shape[1:])
            elif kind == "DEPTHWISE_CONV_2D":  # weight (1, kh, kw, Cout)
                costs["macs"] = math.prod(out.shape) * weight.shape[1] * weight.shape[2]
            else:  # FULLY_CONNECTED weight (out, in)
                costs["macs"] = math.prod(out.shape) * weight.shape[-1]
            costs["weight_elements"] = weight.elements
            costs["bias_elements"] = bias.elements if bias is not None else 0
            costs["quant_channels"] = {"CONV_2D": weight.shape[0], "DEPTHWISE_CONV_2D": weight.shape[-1]}.get(kind, 0)
        else:
            costs["elements_processed"] = max((tensors[a].elements for a in acts), default=0)
        ops.append(Op(out.name, kind, acts, out.name, **costs))
    inputs = [key[graph.Inputs(j)] for j in range(graph.InputsLength())]
    outputs = [key[graph.Outputs(j)] for j in range(graph.OutputsLength())]
    buffers = {graph.Tensors(i).Buffer() for i in range(graph.TensorsLength())}
    return Graph(path.name, "tflite", tensors, ops, inputs, outputs,
                 constant_tensors=graph.TensorsLength() - len(tensors),
                 constant_bytes=sum(model.Buffers(b).DataLength() for b in buffers))
