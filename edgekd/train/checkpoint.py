"""Checkpoints: written atomically, read safely (weights_only: a checkpoint can never execute code)."""
from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import EdgekdError

FORMAT = "edgekd-checkpoint"
VERSION = 1


def save_atomic(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def model_payload(model: nn.Module, data: dict, metrics: dict | None = None) -> dict:
    """A self-describing model file: everything needed to rebuild, evaluate and export the model.

    A model may carry more of its description in `checkpoint_extra` (plain data): an NNCF-quantized model
    carries its quantizers' placement there (edgekd.quantize), so every best.pt of a quantized run rebuilds."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": "model",
        "model_config": dict(model.model_config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "data": data,
        "metrics": metrics or {},
        **getattr(model, "checkpoint_extra", {}),
    }


def read_checkpoint(path: Path, kind: str | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise EdgekdError(f"checkpoint {path} does not exist: pass a .pt file or a run directory from `edgekd train`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise EdgekdError(f"checkpoint {path} is corrupt or not a torch file ({first}): re-run training or pass another file") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise EdgekdError(f"{path} is not an edgekd checkpoint (no '{FORMAT}' header): pass a file written by `edgekd train`")
    if payload.get("version", 0) > VERSION:
        raise EdgekdError(f"{path} was written by a newer edgekd (checkpoint version {payload['version']}): upgrade edgekd")
    if kind is not None and payload.get("kind") != kind:
        raise EdgekdError(f"{path} is a '{payload.get('kind')}' checkpoint, expected '{kind}'")
    return payload


def resolve_model_file(source: Path) -> Path:
    """A run directory means its best student checkpoint."""
    source = Path(source)
    if source.is_dir():
        best = source / "best.pt"
        if not best.is_file():
            raise EdgekdError(f"{source} has no best.pt: the run did not finish an epoch; resume it with `edgekd train --resume {source}`")
        return best
    return source


def load_model(source: Path, *, num_classes: int | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a zoo model from a checkpoint or run directory, checking class count and architecture."""
    from ..models import create_model

    path = resolve_model_file(source)
    payload = read_checkpoint(path, kind="model")
    if "quantization" in payload:  # rebuilt by edgekd.quantize (a layer above this one), with NNCF
        raise EdgekdError(f"{path} is an NNCF-quantized model ({payload['quantization'].get('method', 'nncf')}): "
                          "export it with `edgekd export`, or use its float run here")
    config = payload["model_config"]
    if num_classes is not None and config.get("num_classes") != num_classes:
        raise EdgekdError(
            f"checkpoint {path} predicts {config.get('num_classes')} classes but the data has {num_classes}:"
            " use a checkpoint trained on this dataset"
        )
    model = create_model(**config)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:160]
        raise EdgekdError(f"checkpoint {path} does not match architecture '{config.get('name')}' ({first})") from None
    return model, payload


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
