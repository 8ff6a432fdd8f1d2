import math

import pytest
import torch
import torch.nn.functional as F

from edgekd.distill import METHODS, kd_loss
from edgekd.distill.features import run_with_taps
from edgekd.distill.kd import HintonKD, KDOptions
from edgekd.distill.step import Step
from edgekd.errors import EdgekdError
from edgekd.models import create_model


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[2.0, 0.0, 1.0]])
    T = 2.0
    p = [math.exp(v / T) for v in t[0].tolist()]
    q = [math.exp(v / T) for v in s[0].tolist()]
    p = [v / sum(p) for v in p]
    q = [v / sum(q) for v in q]
    expected = T * T * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-7)


def test_hinton_kd_mixes_soft_and_hard_terms():
    student = create_model("mobilenetv3_small_050", 10, input_size=32, low_res_stem=True, dropout=0.0)
    teacher = create_model("mobilenetv3_small_050", 10, input_size=32, low_res_stem=True)
    opts = KDOptions(temperature=3.0, alpha=0.7)
    distiller = HintonKD(student, teacher, opts).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = distiller(Step(x, y))
    with torch.no_grad():
        s, t = student(x), teacher(x)
    expected = 0.7 * kd_loss(s, t, 3.0) + 0.3 * F.cross_entropy(s, y)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(out.terms) == {"kd", "ce"}


def test_teacher_stays_frozen_in_eval_mode_and_gets_no_gradient():
    student = create_model("mobilenetv3_small_050", 10, input_size=32, low_res_stem=True)
    teacher = create_model("resnet18", 10, input_size=32, low_res_stem=True)
    distiller = HintonKD(student, teacher, KDOptions())
    distiller.train()
    assert not distiller.teacher.training and all(not m.training for m in distiller.teacher.modules())
    assert distiller.student.training
    running = [m.running_mean.clone() for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    out = distiller(Step(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))))
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    after = [m.running_mean for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(running, after))
    assert distiller.extra_parameters() == []


def test_feature_taps_collect_by_module_path_and_reject_unknown_paths():
    model = create_model("resnet18", 10, input_size=32, low_res_stem=True)
    paths = [info.module for info in model.feature_info]
    x = torch.randn(2, 3, 32, 32)
    logits, feats = run_with_taps(model, x, paths)
    assert torch.equal(logits, model(x))
    assert [f.shape[1] for f in feats] == [info.channels for info in model.feature_info]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed again
    out, (early,) = run_with_taps(model, x, [paths[0]], stop_after=paths[0])  # the forward ends there
    assert out is None and torch.equal(early, feats[0])
    with pytest.raises(RuntimeError, match="did not fire"):
        run_with_taps(model, x, [paths[-1]], stop_after=paths[0])
    with pytest.raises(EdgekdError, match="has no module 'layer9'"):
        run_with_taps(model, x, ["layer9"])


def test_method_options_are_strict_and_typed():
    assert KDOptions.from_strings({"temperature": "2", "alpha": "0.5"}) == KDOptions(2.0, 0.5)
    with pytest.raises(EdgekdError, match="unknown method option 'temprature'; did you mean 'temperature'"):
        KDOptions.from_strings({"temprature": "2"})
    with pytest.raises(EdgekdError, match="not a valid float"):
        KDOptions.from_strings({"alpha": "high"})
    with pytest.raises(EdgekdError, match="alpha must be in"):
        KDOptions.from_strings({"alpha": "1.5"})


def test_kd_requires_a_teacher_and_methods_are_registered():
    assert {"ce", "kd"} <= set(METHODS.names())
    student = create_model("mobilenetv3_small_050", 10, input_size=32, low_res_stem=True)
    with pytest.raises(EdgekdError, match="needs a teacher"):
        HintonKD(student, None, KDOptions())
    with pytest.raises(EdgekdError, match="unknown method 'kdd'; did you mean 'kd'"):
        METHODS.get("kdd")
