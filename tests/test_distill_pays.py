"""Distillation that pays: DKD, DIST, logit standardization, function matching, replayable mixup/cutmix and
RandAugment banks, unlabeled data and the teacher's own resolution."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgekd import api
from edgekd.config import OptimConfig, TrainConfig
from edgekd.data.augment import RANDAUG_OPS, Augmentation, CropFlip, Mix, RandAugment
from edgekd.data.loader import UNLABELED
from edgekd.distill import METHODS
from edgekd.distill.dist import dist_loss
from edgekd.distill.dkd import dkd_loss
from edgekd.distill.kd import kd_loss, standardize_logits
from edgekd.distill.labels import label_loss
from edgekd.distill.step import Step
from edgekd.errors import EdgekdError
from edgekd.models import create_model
from edgekd.train.checkpoint import model_payload, read_checkpoint, save_atomic

S = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
T = torch.tensor([[3.0, 1.0, 0.0], [1.0, 0.0, 2.0]])
Y = torch.tensor([0, 2])


def softmax(row, t=1.0):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


# ---------------------------------------------------------------- losses by hand

def test_dkd_equals_a_hand_computation():
    t = 2.0
    tckd = nckd = 0.0
    for s_row, t_row, y in zip(S.tolist(), T.tolist(), Y.tolist()):
        ps, pt = softmax(s_row, t), softmax(t_row, t)
        tckd += kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        others_s = [v for i, v in enumerate(s_row) if i != y]
        others_t = [v for i, v in enumerate(t_row) if i != y]
        nckd += kl(softmax(others_t, t), softmax(others_s, t))
    a, b = dkd_loss(S, T, Y, alpha=1.0, beta=8.0, temperature=t)
    assert a.item() == pytest.approx(tckd / 2 * t * t, rel=1e-5)
    assert b.item() == pytest.approx(8.0 * nckd / 2 * t * t, rel=1e-5)


def test_dkd_terms_add_up_to_kd_when_alpha_and_beta_weight_them_as_kd_does():
    """Zhao et al., eq. 5: KD = TCKD + (1 - p_t) NCKD; with the target probability the same for all rows."""
    s = torch.tensor([[1.0, 0.2, -0.3]])
    t = torch.tensor([[2.0, 0.1, 0.4]])
    y = torch.tensor([0])
    p_t = F.softmax(t, 1)[0, 0].item()
    tckd, nckd = dkd_loss(s, t, y, 1.0, 1.0 - p_t, 1.0)
    assert (tckd + nckd).item() == pytest.approx(kd_loss(s, t, 1.0).item(), rel=1e-5)


def _pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return num / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def test_dist_equals_a_hand_computation():
    tau = 2.0
    s = torch.cat([S, torch.tensor([[0.3, -2.0, 1.0], [1.5, 1.4, -0.2]])])  # 4 images: per-class relations vary
    t = torch.cat([T, torch.tensor([[0.0, -1.0, 2.5], [2.0, 0.5, 0.1]])])
    ps = [softmax(r, tau) for r in s.tolist()]
    pt = [softmax(r, tau) for r in t.tolist()]
    inter = 1 - sum(_pearson(a, b) for a, b in zip(ps, pt)) / 4
    cols_s, cols_t = list(zip(*ps)), list(zip(*pt))
    intra = 1 - sum(_pearson(a, b) for a, b in zip(cols_s, cols_t)) / 3
    assert intra > 0.01
    a, b = dist_loss(s, t, beta=1.0, gamma=2.0, tau=tau)
    assert a.item() == pytest.approx(inter * tau * tau, rel=1e-4)
    assert b.item() == pytest.approx(2.0 * intra * tau * tau, rel=1e-4)


def test_logit_standardization_equals_a_hand_computation():
    def z(row):
        m = sum(row) / len(row)
        sd = math.sqrt(sum((v - m) ** 2 for v in row) / (len(row) - 1))  # torch.std: Bessel-corrected
        return [(v - m) / (1e-7 + sd) for v in row]

    t = 2.0
    expected = sum(kl(softmax(z(tr), t), softmax(z(sr), t)) for sr, tr in zip(S.tolist(), T.tolist())) / 2 * t * t
    assert kd_loss(S, T, t, standardize=True).item() == pytest.approx(expected, rel=1e-5)
    # invariant to a shift and a scale of either logit vector, which plain KD is not
    assert kd_loss(3 * S + 1, T - 5, t, standardize=True).item() == pytest.approx(expected, rel=1e-4)
    assert torch.allclose(standardize_logits(S).mean(1), torch.zeros(2), atol=1e-6)


def test_label_loss_never_sees_unlabeled_rows_and_mixes_labels():
    logits = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, UNLABELED, 2, 1])
    loss = label_loss(logits, y)
    assert loss.item() == pytest.approx(F.cross_entropy(logits[[0, 2, 3]], y[[0, 2, 3]]).item(), rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[1] == 0)  # the unlabeled row gets no gradient from the label term
    partner, lam = torch.tensor([1, 0, UNLABELED, 2]), torch.tensor([0.7, 1.0, 0.6, 1.0])
    mixed = label_loss(logits, y, (partner, lam))  # row 2: its partner is unlabeled -> left out
    ce = lambda i, c: F.cross_entropy(logits[i:i + 1], torch.tensor([c])).item()  # noqa: E731
    expected = (0.7 * ce(0, 0) + 0.3 * ce(0, 1) + ce(3, 1)) / 2
    assert mixed.item() == pytest.approx(expected, rel=1e-5)
    only_unlabeled = label_loss(logits, torch.full((4,), UNLABELED))
    assert only_unlabeled.item() == 0.0 and only_unlabeled.requires_grad


# ---------------------------------------------------------------- augmentation

def test_every_randaugment_op_keeps_uint8_shape_and_identity_is_exact(digits32):
    images = digits32.train.get_batch(torch.arange(6))
    aug = RandAugment(num_ops=1, magnitude=9)
    for op in range(len(RANDAUG_OPS)):
        params = aug.sample(6, torch.Generator().manual_seed(0))
        params = type(params)(torch.full_like(params.ops, op), params.sign)
        out = aug.apply(images, params)
        assert out.dtype == torch.uint8 and out.shape == images.shape
        if RANDAUG_OPS[op] == "identity":
            assert torch.equal(out, images)
        elif RANDAUG_OPS[op] in ("rotate", "solarize", "equalize", "posterize"):
            assert not torch.equal(out, images), RANDAUG_OPS[op]


def test_cutmix_patch_comes_from_the_partner_and_lambda_is_its_complement():
    mix = Mix(mixup_alpha=0.0, cutmix_alpha=1.0)
    params = mix.sample(64, 10, (16, 16), torch.Generator().manual_seed(0))
    own, partner = torch.zeros(64, 1, 16, 16), torch.ones(64, 1, 16, 16)
    out = Mix.apply(own, partner, params)
    assert torch.allclose(out.mean(dim=(1, 2, 3)), 1.0 - params.lam)  # patch area = 1 - lambda, exactly
    with pytest.raises(EdgekdError, match="mix prob"):
        Mix(prob=1.5)
    with pytest.raises(EdgekdError, match="not both 0"):
        Mix(mixup_alpha=0.0, cutmix_alpha=0.0)


def _bank_loader(dm, **kw):
    return dm.loader("train", 32, augment=True, variants=3, bank_seed=2, seed=1, randaug=RandAugment(2, 9),
                     mix=Mix(0.8, 1.0), **kw)


def test_a_mixed_bank_replays_bit_exactly_in_a_fresh_loader(digits32):
    """What a resumed run does: a new loader rebuilds the bank (partner and lambda included) from the seed."""
    loader = _bank_loader(digits32)
    loader.set_epoch(4)
    first = list(loader.iterate_batches())[2]
    again = _bank_loader(digits32)
    again.set_epoch(4)
    resumed = next(again.iterate_batches(start_step=2))
    assert torch.equal(first.x, resumed.x) and torch.equal(first.lam, resumed.lam)
    assert torch.equal(first.y_partner, resumed.y_partner)
    assert (first.lam < 1).any() and (first.lam > 0).all()
    # the partner label is the label of the recorded partner image
    params = loader.bank_params(first.index, first.variant)
    assert torch.equal(first.y_partner, digits32.train.labels[params.mix.partner])


def test_mixed_views_are_the_recorded_blend_of_two_augmented_images(digits32):
    loader = _bank_loader(digits32)
    batch = next(loader.iterate_batches())
    params = loader.bank_params(batch.index, batch.variant)
    policy = Augmentation(loader.augment, RandAugment(2, 9), Mix(0.8, 1.0))
    own = policy.one(digits32.train.get_batch(batch.index), params.crop, params.ops).float()
    partner = policy.one(digits32.train.get_batch(params.mix.partner), params.partner_crop, params.partner_ops).float()
    blend = ~params.mix.cut
    lam = params.mix.lam[blend].view(-1, 1, 1, 1)
    expected = lam * own[blend] + (1 - lam) * partner[blend]
    assert torch.allclose(batch.x[blend], loader.normalize(expected), atol=1e-5)


def test_teacher_sees_the_high_resolution_view_of_exactly_the_student_crop():
    from edgekd.data.datamodule import load_data

    high = load_data("digits", resolution=64, channels=3, seed=0)
    low = load_data("digits", resolution=32, channels=3, seed=0)
    assert torch.equal(high.train.labels, low.train.labels)  # the same splits at both resolutions
    loader = high.loader("train", 16, augment=True, variants=2, bank_seed=0, seed=0, mix=Mix(0.8, 1.0),
                         resolution=32, mean=low.mean, std=low.std, teacher_norm=(high.mean, high.std))
    batch = next(loader.iterate_batches())
    assert batch.x.shape[-1] == 32 and batch.teacher_x.shape[-1] == 64
    # the student's input is the teacher's (denormalised) view resized: one image, one crop, one mix
    teacher_pixels = batch.teacher_x * torch.tensor(high.std).view(1, -1, 1, 1) + torch.tensor(high.mean).view(1, -1, 1, 1)
    resized = F.interpolate(teacher_pixels, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    student = (resized - torch.tensor(low.mean).view(1, -1, 1, 1)) / torch.tensor(low.std).view(1, -1, 1, 1)
    assert torch.allclose(student, batch.x, atol=1e-4)
    # and the crop is the same region: the 64 px crop offset is the 32 px one scaled when pads scale too
    assert loader.augment.pad == 2 * low.augment.pad


# ---------------------------------------------------------------- function matching

def _pair(seed=0):
    torch.manual_seed(seed)
    student = create_model("mobilenetv3_small_050", 10, low_res_stem=True, dropout=0.0)  # same masks both passes
    teacher = create_model("mobilenetv3_small_050", 10, low_res_stem=True)
    return student, teacher


def test_cached_fm_gives_the_live_loss_and_gradients(digits32):
    from edgekd.distill.teacher_outputs import TeacherCache, TeacherOutputs, TeacherRunner

    student, teacher = _pair()
    fm = METHODS.get("fm")(student, teacher, METHODS.get("fm").Options(label_weight=0.5)).train()
    loader = _bank_loader(digits32)
    batch = next(loader.iterate_batches())
    # the distiller's own numerics (no folding, NCHW), so the two paths can be compared bitwise
    outputs = TeacherOutputs(TeacherRunner(teacher, torch.device("cpu"), fold_bn=False, channels_last=False),
                             TeacherCache({"k": 1}, len(digits32.train), 3, 10))
    outputs.logits(batch.x, batch.index, batch.variant)  # miss: fills
    cached = outputs.logits(batch.x, batch.index, batch.variant)  # hit
    assert outputs.cache.total_hits == len(batch.index)

    def loss_and_grads(teacher_logits=None):
        student.zero_grad()
        state = {k: v.clone() for k, v in student.state_dict().items()}
        out = fm(Step(batch.x, batch.y, y_partner=batch.y_partner, lam=batch.lam, teacher_logits=teacher_logits))
        out.loss.backward()
        student.load_state_dict(state)
        return out.loss.detach(), [p.grad.clone() for p in student.parameters()]

    live_loss, live_grads = loss_and_grads()
    cached_loss, cached_grads = loss_and_grads(teacher_logits=cached)
    assert torch.equal(live_loss, cached_loss)
    assert all(torch.equal(a, b) for a, b in zip(live_grads, cached_grads))


def _teacher_file(tmp_path, dm, resolution=32):
    path = tmp_path / f"teacher{resolution}.pt"
    torch.manual_seed(1)
    model = create_model("mobilenetv3_small_050", 10, low_res_stem=True)
    save_atomic(model_payload(model, dm.describe()), path)
    return str(path)


def _config(tmp_path, name, teacher, **changes):
    base = TrainConfig(run_dir=str(tmp_path / name), data="digits", resolution=32, student="mobilenetv3_small_050",
                       student_options={"low_res_stem": True}, teacher=teacher, method="fm", epochs=2,
                       batch_size=64, limit=512, optim=OptimConfig(lr=0.05), checkpoint_interval_s=1e9,
                       mixup=0.8, cutmix=1.0, randaug_ops=2, teacher_cache="memory")
    return base.replace(**changes)


@pytest.mark.slow
def test_fm_from_the_cache_trains_and_the_cache_serves_the_second_pass(tmp_path, digits32):
    teacher = _teacher_file(tmp_path, digits32)
    summary = api.train(_config(tmp_path, "fm", teacher, epochs=4, teacher_cache_variants=2))
    epochs = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [e["teacher_cache"]["hit_rate"] for e in epochs] == [0.0, 0.0, 1.0, 1.0]
    assert epochs[-1]["terms"]["kl"] < epochs[0]["terms"]["kl"]


def test_unlabeled_images_join_training_and_never_reach_the_label_term(tmp_path, digits32, monkeypatch):
    from edgekd.distill import labels

    seen = []
    original = labels.label_loss

    def spy(logits, y, mix=None, label_smoothing=0.0):
        rows = labels.labelled_rows(y, mix)
        seen.append((len(y), int(rows.sum()), int((y == UNLABELED).sum())))
        return original(logits, y, mix, label_smoothing)

    monkeypatch.setattr("edgekd.distill.kd.label_loss", spy)
    teacher = _teacher_file(tmp_path, digits32)
    summary = api.train(_config(tmp_path, "kd", teacher, method="kd", epochs=1, limit=None, mixup=0.0, cutmix=0.0,
                                randaug_ops=0, labels_per_class=5, unlabeled="rest"))
    assert summary["data"]["labels_per_class"] == 5
    unlabeled = summary["data"]["unlabeled"]["images"]
    assert summary["data"]["sizes"]["train"] == 50 and unlabeled > 1000
    total = sum(n for n, _, _ in seen)
    assert total == (50 + unlabeled) // 64 * 64  # every image (labelled or not) is trained on, drop_last
    assert sum(u for _, _, u in seen) > 0
    assert all(labelled == n - u for n, labelled, u in seen)  # labelled rows only reach CE


def test_teacher_resolution_run_trains_the_teacher_at_its_resolution(tmp_path):
    cfg = _config(tmp_path, "res", "mobilenetv3_small_050", teacher_options={"low_res_stem": True},
                  teacher_epochs=1, teacher_resolution=48, epochs=1)
    summary = api.train(cfg)
    assert summary["teacher_resolution"] == 48 and summary["resolution"] == 32
    teacher = read_checkpoint(Path(cfg.run_dir) / "teacher" / "best.pt", kind="model")
    assert teacher["data"]["resolution"] == 48
    student = read_checkpoint(Path(cfg.run_dir) / "best.pt", kind="model")
    assert student["data"]["resolution"] == 32
    assert summary["teacher"]["test_acc"] is not None


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("changes, message", [
    (dict(unlabeled="imagefolder:/nonexistent/unlabeled"), "--unlabeled imagefolder:/nonexistent/unlabeled: .*not found"),
    (dict(unlabeled="rest"), "--labels-per-class"),
    (dict(teacher_resolution=16), "below the student's 32 px"),
    (dict(mixup=-0.1), "mixup and cutmix alphas must be >= 0"),
    (dict(mix_prob=2.0), "mix_prob in \\[0, 1\\]"),
    (dict(method="fitnet", mixup=0.8), "does not handle --mixup"),
    (dict(method="ce", unlabeled="rest", labels_per_class=5, mixup=0.0), "has none"),
    (dict(labels_per_class=2.5), "neither a whole count nor a fraction"),
])
def test_bad_options_fail_with_one_line_before_anything_is_written(tmp_path, digits32, changes, message):
    teacher = _teacher_file(tmp_path, digits32)
    cfg_changes = dict(changes)
    with pytest.raises(EdgekdError, match=message) as info:
        api.train(_config(tmp_path, "bad", teacher, **cfg_changes))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "bad").exists()


def test_unlabeled_folders_are_converted_to_the_labelled_images_or_refused_in_one_line(tmp_path):
    from PIL import Image

    from edgekd.data.datamodule import load_data

    folder = tmp_path / "unl" / "any"
    folder.mkdir(parents=True)
    for i in range(3):  # grey + alpha, another size: converted to digits' stored form and resolution
        Image.fromarray(np.full((20, 12, 2), 40 * (i + 1), dtype=np.uint8), mode="LA").save(folder / f"{i}.png")
    dm = load_data("digits", resolution=32, channels=3, unlabeled=f"imagefolder:{tmp_path / 'unl'}")
    assert len(dm.unlabeled) == 3 and (dm.unlabeled.labels == UNLABELED).all()
    assert dm.unlabeled.get_batch(torch.arange(3)).shape[1:] == dm.train.get_batch(torch.arange(1)).shape[1:]
    with pytest.raises(EdgekdError, match="must fit in memory") as info:  # decoded lazily: not supported
        load_data("digits", resolution=32, channels=3, unlabeled=f"imagefolder:{tmp_path / 'unl'}", memory_budget=1)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("args, message", [
    (["--randaug", "two"], "--randaug expects N,M"),
    (["--randaug", "9,9"], "randaug_ops must be in 0..4"),
    (["--mixup", "-1"], "mixup and cutmix alphas must be >= 0"),
    (["--teacher-resolution", "16", "--resolution", "32"], "below the student's 32 px"),
    (["--unlabeled", "imagefolder:/nowhere/at/all", "--method", "kd"], "--unlabeled imagefolder:/nowhere/at/all"),
])
def test_cli_options_fail_in_one_line(tmp_path, args, message):
    from click.testing import CliRunner

    from edgekd.cli import main

    out = CliRunner().invoke(main, ["train", "--data", "digits", "--run-dir", str(tmp_path / "r"), "--teacher",
                                    "resnet18", *args], catch_exceptions=False)
    assert out.exit_code == 2 and message in out.output and out.output.count("\n") == 1, out.output
    assert not (tmp_path / "r").exists()
