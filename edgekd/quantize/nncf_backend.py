"""Everything that touches NNCF: post-training quantization, the quantizer state a checkpoint stores, rebuilding
a quantized model from it, and the stripped (torch-native fake-quantize) model that exports to QDQ ONNX.

Choices, all for deployment:
- BatchNorm is folded into the convolutions before quantizing (models.fold.fold_batchnorm_in_place): the int8
  weights are then the ones a device runs, and the QDQ ONNX has no BatchNormalization left to re-fold.
- Symmetric int8 (NNCF's "performance" preset), per-channel weights, per-tensor activations, and every
  activation quantizer signed with zero point 0: TensorRT's explicit quantization accepts nothing else (NNCF
  would make activations after a ReLU unsigned, and per-channel before a depthwise convolution).
- A checkpoint holds the quantized model's state_dict and NNCF's own description of where its quantizers sit
  (nncf.torch.get_config, plain JSON types); loading rebuilds the zoo model, folds it the same way and inserts
  quantizers from that description, importing classes from nncf.torch.quantization.layers only. Nothing in a
  checkpoint is executed (torch.load(weights_only=True)).
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import os
import warnings
from typing import Any

import torch
from torch import nn

from ..errors import EdgekdError
from ..models import create_model
from ..models.fold import fold_batchnorm_in_place

EXTRA = "nncf"
INSTALL_HINT = f"pip install 'edgekd[{EXTRA}]'"
MODULES = ("nncf", "torchao")  # torchao: nncf.strip converts quantizers to torch.ao FakeQuantize modules
ALLOWED_MODULES = ("nncf.torch.quantization.layers",)  # the only classes a checkpoint may name
HOOKS_PREFIX = "__nncf_hooks."  # state_dict keys of the inserted quantizers
CALIBRATION_BATCH = 50  # NNCF calls the model once per dataset item: batches, not single images (~100x faster)
SCHEME = {"weights": "int8 symmetric per-channel (narrow range)",
          "activations": "int8 symmetric per-tensor, signed, zero point 0",
          "preset": "performance", "batchnorm": "folded into the convolutions before quantizing"}


def require() -> None:
    missing = [m for m in MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise EdgekdError(f"NNCF quantization needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                          f"not installed: {INSTALL_HINT}")


def _nncf():
    require()
    # NNCF sends usage telemetry unless NNCF_CI is set (openvino-telemetry, no opt-in dialog): edgekd never asks
    # its users for that, so it is off. Its first use compiles a C++ extension: ~40 s alone, longer on busy
    # cores than NNCF's default 60 s timeout allows.
    os.environ.setdefault("NNCF_CI", "1")
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")
    with _quiet():
        import nncf
        import nncf.torch

    nncf.set_log_level(logging.ERROR)
    return nncf


@contextlib.contextmanager
def _quiet():
    """NNCF draws progress bars and torch warns about extension builds: keep both out of the user's console."""
    sink = io.StringIO()
    build_log = logging.getLogger("torch.utils.cpp_extension")
    level = build_log.level
    build_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        build_log.setLevel(level)


def _extension_error(e: Exception) -> EdgekdError:
    from torch.utils.cpp_extension import _get_build_directory

    where = _get_build_directory("nncf/quantized_functions_cpu", verbose=False)
    return EdgekdError(f"NNCF could not build its C++ quantization extension in time ({type(e).__name__}): a build "
                       f"that was killed leaves a lock behind; remove {where} and retry, or raise "
                       "NNCF_EXTENSION_LOAD_TIMEOUT (seconds)")


def _run(fn, *args, **kwargs):
    from nncf.torch.extensions import ExtensionLoaderTimeoutException

    try:
        with _quiet():
            return fn(*args, **kwargs)
    except ExtensionLoaderTimeoutException as e:
        raise _extension_error(e) from None


def prepare(device: torch.device) -> None:
    """Builds NNCF's extension for `device` now, so a machine that cannot is a one-line error before anything is
    written (on CUDA NNCF compiles with nvcc, which a PyTorch install alone does not bring)."""
    nncf = _nncf()
    if device.type != "cuda":
        return
    try:
        _run(nncf.torch.force_build_cuda_extensions)
    except nncf.InstallationError:
        raise EdgekdError("NNCF could not compile its CUDA quantization extension (it needs the CUDA toolkit's nvcc "
                          "on PATH): install it, or quantize on the CPU with --device cpu") from None


def ptq(model: nn.Module, batches: list[torch.Tensor]) -> tuple[nn.Module, dict]:
    """NNCF post-training quantization of a copy of `model` (calibrated on normalised `batches`); returns the
    fake-quantized model and its quantization state (what a checkpoint stores under "quantization")."""
    nncf = _nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    qmodel = copy.deepcopy(model).cpu().eval()
    folded = fold_batchnorm_in_place(qmodel)
    advanced = AdvancedQuantizationParameters(activations_quantization_params=QuantizationParameters(per_channel=False))
    qmodel = _run(nncf.quantize, qmodel, nncf.Dataset(batches), preset=nncf.QuantizationPreset.PERFORMANCE,
                  target_device=nncf.TargetDevice.ANY, subset_size=len(batches), advanced_parameters=advanced)
    made_signed = _sign_activations(qmodel)
    state = {
        "tool": "nncf",
        "nncf_version": nncf.__version__,
        "scheme": SCHEME,
        "folded_batchnorm": [list(pair) for pair in folded],
        "config": _plain(nncf.torch.get_config(qmodel)),
        "made_signed": made_signed,
        "calibration_images": int(sum(len(b) for b in batches)),
    }
    attach(qmodel, state)
    return qmodel.eval(), state


