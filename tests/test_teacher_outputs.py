"""Teacher-output caching and fast teacher inference (issue: distillation throughput)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgekd import api
from edgekd.config import OptimConfig, TrainConfig
from edgekd.distill.kd import HintonKD, KDOptions
from edgekd.distill.teacher_outputs import TeacherCache, TeacherOutputs, TeacherRunner, state_fingerprint
from edgekd.models import create_model
from edgekd.models.fold import fold_batchnorm
from edgekd.train.checkpoint import model_payload, read_checkpoint, save_atomic


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_050", "efficientnet_lite0", "mcunet_tiny"])
def test_folded_batchnorm_teacher_agrees_with_the_original(name):
    torch.manual_seed(0)
    model = create_model(name, 10, input_size=32).eval()
    # non-trivial BatchNorm statistics, as a trained teacher has
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    folded, traced = fold_batchnorm(model)
    assert traced and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def _pair():
    torch.manual_seed(0)
    student = create_model("mobilenetv3_small_050", 10, input_size=32, dropout=0.0)
    teacher = create_model("mobilenetv3_small_050", 10, input_size=32)
    return student, teacher


def test_cached_and_live_kd_give_identical_loss_and_gradients(digits32):
    student, teacher = _pair()
    distiller = HintonKD(student, teacher, KDOptions()).train()
    # the same numerics as the distiller's own teacher forward, so "identical" can be asserted bitwise
    runner = TeacherRunner(teacher, torch.device("cpu"), fold_bn=False, channels_last=False)
    cache = TeacherCache({"test": 1}, len(digits32.train), 1, 10)
    outputs = TeacherOutputs(runner, cache)
    batch = next(digits32.loader("train", 16, augment=False, shuffle=True).iterate_batches())
    outputs.logits(batch.x, batch.index, batch.variant)  # fills the cache (miss)
    cached = outputs.logits(batch.x, batch.index, batch.variant)  # served from the cache (hit)
    assert cache.stats()["hits"] == 16 and cache.stats()["misses"] == 16

    def loss_and_grads(**kw):
        student.zero_grad()
        state = {k: v.clone() for k, v in student.state_dict().items()}
        out = distiller(batch.x, batch.y, **kw)
        out.loss.backward()
        student.load_state_dict(state)  # undo the BatchNorm statistics update of this forward
        return out.loss.detach(), [p.grad.clone() for p in student.parameters()]

    live_loss, live_grads = loss_and_grads()
    cached_loss, cached_grads = loss_and_grads(teacher_logits=cached)
    assert torch.equal(live_loss, cached_loss)
    assert all(torch.equal(a, b) for a, b in zip(live_grads, cached_grads))


def test_replayed_augmentation_parameters_reproduce_the_student_input(digits32):
    loader = digits32.loader("train", 32, augment=True, variants=4, bank_seed=3, seed=1)
    loader.set_epoch(5)
    batch = next(loader.iterate_batches())
    raw = digits32.train.get_batch(batch.index)
    replay = loader.normalize(loader.augment.apply(raw, loader.bank_params(batch.index, batch.variant).crop))
    assert torch.equal(replay, batch.x)
    # a fresh loader with the same bank seed rebuilds the same bank, whatever its training seed
    other = digits32.loader("train", 32, augment=True, variants=4, bank_seed=3, seed=99)
    again = other.normalize(other.augment.apply(raw, other.bank_params(batch.index, batch.variant).crop))
    assert torch.equal(again, batch.x)
    # every image cycles through all its variants
    seen = torch.stack([_variants_at(loader, e) for e in range(4)])
    assert all(sorted(seen[:, i].tolist()) == [0, 1, 2, 3] for i in range(10))


def _variants_at(loader, epoch):
    loader.set_epoch(epoch)
    return loader.epoch_variants()


def _key(teacher, pad=4):
    return {"teacher": state_fingerprint(teacher), "augment": {"pad": pad, "hflip": True}, "variants": 2}


def test_changed_teacher_or_transform_gives_a_different_cache(tmp_path):
    _, teacher = _pair()
    base = TeacherCache(_key(teacher), 8, 2, 10, directory=tmp_path)
    base.store(torch.arange(8), torch.zeros(8, dtype=torch.int64), torch.randn(8, 10))
    base.flush()
    assert TeacherCache(_key(teacher), 8, 2, 10, directory=tmp_path).warm_entries == 8
    with torch.no_grad():
        next(teacher.parameters()).add_(1e-3)
    assert TeacherCache(_key(teacher), 8, 2, 10, directory=tmp_path).warm_entries == 0
    assert TeacherCache(_key(teacher, pad=2), 8, 2, 10, directory=tmp_path).warm_entries == 0
    # a directory whose metadata does not match is rebuilt, never reused
    (base.directory / "meta.json").write_text(json.dumps({"something": "else"}))
    _, teacher2 = _pair()
    assert TeacherCache(_key(teacher2), 8, 2, 10, directory=tmp_path).warm_entries == 0


def test_disk_cache_survives_a_process_restart(tmp_path):
    script = f"""
