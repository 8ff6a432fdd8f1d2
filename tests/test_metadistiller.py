"""MetaDistiller: generator shapes, the meta-gradient (only the generator, equal to finite differences), exits
dropped at export with unchanged cost, training with the meta step and exact resume."""
from pathlib import Path

import pytest
import torch
from torch import nn

from edgekd import api
from edgekd.config import OptimConfig, TrainConfig
from edgekd.distill import METHODS
from edgekd.errors import EdgekdError
from edgekd.models import create_model
from edgekd.profile.graph import trace_model
from edgekd.train.checkpoint import read_checkpoint
from edgekd.train.trainer import TrainingInterrupted


def method(name="mcunet_tiny", num_classes=10, **options):
    torch.manual_seed(0)
    student = create_model(name, num_classes, low_res_stem=True, **options.pop("model", {}))
    cls = METHODS.get("metadistiller")
    return cls(student, None, cls.Options.from_strings(options))


@pytest.mark.parametrize("name", ["mobilenetv2_035", "mobilenetv3_small_050", "efficientnet_lite0", "mcunet_tiny",
                                  "resnet18"])
def test_generator_targets_and_exits_for_each_family(name):
    d = method(name).train()
    x = torch.randn(4, 3, 32, 32)
    logits, exits, feats = d.outputs(x)
    targets = d.generator(feats)
    assert len(exits) == len(targets) == len(d.stages) - 1 == 3
    assert all(t.shape == e.shape == logits.shape == (4, 10) for t, e in zip(targets, exits))


def _smooth(module: nn.Module) -> None:
    """ReLU -> SiLU everywhere: finite differences need a smooth function (autograd takes one side at a kink)."""
    for name, child in module.named_children():
        if isinstance(child, (nn.ReLU, nn.ReLU6)):
            setattr(module, name, nn.SiLU())
        else:
            _smooth(child)


def test_meta_gradient_reaches_only_the_generator_and_matches_finite_differences():
    d = method(num_classes=4, model={"width_mult": 0.35}, generator_channels="8", alpha="0", temperature="2")
    d = d.double().eval()
    _smooth(d)
    with torch.no_grad():  # larger logits: a gradient well above the finite-difference noise
        for head in d.generator.heads:
            head.fc.weight.mul_(100)
        d.student.classifier.weight.normal_(0, 1.0)
    x, y = torch.randn(8, 3, 16, 16, dtype=torch.float64), torch.randint(0, 4, (8,))
    split = torch.randperm(8)
    _, grads = d.meta_gradient(x, y, 1.0, split)
    assert all(p.grad is None for p in d.student.parameters()) and all(p.grad is None for p in d.exits.parameters())
    assert sum(float(g.abs().sum()) for g in grads) > 0
    generator = list(d.generator.parameters())
    direction = [torch.randn_like(p) for p in generator]
    analytic = float(sum((g * v).sum() for g, v in zip(grads, direction)))

    def objective(step: float) -> float:
        with torch.no_grad():
            for p, v in zip(generator, direction):
                p.add_(step * v)
        value = float(d.meta_gradient(x, y, 1.0, split)[0])
        with torch.no_grad():
            for p, v in zip(generator, direction):
                p.sub_(step * v)
        return value

    eps = 1e-5
    numeric = (objective(eps) - objective(-eps)) / (2 * eps)
    assert abs(analytic) > 1e-4 and abs(numeric / analytic - 1) < 1e-3


def test_exits_vanish_and_cost_is_unchanged():
    d = method("mobilenetv2_035")
    exported = d.student_for_export()
    plain = create_model("mobilenetv2_035", 10, low_res_stem=True)
    assert type(exported) is type(plain) and set(exported.state_dict()) == set(plain.state_dict())
    assert trace_model(exported, 32).macs == trace_model(plain, 32).macs
    assert not any("exits" in k or "generator" in k for k in exported.state_dict())


def test_bad_options():
    for options in ({"mode": "teacher"}, {"meta_every": "0"}, {"alpha": "2"}):
        with pytest.raises(EdgekdError, match="metadistiller"):
            method(**options)


def _config(tmp_path: Path, name: str, **changes) -> TrainConfig:
    base = TrainConfig(run_dir=str(tmp_path / name), data="digits", resolution=32, student="mcunet_tiny",
                       student_options={"low_res_stem": True}, teacher=None, method="metadistiller", epochs=3,
                       batch_size=64, optim=OptimConfig(lr=0.05, warmup_epochs=0.5), seed=0, checkpoint_interval_s=1e9,
                       method_options={"meta_every": "1"})
    return base.replace(**changes)


@pytest.mark.slow  # an end-to-end run (make test-slow)
def test_trains_with_the_meta_step_reports_the_ensemble_and_resumes(tmp_path):
    straight = api.train(_config(tmp_path, "straight"))
    assert straight["test_acc"] > 0.5 and straight["last_epoch_ensemble_test_acc"] > 0.5  # chance is 0.1
    last = read_checkpoint(Path(straight["run_dir"]) / "last.pt")
    assert any(k.startswith("generator_optimizer.") for k in last["extra"])  # Adam state is checkpointed

    cfg = _config(tmp_path, "interrupted")
    calls = []

    def stop_in_epoch_two(trainer, step):
        calls.append(step)
        if len(calls) == 22 + 5:
            trainer.request_stop()

    with pytest.raises(TrainingInterrupted):
        api.train(cfg, on_step=stop_in_epoch_two)
    api.train(TrainConfig(run_dir=cfg.run_dir), resume=True)
    b = read_checkpoint(Path(cfg.run_dir) / "last.pt")
    assert all(torch.equal(last["student"][k], b["student"][k]) for k in last["student"])
    assert all(torch.equal(last["extra"][k], b["extra"][k]) for k in last["extra"])