def _sign_activations(qmodel: nn.Module) -> int:
    """Unsigned symmetric quantizers (after ReLU) become signed: TensorRT takes signed int8 only. Weight quantizers
    are signed already. Returns how many changed (the state_dict records it in their signed_tensor)."""
    from nncf.torch.function_hook.wrapper import get_hook_storage
    from nncf.torch.quantization.layers import SymmetricQuantizer

    changed = 0
    for _, module in get_hook_storage(qmodel).named_hooks():
        if isinstance(module, SymmetricQuantizer) and not module.signed:
            module.signed = True
            changed += 1
    return changed


def attach(qmodel: nn.Module, state: dict) -> None:
    """The quantization state travels with the model: the trainer's checkpoints (train.checkpoint.model_payload)
    then write it next to the weights, so every best.pt can be rebuilt."""
    qmodel.checkpoint_extra = {"quantization": state}


def _plain(value: Any) -> Any:
    """NNCF's config as plain JSON types (its enums are str subclasses; tuples become lists), the only kind of
    data a weights_only checkpoint may hold."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return str(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    raise EdgekdError(f"NNCF's quantizer config holds a {type(value).__name__}, which edgekd cannot store")


def _restored(config: dict) -> dict:
    """Lists in quantizer specs back to tuples: NNCF compares scale_shape with (1,) to tell per-tensor scales."""
    def tuples(v):
        return tuple(tuples(x) for x in v) if isinstance(v, list) else v

    return {"compression_state": [{**c, "module_config": {k: tuples(v) for k, v in c["module_config"].items()}}
                                  for c in config["compression_state"]]}


def rebuild(payload: dict, path: str = "checkpoint") -> nn.Module:
    """The fake-quantized model of a quantized checkpoint: zoo model, the same BatchNorm folding, NNCF's quantizers
    from the recorded config, then the stored weights and quantizer parameters."""
    state = payload["quantization"]
    nncf = _nncf()
    model = create_model(**payload["model_config"])
    folded = [list(pair) for pair in fold_batchnorm_in_place(model)]
    if folded != state["folded_batchnorm"]:
        raise EdgekdError(f"{path}: the model folds differently now ({len(folded)} BatchNorm layers, the checkpoint "
                          f"recorded {len(state['folded_batchnorm'])}): it was quantized with another edgekd version")
    try:
        with _quiet():
            qmodel = nncf.torch.load_from_config(model, _restored(state["config"]), allowed_modules=ALLOWED_MODULES)
        qmodel.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, KeyError, ValueError, nncf.InternalError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise EdgekdError(f"{path} does not rebuild as an NNCF-quantized {payload['model_config'].get('name')} "
                          f"({first})") from None
    attach(qmodel, state)
    return qmodel.eval()


def float_model(payload: dict) -> nn.Module:
    """The quantized checkpoint's float weights (the latent weights QAT trained) in the plain folded zoo model,
    no quantizers: the float counterpart the per-layer error report compares the int8 artifact with."""
    model = create_model(**payload["model_config"])
    fold_batchnorm_in_place(model)
    weights = {k: v for k, v in payload["state_dict"].items() if not k.startswith(HOOKS_PREFIX)}
    model.load_state_dict(weights, strict=True)
    return model.eval()


def strip(qmodel: nn.Module, example: torch.Tensor) -> nn.Module:
    """NNCF's quantizers replaced by torch-native FakeQuantize modules: the TorchScript exporter writes those as
    standard QuantizeLinear/DequantizeLinear pairs (NNCF's own modules export as a custom op ORT rejects)."""
    nncf = _nncf()
    return _run(nncf.strip, qmodel, do_copy=True, example_input=example).eval()


def weight_quantizers(qmodel: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """{hook name: parameter path} of the quantizers that act on weights (the others act on activations)."""
    from nncf.torch.function_hook.hook_storage import decode_hook_name
    from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph
    from nncf.torch.function_hook.wrapper import get_hook_storage
    from nncf.torch.model_graph_manager import get_const_node, split_const_name

    with _quiet():
        graph = build_nncf_graph(qmodel, example)
    found = {}
    for name, _ in get_hook_storage(qmodel).named_hooks():
        hook_type, op_name, port = decode_hook_name(name)
        if hook_type != "pre_hooks":
            continue
        const = get_const_node(graph.get_node_by_name(op_name), port, graph)
        if const is not None:
            module, attr = split_const_name(const.layer_attributes.name)
            found[name] = f"{module}.{attr}" if module else attr
    return found


@torch.no_grad()
def grid_weights_model(qmodel: nn.Module, payload: dict, example: torch.Tensor) -> tuple[nn.Module, int]:
    """The plain folded zoo model with every quantized weight replaced by NNCF's fake-quantized value (on its
    learned int8 grid) and no activation quantizers: what onnx2tf can take from an NNCF model. Returns the
    model and how many weight tensors were put on the grid."""
    from nncf.torch.function_hook.wrapper import get_hook_storage

    model = float_model(payload)
    hooks = dict(get_hook_storage(qmodel).named_hooks())
    params = dict(qmodel.named_parameters())
    weights = weight_quantizers(qmodel, example)
    for hook, path in weights.items():
        quantizer = hooks[hook].eval()
        with _quiet():
            model.get_parameter(path).copy_(quantizer.quantize(params[path].detach(), execute_traced_op_as_identity=False))
    return model.eval(), len(weights)
