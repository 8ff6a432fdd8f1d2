"""Teacher-output caching and fast teacher inference (issue: distillation throughput)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgekd import api
from edgekd.config import OptimConfig, TrainConfig
from edgekd.distill import METHODS
from edgekd.distill.kd import HintonKD, KDOptions
from edgekd.distill.step import LOGITS, Step, TeacherNeeds
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


def _batch(digits32):
    return next(digits32.loader("train", 16, augment=False, shuffle=True).iterate_batches())


def _cached_logits(teacher, digits32, batch):
    """The teacher's logits for `batch` as the cache serves them (a hit), from a runner with the numerics of the
    distiller's own teacher forward (no folding, NCHW), so cached and live can be compared bitwise."""
    runner = TeacherRunner(teacher, torch.device("cpu"), fold_bn=False, channels_last=False)
    cache = TeacherCache({"test": 1}, len(digits32.train), 1, 10)
    outputs = TeacherOutputs(runner, cache)
    outputs.logits(batch.x, batch.index, batch.variant)  # fills the cache (miss)
    cached = outputs.logits(batch.x, batch.index, batch.variant)  # served from the cache (hit)
    assert cache.stats()["hits"] == len(batch.x) and cache.stats()["misses"] == len(batch.x)
    return cached


def _loss_and_grads(distiller, student, step):
    student.zero_grad()
    state = {k: v.clone() for k, v in student.state_dict().items()}
    out = distiller(step)
    out.loss.backward()
    student.load_state_dict(state)  # undo the BatchNorm statistics update of this forward
    # a stage-wise phase leaves the layers past its stage without gradients (None)
    return out.loss.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                               for p in student.parameters()]


def _assert_identical(live, cached):
    assert torch.equal(live[0], cached[0])
    assert all(torch.equal(a, b) for a, b in zip(live[1], cached[1]))


def test_cached_and_live_kd_give_identical_loss_and_gradients(digits32):
    student, teacher = _pair()
    distiller = HintonKD(student, teacher, KDOptions()).train()
    batch = _batch(digits32)
    cached = _cached_logits(teacher, digits32, batch)
    _assert_identical(_loss_and_grads(distiller, student, Step(batch.x, batch.y)),
                      _loss_and_grads(distiller, student, Step(batch.x, batch.y, teacher_logits=cached)))


@pytest.mark.parametrize("method, served", [
    ("kd", {"kd": LOGITS}), ("ce", {"ce": None}),
    ("fitnet", {"hint": lambda d: TeacherNeeds((d.hint,)), "kd": LOGITS}),
    ("ab", {"ab": lambda d: TeacherNeeds(tuple(d.teacher_taps)), "kd": LOGITS}),
    ("fsp", {"fsp": lambda d: TeacherNeeds(tuple(t for _, t in d.pairs)), "ce": None}),
    ("rkd", {"rkd": TeacherNeeds((("conv_head", "pooled"),))}),
    ("mld", {"masks": None, "local": lambda d: TeacherNeeds(tuple(d.teacher_points)), "kd": LOGITS}),
    ("sskd", {**{f"stage{i}": lambda d: TeacherNeeds(tuple(t for _, t in d.pairs)) for i in range(1, 5)},
              "head": None}),
    ("sskd_multiloss", {"backbone": lambda d: TeacherNeeds(tuple(t for _, t in d.pairs)), "head": None}),
    ("distpro", {"search": lambda d: TeacherNeeds(tuple(d.teacher_points)),
                 "retrain": lambda d: TeacherNeeds(tuple(d.teacher_points))}),
])
def test_every_phase_declares_what_the_trainer_serves_it_from_the_teacher(method, served):
    student, teacher = _pair()
    cls = METHODS.get(method)
    distiller = cls(student, teacher if cls.requires_teacher else None, cls.Options())
    expected = {name: need(distiller) if callable(need) else need for name, need in served.items()}
    assert {p.name: p.distiller.teacher_needs for p in distiller.phases(10, OptimConfig())} == expected


