"""NetAug: the base sub-network is exactly the exported student, augmented configurations share its weights, the
schedule and channel sorting behave, and it trains and resumes under the trainer."""
import itertools
import json
from pathlib import Path

import pytest
import torch

from edgekd import api
from edgekd.config import OptimConfig, TrainConfig
from edgekd.distill import METHODS
from edgekd.distill.step import Step
from edgekd.errors import EdgekdError
from edgekd.models import create_model
from edgekd.train.checkpoint import read_checkpoint
from edgekd.train.trainer import TrainingInterrupted

FAMILIES = ["mobilenetv2_035", "mobilenetv3_small_050", "mobilenetv3_large_035", "efficientnet_lite0",
            "efficientnet_b0", "mcunet_tiny"]


def netaug(name="mobilenetv2_035", **options):
    torch.manual_seed(0)
    student = create_model(name, 10, low_res_stem=True)
    cls = METHODS.get("netaug")
    return cls(student, None, cls.Options.from_strings(options))


@pytest.mark.parametrize("name", FAMILIES)
def test_base_is_exactly_the_exported_student(name):
    d = netaug(name).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        base = d.run(x)
        exported = d.student_for_export()
        assert torch.equal(base, exported(x))
        # a fresh zoo model with the exported weights is the same network: same class, same keys
        fresh = create_model(name, 10, low_res_stem=True).eval()
        fresh.load_state_dict(exported.state_dict(), strict=True)
        assert torch.allclose(fresh(x), base, atol=1e-6)
    kinds = {g.kind for g in d.groups.values()}
    assert kinds == {"fixed", "width", "expand"}


def test_groups_follow_the_architecture():
    d = netaug("mobilenetv2_035")
    student = d.student
    # the first inverted residual's expansion is an expand group; the stem output is a width group
    expand = d.dims["blocks.1.0.conv_pw.conv.weight"][0][1]
    assert d.groups[expand].kind == "expand" and d.groups[expand].base == student.blocks[1][0].conv_pw.conv.out_channels
    assert d.groups[d.dims["stem.conv.weight"][0][1]].kind == "width"
    # the classifier's outputs and the image channels never grow
    assert d.groups[d.dims["classifier.weight"][0][1]].kind == "fixed"
    largest = d._sizes(2.6, 2.8)
    assert largest[expand] >= round(d.groups[expand].base * 2.6 * 2.8 / 8) * 8 - 8
    assert all(size % 8 == 0 for g, size in largest.items() if d.groups[g].kind != "fixed")


def test_sampled_configurations_cover_the_lists_and_repeat_per_seed():
    a, b = netaug(), netaug()
    draws = [a.sample() for _ in range(300)]
    assert set(draws) == set(itertools.product(a.width_factors, a.expand_factors))
    assert draws == [b.sample() for _ in range(300)]  # every DDP rank and a resumed run draw the same
    assert netaug(seed=1).sample() != draws[0] or netaug(seed=1).sample() != draws[1]


def test_one_step_updates_the_shared_weights_the_base_uses():
    d = netaug().train()
    before = {k: v.detach().clone() for k, v in d.shared.items()}
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    out = d(Step(x, y))
    assert set(out.terms) >= {"base", "augmented", "width", "expand"}
    out.loss.backward()
    opt.step()
    key = "blocks__1__0__conv_pw__conv__weight"
    base_shape = d.student.blocks[1][0].conv_pw.conv.weight.shape
    base_slice = tuple(slice(0, s) for s in base_shape)
    assert not torch.equal(d.shared[key][base_slice], before[key][base_slice])
    assert not torch.equal(d.shared[key], before[key])
    # the student's own weights are only the export copy: untouched until student_for_export
    assert torch.equal(d.student.blocks[1][0].conv_pw.conv.weight, before[key][base_slice])
    assert torch.equal(d.student_for_export().blocks[1][0].conv_pw.conv.weight, d.shared[key][base_slice])


def test_augmentation_stops_for_the_last_part_of_training():
    d = netaug(stop_fraction="0.5").train()
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.1)
    seen = []
    for epoch in range(4):
        d.on_epoch_start(epoch, 4, opt)
        seen.append("augmented" in d(Step(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))).terms)
    assert seen == [True, True, False, False]


def test_channel_sorting_keeps_the_function_and_moves_important_channels_first():
    d = netaug(sort_channels="true")
    x = torch.randn(2, 3, 32, 32)
    largest = d._sizes(max(d.width_factors), max(d.expand_factors))
    with torch.no_grad():
        for value in d.shared.values():
            value.add_(torch.randn_like(value) * 0.05)
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.1, momentum=0.9)
    d.train()
    d(Step(x, torch.tensor([0, 1]))).loss.backward()
    opt.step()
    d.eval()
    with torch.no_grad():
        before = d.run(x, largest)
        momentum = opt.state[d.shared["blocks__1__0__conv_pwl__conv__weight"]]["momentum_buffer"].clone()
        d.sort_channels(opt)
        after = d.run(x, largest)
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-3)  # a consistent permutation of every tensor of the group
    pwl = d.shared["blocks__1__0__conv_pwl__conv__weight"]
    importance = pwl.abs().sum(dim=(0, 2, 3))
    assert torch.all(importance[:-1] >= importance[1:])
    moved = opt.state[pwl]["momentum_buffer"]
    assert torch.allclose(moved.abs().sum(), momentum.abs().sum()) and not torch.equal(moved, momentum)


def test_bad_options_are_one_line_errors():
    for options in ({"expand_factors": "1.6,2.2"}, {"width_factors": "1.0,x"}, {"stop_fraction": "1.0"}):
        with pytest.raises(EdgekdError, match="netaug"):
            netaug(**options)


def _config(tmp_path: Path, name: str, **changes) -> TrainConfig:
    base = TrainConfig(run_dir=str(tmp_path / name), data="digits", resolution=32, student="mobilenetv2_035",
                       student_options={"low_res_stem": True}, teacher=None, method="netaug", epochs=3,
                       batch_size=64, optim=OptimConfig(lr=0.02, warmup_epochs=0.5), seed=0,
                       checkpoint_interval_s=1e9, method_options={"stop_fraction": "0.34", "bn_batches": "4"})
    return base.replace(**changes)


@pytest.mark.slow  # an end-to-end run (make test-slow)
def test_netaug_trains_exports_a_plain_student_and_resumes(tmp_path):
    straight = api.train(_config(tmp_path, "straight"))
    assert straight["test_acc"] > 0.3  # chance is 0.1; 3 short epochs, the first two augmented
    epochs = [json.loads(line) for line in (Path(straight["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert ["augmented" in e["terms"] for e in epochs] == [True, True, False]
    best = read_checkpoint(Path(straight["run_dir"]) / "best.pt", kind="model")
    assert best["model_config"]["name"] == "mobilenetv2_035"
    model = create_model(**best["model_config"])
    model.load_state_dict(best["state_dict"], strict=True)

    cfg = _config(tmp_path, "interrupted")
    calls = []

    def stop_late_in_epoch_two(trainer, step):
        calls.append(step)
        if len(calls) == 22 + 15:
            trainer.request_stop()

    with pytest.raises(TrainingInterrupted):
        api.train(cfg, on_step=stop_late_in_epoch_two)
    resumed = api.train(TrainConfig(run_dir=cfg.run_dir), resume=True)
    a = read_checkpoint(Path(straight["run_dir"]) / "last.pt")
    b = read_checkpoint(Path(resumed["run_dir"]) / "last.pt")
    assert all(torch.equal(a["extra"][k], b["extra"][k]) for k in a["extra"])
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])
