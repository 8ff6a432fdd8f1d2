"""DistPro: the finite-difference alpha gradient against autograd's exact second order, the biased softmax, the
process interpolation, clipped pathways, and a search -> replay round trip through process.json."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from edgekd import api
from edgekd.config import OptimConfig, TrainConfig
from edgekd.distill import METHODS
from edgekd.distill.distpro import biased_softmax, interpolate_process
from edgekd.distill.step import Step
from edgekd.errors import EdgekdError
from edgekd.models import create_model


def distpro(student="mcunet_tiny", teacher="resnet18", double=False, **options):
    torch.manual_seed(0)
    t = create_model(teacher, 10, low_res_stem=False).eval()
    s = create_model(student, 10, low_res_stem=True, **options.pop("model", {}))
    cls = METHODS.get("distpro")
    d = cls(s, t, cls.Options.from_strings(options))
    return d.double() if double else d


def _smooth(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, (nn.ReLU, nn.ReLU6)):
            setattr(module, name, nn.SiLU())
        else:
            _smooth(child)


def test_finite_difference_alpha_gradient_matches_exact_second_order():
    torch.manual_seed(1)
    t = create_model("mcunet_tiny", 4, low_res_stem=True, width_mult=0.35).double().eval()
    s = create_model("mcunet_tiny", 4, low_res_stem=True, width_mult=0.25).double().eval()
    cls = METHODS.get("distpro")
    d = cls(s, t, cls.Options.from_strings({"distance": "l2", "transforms": "conv1x1,attention", "stages": "2"}))
    d = d.double().eval()
    _smooth(d)  # finite differences need a smooth function
    with torch.no_grad():
        d.alpha_logits.copy_(torch.randn(len(d.pathways)))
    xt, yt = torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.randint(0, 4, (6,))
    xv, yv = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randint(0, 4, (4,))
    approx = d.alpha_gradient(xt, yt, xv, yv, 0.5)
    exact = d.alpha_gradient(xt, yt, xv, yv, 0.5, exact=True)
    assert exact.abs().max() > 0
    assert torch.allclose(approx, exact, rtol=0.02, atol=0.02 * float(exact.abs().max()))


def test_biased_softmax_leaves_room_for_the_bias_term():
    logits = torch.tensor([1.0, 0.0, -2.0])
    w = biased_softmax(logits, g=1.0)
    z = logits.exp().sum() + torch.tensor(1.0).exp()
    assert torch.allclose(w, logits.exp() / z)
    assert float(w.sum() + torch.tensor(1.0).exp() / z) == pytest.approx(1.0)
    assert torch.allclose(biased_softmax(torch.ones(26)), torch.full((26,), 1 / 27))  # a~_0 = 1: 1/(P+1) each


def test_interpolation_is_exact_at_both_ends_and_linear_between():
    process = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 9.0]])
    out = interpolate_process(process, 5)
    assert out.shape == (5, 2)
    assert torch.equal(out[0], process[0]) and torch.equal(out[-1], process[-1])
    assert torch.allclose(out[1], (process[0] + process[1]) / 2) and torch.equal(out[2], process[1])
    assert torch.equal(interpolate_process(process, 3), process)


def test_clipped_pathways_are_not_computed():
    d = distpro()
    calls = [0] * len(d.pathways)
    for p, module in enumerate(d.transforms):
        module.register_forward_hook(lambda *_, p=p: calls.__setitem__(p, calls[p] + 1))
    logits = torch.full((len(d.pathways),), 1.0)
    logits[:10] = 0.2  # <= clip 0.5
    d.process = logits.unsqueeze(0).repeat(3, 1)
    d._retrain_steps = 3
    weights, active = d.retrain_weights()
    assert active == list(range(10, len(d.pathways)))
    out = d.forward_phase("retrain", Step(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))))
    assert calls[:10] == [0] * 10 and all(c == 1 for c in calls[10:])
    assert out.terms["pathways"] == len(d.pathways) - 10 and weights.shape == (len(d.pathways),)


def test_transforms_run_at_the_smaller_map():
    """transform_at=smaller resizes first only where the teacher's map is smaller; for a 1x1 conv and BatchNorm
    with fixed statistics (eval) the order does not change the loss, since both are linear per position/channel."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    seen = {}
    losses = {}
    for at in ("smaller", "student"):
        d = distpro(transforms="conv1x1", transform_at=at).eval()  # distpro() seeds: both get the same weights
        for p, module in enumerate(d.transforms):
            module.register_forward_pre_hook(lambda _, args, key=(at, p): seen.__setitem__(key, args[0].shape[-2:]))
        _, s_feats, t_feats = d._features(x)
        losses[at] = d.pathway_losses(s_feats, t_feats)
        sizes = [(tuple(t_feats[i].shape[-2:]), tuple(s_feats[j].shape[-2:])) for i, j, _ in d.pathways]
    shrinking = [p for p, (t, s) in enumerate(sizes) if t[0] * t[1] < s[0] * s[1]]
    assert shrinking and len(shrinking) < len(sizes)  # both kinds of pathway occur
    for p, (t_size, s_size) in enumerate(sizes):
        assert tuple(seen["student", p]) == s_size
        assert tuple(seen["smaller", p]) == (t_size if p in shrinking else s_size)
        assert torch.allclose(losses["smaller"][p], losses["student"][p], rtol=1e-4, atol=1e-6)
    with pytest.raises(EdgekdError, match="transform_at must be one of smaller, student"):
        distpro(transform_at="teacher")