@pytest.mark.parametrize("method", ["fitnet", "ab", "fsp", "mld", "sskd", "sskd_multiloss"])
def test_phases_that_say_they_train_without_the_teacher_never_run_it(method, digits32):
    """`uses_teacher` keeps `edgekd train` from calling a label-only phase (FSP's ce, SSKD's head) live."""
    student, teacher = _pair()
    cls = METHODS.get(method)
    calls = []
    for layer in teacher.modules():  # feature phases run the teacher layer by layer, up to their deepest tap
        layer.register_forward_hook(lambda *_: calls.append(1))
    batch = _batch(digits32)
    ran = {}
    for phase in cls(student, teacher, cls.Options()).phases(10, OptimConfig()):
        calls.clear()
        phase.distiller.train()(Step(batch.x, batch.y))  # nothing served: a phase that needs the teacher runs it
        ran[phase.name] = (bool(calls), phase.distiller.uses_teacher)
    free = {"fsp": {"ce"}, "sskd": {"head"}, "sskd_multiloss": {"head"}}.get(method, set())
    assert ran == {name: (name not in free, name not in free) for name in ran}


@pytest.mark.parametrize("method", ["fitnet", "ab", "mld"])
def test_the_kd_phase_of_a_multiphase_method_gives_the_live_loss_from_cached_logits(method, digits32):
    student, teacher = _pair()
    cls = METHODS.get(method)
    kd = cls(student, teacher, cls.Options()).phases(8, OptimConfig())[-1].distiller.train()
    batch = _batch(digits32)
    cached = _cached_logits(teacher, digits32, batch)
    _assert_identical(_loss_and_grads(kd, student, Step(batch.x, batch.y)),
                      _loss_and_grads(kd, student, Step(batch.x, batch.y, teacher_logits=cached)))


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


def _random_teacher(tmp_path, digits32) -> str:
    """A fixed (seeded) untrained teacher checkpoint for digits: the cache tests need its outputs, not its skill."""
    teacher_file = tmp_path / "teacher.pt"
    torch.manual_seed(1)
    save_atomic(model_payload(create_model("mobilenetv3_small_050", 10), digits32.describe()), teacher_file)
    return str(teacher_file)