import torch
from edgekd.distill.teacher_outputs import TeacherCache
cache = TeacherCache({{"k": "v"}}, 6, 3, 5, directory={str(tmp_path)!r})
torch.manual_seed(0)
cache.store(torch.arange(6), torch.tensor([0, 1, 2, 0, 1, 2]), torch.randn(6, 5))
cache.flush()
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    cache = TeacherCache({"k": "v"}, 6, 3, 5, directory=tmp_path)
    assert cache.warm_entries == 6
    hit, logits = cache.lookup(torch.arange(6), torch.tensor([0, 1, 2, 0, 1, 2]))
    torch.manual_seed(0)
    assert hit.all() and torch.equal(logits, torch.randn(6, 5))
    assert not cache.lookup(torch.tensor([0]), torch.tensor([1]))[0].any()


def test_cache_over_budget_is_an_error_naming_the_fix():
    from edgekd.errors import EdgekdError

    with pytest.raises(EdgekdError, match="raise teacher_cache_budget_mb"):
        TeacherCache({}, 1_000_000, 100, 1000, memory_budget_bytes=1 << 20)


def test_training_with_the_cache_equals_training_without_it(tmp_path, digits32):
    """Deterministic inputs: a cached run ends with exactly the weights of a live run, and hits from epoch 2."""
    teacher_file = tmp_path / "teacher.pt"
    torch.manual_seed(1)
    save_atomic(model_payload(create_model("mobilenetv3_small_050", 10), digits32.describe()), teacher_file)
    common = dict(data="digits", resolution=32, student="mobilenetv3_small_050", teacher=str(teacher_file),
                  method="kd", epochs=2, batch_size=64, augment=False, limit=512, teacher_fold_bn=False,
                  optim=OptimConfig(lr=0.05), checkpoint_interval_s=1e9)
    live = api.train(TrainConfig(run_dir=str(tmp_path / "live"), teacher_cache="off", **common))
    cached = api.train(TrainConfig(run_dir=str(tmp_path / "cached"), teacher_cache="memory", **common))
    a = read_checkpoint(Path(live["run_dir"]) / "last.pt")["student"]
    b = read_checkpoint(Path(cached["run_dir"]) / "last.pt")["student"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(line) for line in (Path(cached["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert epochs[0]["teacher_cache"]["hit_rate"] == 0.0 and epochs[1]["teacher_cache"]["hit_rate"] == 1.0


def test_cached_teacher_features_give_the_live_attention_transfer_loss_and_gradients(digits32):
    from edgekd.distill import METHODS

    student, teacher = _pair()
    cls = METHODS.get("at")
    distiller = cls(student, teacher, cls.Options()).train()
    assert len(distiller.teacher_taps) >= 2
    runner = TeacherRunner(teacher, torch.device("cpu"), fold_bn=False, channels_last=False, taps=distiller.teacher_taps)
    shapes = runner.row_shapes((3, 32, 32))
    width = sum(int(torch.tensor(s).prod()) for s in shapes)
    cache = TeacherCache({"test": 2}, len(digits32.train), 1, width)
    outputs = TeacherOutputs(runner, cache, shapes)
    batch = next(digits32.loader("train", 16, augment=False, shuffle=True).iterate_batches())
    outputs.with_features(batch.x, batch.index, batch.variant)  # miss: runs the teacher, fills the rows
    cached = outputs.with_features(batch.x, batch.index, batch.variant)  # hit: rows split back into maps
    assert cache.stats()["hits"] == 16 and [tuple(f.shape[1:]) for f in cached[1]] == shapes[1:]

    def loss_and_grads(**kw):
        student.zero_grad()
        state = {k: v.clone() for k, v in student.state_dict().items()}
        out = distiller(batch.x, batch.y, **kw)
        out.loss.backward()
        student.load_state_dict(state)
        return out.loss.detach(), [p.grad.clone() for p in student.parameters()]

    live_loss, live_grads = loss_and_grads()
    cached_loss, cached_grads = loss_and_grads(teacher_out=cached)
    torch.testing.assert_close(cached_loss, live_loss, rtol=1e-6, atol=1e-7)
    for a, b in zip(live_grads, cached_grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_feature_distiller_training_serves_teacher_features_from_the_cache(tmp_path, digits32):
    teacher_file = tmp_path / "teacher.pt"
    torch.manual_seed(1)
    save_atomic(model_payload(create_model("mobilenetv3_small_050", 10), digits32.describe()), teacher_file)
    common = dict(data="digits", resolution=32, student="mobilenetv3_small_050", teacher=str(teacher_file),
                  method="nst", epochs=2, batch_size=64, augment=False, limit=256, optim=OptimConfig(lr=0.05),
                  checkpoint_interval_s=1e9)
    live = api.train(TrainConfig(run_dir=str(tmp_path / "live"), teacher_cache="off", **common))
    cached = api.train(TrainConfig(run_dir=str(tmp_path / "cached"), teacher_cache="memory", **common))
    a = read_checkpoint(Path(live["run_dir"]) / "last.pt")["student"]
    b = read_checkpoint(Path(cached["run_dir"]) / "last.pt")["student"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the cache returns exactly what the runner computed
    epochs = [json.loads(line) for line in (Path(cached["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert epochs[0]["teacher_cache"]["hit_rate"] == 0.0 and epochs[1]["teacher_cache"]["hit_rate"] == 1.0
