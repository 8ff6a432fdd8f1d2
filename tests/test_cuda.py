"""The CUDA paths: AMP (bf16, and fp16 with the loss scaler), every method on the GPU, the teacher runner's
autocast/compile and its cache, NCCL DDP through torchrun, resume, and GPU checkpoints that load on a CPU.

Run on a machine with a GPU: `make test-cuda` (= pytest -m cuda). The default test command deselects them
(CI has no GPU); asked for without a GPU they fail, they do not skip.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgekd import api
from edgekd.config import OptimConfig, TrainConfig
from edgekd.distill import METHODS
from edgekd.train.checkpoint import read_checkpoint
from edgekd.train.trainer import TrainingInterrupted

pytestmark = pytest.mark.cuda
STUDENT = "mobilenetv3_small_050"


@pytest.fixture(scope="module", autouse=True)
def gpu():
    if not torch.cuda.is_available():
        pytest.fail("pytest -m cuda needs a CUDA GPU and none is visible: run it on a GPU machine", pytrace=False)


def _config(tmp_path: Path, name: str, **changes) -> TrainConfig:
    base = TrainConfig(
        run_dir=str(tmp_path / name), data="digits", resolution=32, student=STUDENT,
        student_options={"low_res_stem": False}, teacher=None, method="ce", epochs=3, batch_size=64,
        optim=OptimConfig(lr=0.05, warmup_epochs=0.5), seed=0, checkpoint_interval_s=1e9, device="cuda",
    )
    return base.replace(**changes)


def _metrics(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    summary = api.train(_config(tmp_path_factory.mktemp("teacher"), "resnet18", student="resnet18",
                                student_options={"low_res_stem": True}, epochs=4))
    assert summary["device"].startswith("cuda") and summary["amp"] == "torch.bfloat16"
    assert summary["test_acc"] > 0.8, summary["test_acc"]
    return summary["run_dir"]


# (method, epochs, options): the multi-phase methods get one epoch per phase
METHOD_RUNS = [
    ("ce", 3, {}), ("kd", 3, {}), ("logit_l2", 3, {}), ("at", 3, {}), ("nst", 3, {}), ("rkd", 3, {}),
    ("dml", 3, {}), ("byot", 3, {}), ("fitnet", 3, {"hint_epochs": "1"}), ("ab", 3, {"init_epochs": "1"}),
    ("fsp", 3, {"init_epochs": "1"}), ("sskd", 3, {"stages": "2"}), ("sskd_multiloss", 3, {"stages": "2"}),
    ("netaug", 3, {"bn_batches": "4"}), ("netaug+kd", 3, {"bn_batches": "4"}), ("mld", 3, {}),
    ("distpro", 3, {}), ("metadistiller", 3, {"meta_every": "1"}),
]


def test_the_table_covers_every_method():
    assert {m for m, _, _ in METHOD_RUNS} == set(METHODS.names())


@pytest.mark.parametrize("method,epochs,options", METHOD_RUNS, ids=[m for m, _, _ in METHOD_RUNS])
def test_every_method_trains_on_the_gpu_with_bf16_autocast(method, epochs, options, tmp_path, teacher_run):
    teacher = teacher_run if METHODS.get(method).requires_teacher else None
    summary = api.train(_config(tmp_path, method, method=method, teacher=teacher, epochs=epochs,
                                method_options=options))
    assert summary["device"] == "cuda:0" and summary["amp"] == "torch.bfloat16"
    epochs_seen = _metrics(summary["run_dir"])
    assert len(epochs_seen) == epochs
    assert all(torch.isfinite(torch.tensor(e["train_loss"])) for e in epochs_seen)
    # sskd's and mld's first phases train no classifier; everything else must leave chance (0.1) behind
    assert summary["test_acc"] > (0.0 if method.startswith("sskd") or method == "mld" else 0.2), summary["test_acc"]


@pytest.mark.parametrize("method", ["kd", "metadistiller", "distpro"])
def test_fp16_autocast_with_the_loss_scaler(method, tmp_path, teacher_run, monkeypatch):
    """GPUs without bf16 (Turing, Jetson Nano's Maxwell) train in fp16 with a GradScaler."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    teacher = teacher_run if METHODS.get(method).requires_teacher else None
    options = {"meta_every": "1"} if method == "metadistiller" else {}
    summary = api.train(_config(tmp_path, method, method=method, teacher=teacher, method_options=options))
    assert summary["amp"] == "torch.float16"
    assert summary["test_acc"] > 0.2, summary["test_acc"]
    state = read_checkpoint(Path(summary["run_dir"]) / "last.pt", kind="training")
    assert state["scaler"]["scale"] > 0  # the scaler's state is checkpointed for resume


@pytest.mark.parametrize("autocast,compile", [("off", False), ("bf16", False), ("fp16", False), ("off", True)])
def test_teacher_runner_settings_and_the_cache_on_the_gpu(autocast, compile, tmp_path, teacher_run):
    summary = api.train(_config(tmp_path, "kd", method="kd", teacher=teacher_run, teacher_autocast=autocast,
                                teacher_compile=compile, teacher_cache="memory", teacher_cache_variants=2))
    assert summary["teacher_cache"]["total_hits"] > 0, summary["teacher_cache"]
    assert summary["test_acc"] > 0.2, summary["test_acc"]


def test_resume_on_the_gpu_restores_the_cuda_generator(tmp_path):
    cfg = _config(tmp_path, "interrupted")
    calls = []

    def stop_in_epoch_two(trainer, step):
        calls.append(step)
        if len(calls) == 30:
            trainer.request_stop()

    with pytest.raises(TrainingInterrupted):
        api.train(cfg, on_step=stop_in_epoch_two)
    assert read_checkpoint(Path(cfg.run_dir) / "last.pt", kind="training")["rng_cuda"]
    resumed = api.train(TrainConfig(run_dir=cfg.run_dir), resume=True)
    assert [e["epoch"] for e in _metrics(resumed["run_dir"])] == [0, 1, 2]
    assert resumed["test_acc"] > 0.2, resumed["test_acc"]  # cuDNN is not bitwise repeatable: no equality here


def test_gpu_checkpoints_load_on_a_cpu_only_process(tmp_path):
    summary = api.train(_config(tmp_path, "ce", epochs=1))
    code = ("import torch, sys; from edgekd.train.checkpoint import read_checkpoint; "
            "m = read_checkpoint(sys.argv[1], kind='model'); "
            "assert all(t.device.type == 'cpu' for t in m['state_dict'].values()); print('ok')")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", code, str(Path(summary["run_dir"]) / "best.pt")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("method", ["ce", "metadistiller", "kd"])
def test_torchrun_uses_nccl_and_ddp_on_the_gpu(method, tmp_path, teacher_run):
    """One GPU holds one NCCL rank (NCCL refuses two ranks on one device): DDP wrapping, NCCL collectives and
    the methods' own DDP paths run; the two-rank arithmetic is checked with gloo on CPU in test_train.py."""
    run_dir = tmp_path / method
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29617", "-m",
           "edgekd.cli", "train", "--data", "digits", "--resolution", "32", "--student", STUDENT,
           "--student-opt", "low_res_stem=false", "--method", method, "--epochs", "2", "--batch-size", "64",
           "--device", "cuda", "--seed", "0", "--run-dir", str(run_dir),
           "--teacher", teacher_run if method == "kd" else "none"]
    if method == "metadistiller":
        cmd += ["--opt", "meta_every=1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["device"] == "cuda:0" and summary["backend"] == "nccl"
    assert all(torch.isfinite(torch.tensor(e["train_loss"])) for e in _metrics(str(run_dir)))