def _cached_run_equals_live_run(tmp_path, digits32, cached_as="memory", **config) -> list[dict]:
    """Trains without and with the cache (deterministic inputs), asserts both end with exactly the same student
    (the cache returns exactly what the runner computed) and returns the cached run's epoch records."""
    common = dict(data="digits", resolution=32, student="mobilenetv3_small_050",
                  teacher=_random_teacher(tmp_path, digits32),
                  batch_size=64, augment=False, optim=OptimConfig(lr=0.05), checkpoint_interval_s=1e9, **config)
    live = api.train(TrainConfig(run_dir=str(tmp_path / "live"), teacher_cache="off", **common))
    cached = api.train(TrainConfig(run_dir=str(tmp_path / "cached"), teacher_cache=cached_as, **common))
    a = read_checkpoint(Path(live["run_dir"]) / "last.pt")["student"]
    b = read_checkpoint(Path(cached["run_dir"]) / "last.pt")["student"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    return [json.loads(line) for line in (Path(cached["run_dir"]) / "metrics.jsonl").read_text().splitlines()]


def test_without_a_cache_the_views_are_fresh_whatever_the_bank_size(tmp_path, digits32):
    # a bank only serves a cache: with the teacher live, K views per image would narrow the augmentation for nothing
    common = dict(data="digits", resolution=32, student="mobilenetv3_small_050",
                  teacher=_random_teacher(tmp_path, digits32),
                  method="kd", epochs=2, limit=256, batch_size=64, augment=True, teacher_cache="off",
                  optim=OptimConfig(lr=0.05), checkpoint_interval_s=1e9)
    students = [read_checkpoint(Path(api.train(TrainConfig(run_dir=str(tmp_path / f"k{k}"), teacher_cache_variants=k,
                                                           **common))["run_dir"]) / "last.pt")["student"]
                for k in (1, 2)]
    assert all(torch.equal(students[0][name], students[1][name]) for name in students[0])


def test_training_with_the_cache_equals_training_without_it(tmp_path, digits32):
    epochs = _cached_run_equals_live_run(tmp_path, digits32, method="kd", epochs=2, limit=512, teacher_fold_bn=False)
    assert epochs[0]["teacher_cache"]["hit_rate"] == 0.0 and epochs[1]["teacher_cache"]["hit_rate"] == 1.0


def test_both_phases_of_fitnet_are_served_from_one_cache(tmp_path, digits32):
    epochs = _cached_run_equals_live_run(tmp_path, digits32, method="fitnet", method_options={"hint_epochs": 1},
                                         epochs=3, limit=256, teacher_fold_bn=False)
    assert [e["phase"] for e in epochs] == ["hint", "kd", "kd"]
    # one row per image holds the hint map and the logits: the hint epoch fills it, the KD epochs only read
    assert [e["teacher_cache"]["hit_rate"] for e in epochs] == [0.0, 1.0, 1.0]


def _served_by_a_cache(teacher, digits32, batch, taps, dtype="float32"):
    """(logits, features) for `batch` as a filled cache serves them (a hit), after the miss that filled it."""
    runner = TeacherRunner(teacher, torch.device("cpu"), fold_bn=False, channels_last=False, taps=taps)
    shapes = runner.row_shapes((3, 32, 32))
    width = sum(int(torch.tensor(s).prod()) for s in shapes)
    cache = TeacherCache({"test": 2}, len(digits32.train), 1, width, dtype=dtype)
    outputs = TeacherOutputs(runner, cache, shapes)
    fresh = outputs.with_features(batch.x, batch.index, batch.variant)  # miss: runs the teacher, fills the rows
    cached = outputs.with_features(batch.x, batch.index, batch.variant)  # hit: rows split back into maps
    assert cache.stats()["hits"] == len(batch.x) and [tuple(f.shape[1:]) for f in cached[1]] == shapes[1:]
    for a, b in zip((fresh[0], *fresh[1]), (cached[0], *cached[1])):  # a step sees the same values hit or miss
        assert torch.equal(a, b)
    return cached


# (method, phase index): every phase whose teacher maps are served
FEATURE_PHASES = [("at", 0), ("nst", 0), ("fitnet", 0), ("ab", 0), ("fsp", 0), ("rkd", 0), ("mld", 1), ("sskd", 0),
                  ("sskd", 2), ("sskd_multiloss", 0), ("distpro", 0)]


@pytest.mark.parametrize("method, phase", FEATURE_PHASES)
def test_cached_teacher_features_give_the_live_loss_and_gradients(method, phase, digits32):
    student, teacher = _pair()
    cls = METHODS.get(method)
    distiller = cls(student, teacher, cls.Options()).phases(8, OptimConfig())[phase].distiller.train()
    taps = distiller.teacher_needs.taps
    assert taps
    batch = _batch(digits32)
    logits, feats = _served_by_a_cache(teacher, digits32, batch, taps)
    torch.manual_seed(0)  # dropout in a method's own modules, if any, draws the same masks both times
    live_loss, live_grads = _loss_and_grads(distiller, student, Step(batch.x, batch.y))
    torch.manual_seed(0)
    cached_loss, cached_grads = _loss_and_grads(distiller, student, Step(batch.x, batch.y, teacher_logits=logits,
                                                                         teacher_features=tuple(feats)))
    torch.testing.assert_close(cached_loss, live_loss, rtol=1e-6, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in live_grads)
    for a, b in zip(live_grads, cached_grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["at", "fitnet", "rkd"])
def test_a_float16_cache_gives_the_loss_within_one_percent(method, digits32):
    student, teacher = _pair()
    cls = METHODS.get(method)
    distiller = cls(student, teacher, cls.Options()).phases(8, OptimConfig())[0].distiller.train()
    batch = _batch(digits32)
    full = _served_by_a_cache(teacher, digits32, batch, distiller.teacher_needs.taps)
    half = _served_by_a_cache(teacher, digits32, batch, distiller.teacher_needs.taps, dtype="float16")
    assert not torch.equal(half[0], full[0])  # it did round
    losses = []
    for logits, feats in (full, half):
        torch.manual_seed(0)
        losses.append(_loss_and_grads(distiller, student, Step(batch.x, batch.y, teacher_logits=logits,
                                                              teacher_features=tuple(feats)))[0])
    # measured on this batch: FitNets, FSP, AT, AB <= 0.01%, NST 0.03%, RKD 0.17% (relations of near-equal
    # embeddings amplify rounding)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-2, atol=1e-6)


def test_float16_rows_are_a_cache_of_their_own_and_half_the_bytes(tmp_path):
    _, teacher = _pair()
    full = TeacherCache(_key(teacher), 8, 2, 10, directory=tmp_path)
    full.store(torch.arange(8), torch.zeros(8, dtype=torch.int64), torch.randn(8, 10))
    full.flush()
    half = TeacherCache(_key(teacher), 8, 2, 10, directory=tmp_path, dtype="float16")
    assert half.warm_entries == 0 and half.directory != full.directory and half.nbytes * 2 == full.nbytes
    assert "dtype" not in full.key  # float32 caches written before float16 existed stay valid


def test_auto_cache_over_the_memory_budget_goes_to_disk(tmp_path, digits32, capsys):
    epochs = _cached_run_equals_live_run(tmp_path, digits32, method="at", epochs=2, limit=512,
                                         teacher_cache_budget_mb=1, teacher_cache_dir=str(tmp_path / "cache"),
                                         cached_as="auto")
    stats = epochs[1]["teacher_cache"]
    assert stats["directory"].startswith(str(tmp_path / "cache")) and stats["bytes"] > 1 << 20
    assert stats["hit_rate"] == 1.0


def test_a_disk_cache_without_room_is_an_error_naming_the_fix(tmp_path, monkeypatch):
    from edgekd.distill import teacher_outputs
    from edgekd.errors import EdgekdError

    monkeypatch.setattr(teacher_outputs, "DISK_RESERVE_BYTES", 1 << 62)
    with pytest.raises(EdgekdError, match="to spare: free space, use teacher_cache_dtype float16"):
        TeacherCache({}, 8, 1, 10, directory=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-made


def test_feature_distiller_training_serves_teacher_features_from_the_cache(tmp_path, digits32):
    epochs = _cached_run_equals_live_run(tmp_path, digits32, method="nst", epochs=2, limit=256)
    assert epochs[0]["teacher_cache"]["hit_rate"] == 0.0 and epochs[1]["teacher_cache"]["hit_rate"] == 1.0


def test_a_row_does_not_depend_on_which_images_missed_with_it(digits32):
    # a resumed run refills the rows an in-memory cache lost, with other images missing beside them: the rows
    # must come out bitwise the same, or the resumed run would not train exactly like an uninterrupted one
    _, teacher = _pair()
    runner = TeacherRunner(teacher, torch.device("cpu"), fold_bn=False, channels_last=False)
    batch = _batch(digits32)
    whole = TeacherOutputs(runner, TeacherCache({"t": 1}, len(digits32.train), 1, 10), chunk=len(batch.x))
    expected = whole.logits(batch.x, batch.index, batch.variant)
    later = TeacherOutputs(runner, TeacherCache({"t": 1}, len(digits32.train), 1, 10), chunk=len(batch.x))
    later.logits(batch.x[:5], batch.index[:5], batch.variant[:5])  # 5 rows filled first
    assert torch.equal(later.logits(batch.x, batch.index, batch.variant), expected)  # the other 11 miss together
    uncached = TeacherOutputs(runner, None, chunk=len(batch.x))
    assert torch.equal(uncached.logits(batch.x[3:9], batch.index[3:9], batch.variant[3:9]), expected[3:9])


def test_every_stage_of_sskd_reads_the_row_its_first_stage_filled(tmp_path, digits32):
    epochs = _cached_run_equals_live_run(tmp_path, digits32, method="sskd",
                                         method_options={"stages": 2, "stage_epochs": 1, "head_epochs": 1},
                                         epochs=3, limit=256, teacher_fold_bn=False)
    assert [e["phase"] for e in epochs] == ["stage1", "stage2", "head"]
    # one row holds both boundaries' maps: stage 1 fills it (the teacher runs whole), stage 2 only reads
    assert [e["teacher_cache"]["hit_rate"] for e in epochs[:2]] == [0.0, 1.0] and "teacher_cache" not in epochs[2]


def test_distpro_searches_and_retrains_from_one_cache(tmp_path, digits32):
    # the search's architecture steps take the served maps of the batch's train part: the searched process, and
    # so the retrained student, come out exactly as with the teacher live
    epochs = _cached_run_equals_live_run(tmp_path, digits32, method="distpro",
                                         method_options={"search_epochs": 1, "retrain_epochs": 1},
                                         epochs=2, limit=256, teacher_fold_bn=False)
    assert [e["phase"] for e in epochs] == ["search", "retrain"]
    assert [e["teacher_cache"]["hit_rate"] for e in epochs] == [0.0, 1.0]