def test_bad_process_file_and_options(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"pathways": [{}] * 3, "alpha_logits": [[1, 1, 1]]}))
    with pytest.raises(EdgekdError, match="has 3 pathways but this teacher/student pair has 27"):
        distpro(process=str(tmp_path / "p.json"))
    with pytest.raises(EdgekdError, match="distpro"):
        distpro(transforms="conv5x5")


def _config(tmp_path, name, teacher, **changes):
    return TrainConfig(run_dir=str(tmp_path / name), data="digits", resolution=32, student="mcunet_tiny",
                       student_options={"low_res_stem": True}, teacher=teacher, method="distpro", epochs=3,
                       batch_size=64, optim=OptimConfig(lr=0.05, warmup_epochs=0.5), seed=0,
                       checkpoint_interval_s=1e9).replace(**changes)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    run = tmp_path_factory.mktemp("distpro") / "teacher"
    api.train(TrainConfig(run_dir=str(run), data="digits", resolution=32, student="resnet18",
                          student_options={"low_res_stem": False}, teacher=None, method="ce", epochs=2, batch_size=64,
                          seed=0, checkpoint_interval_s=1e9))
    return run


@pytest.mark.slow  # an end-to-end run (make test-slow)
def test_search_then_replay_and_transfer_a_saved_process(tmp_path, teacher):
    searched = api.train(_config(tmp_path, "search", str(teacher), epochs=5))  # search 1, retrain 4
    run = Path(searched["run_dir"])
    saved = json.loads((run / "process.json").read_text())
    steps_search = len(saved["alpha_logits"])
    assert steps_search > 5 and len(saved["pathways"]) == 27
    assert (run / "process.png").stat().st_size > 5_000
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["phase"] for m in metrics] == ["search"] + ["retrain"] * 4
    assert searched["test_acc"] > 0.3
    # replay without searching: the retrain phase only, the same process
    replay = api.train(_config(tmp_path, "replay", str(teacher), epochs=2,
                               method_options={"process": str(run / "process.json")}))
    assert json.loads((Path(replay["run_dir"]) / "process.json").read_text())["alpha_logits"] == saved["alpha_logits"]
    assert [json.loads(line)["phase"] for line in (Path(replay["run_dir"]) / "metrics.jsonl").read_text().splitlines()] \
        == ["retrain", "retrain"]


@pytest.mark.slow  # an end-to-end run (make test-slow)
def test_resume_in_the_search_phase_is_exact(tmp_path, teacher):
    from edgekd.train.checkpoint import read_checkpoint
    from edgekd.train.trainer import TrainingInterrupted

    straight = api.train(_config(tmp_path, "straight", str(teacher)))
    cfg = _config(tmp_path, "interrupted", str(teacher))
    calls = []

    def stop_in_the_search(trainer, step):
        calls.append(step)
        if len(calls) == 10:
            trainer.request_stop()

    with pytest.raises(TrainingInterrupted, match="stopped in search"):
        api.train(cfg, on_step=stop_in_the_search)
    state = read_checkpoint(Path(cfg.run_dir) / "last.pt", kind="training")
    assert state["phase"] == 0 and state["extra"]["process"].shape[0] == 10
    assert any(k.startswith("alpha_optimizer.") for k in state["extra"])
    api.train(TrainConfig(run_dir=cfg.run_dir), resume=True)
    a = read_checkpoint(Path(straight["run_dir"]) / "last.pt")
    b = read_checkpoint(Path(cfg.run_dir) / "last.pt")
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])
    assert all(torch.equal(a["extra"][k], b["extra"][k]) for k in a["extra"])


def test_moving_a_phase_moves_the_methods_own_parameters_and_buffers():
    """The trainer moves each phase's view (.to(device)); DistPro's alpha logits and process live on the parent."""
    d = distpro()
    for phase in d.phases(4, OptimConfig()):
        phase.distiller.to(torch.float64)
        assert d.alpha_logits.dtype == torch.float64 and d.process.dtype == torch.float64
        assert all(p.dtype == torch.float64 for p in d.student.parameters())
        d.to(torch.float32)
