"""Loading any model checkpoint, float or NNCF-quantized: what export and profile use instead of
train.checkpoint.load_model, which knows float models only (it sits below this layer)."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..train.checkpoint import load_model, read_checkpoint, resolve_model_file


def load_any(source: Path) -> tuple[nn.Module, dict]:
    """(model, payload): the fake-quantized model for a quantized checkpoint, the zoo model otherwise."""
    path = resolve_model_file(Path(source))
    payload = read_checkpoint(path, kind="model")
    if "quantization" not in payload:
        return load_model(path)
    from .nncf_backend import rebuild

    return rebuild(payload, str(path)), payload


def describe(quantization: dict) -> dict:
    """A quantized checkpoint's quantization section for summaries and manifests: without NNCF's config, and the
    folded BatchNorm layers counted rather than listed."""
    out = {k: v for k, v in quantization.items() if k not in ("config", "folded_batchnorm")}
    out["folded_batchnorm_layers"] = len(quantization.get("folded_batchnorm", []))
    return out
