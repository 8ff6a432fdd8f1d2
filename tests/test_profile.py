"""The profiler: MACs against an independent counter, the arena planner on graphs with known answers, memory and
flash estimates against TFLite Micro measurements, latency calibration, Pareto selection, reports and bad input."""
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edgekd.cli import main
from edgekd.errors import EdgekdError
from edgekd.models import create_model, list_models
from edgekd.profile.estimate import MEASUREMENTS, estimate_graph
from edgekd.profile.graph import Graph, Op, Tensor, trace_model
from edgekd.profile.latency import reference_errors
from edgekd.profile.memory import Buffer, lower_bound, plan_greedy
from edgekd.profile.select import Candidate, pareto_front, parse_sweep, select
from edgekd.targets import list_targets, load_target

def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# ---------------------------------------------------------------- MACs

@pytest.mark.parametrize("name", list_models(role="student"))
@pytest.mark.parametrize("resolution", [32, 64])
def test_macs_agree_with_torch_flop_counter(name, resolution):
    model = create_model(name, 10, low_res_stem=resolution <= 96).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, resolution, resolution))
    reference_macs = counter.get_total_flops() / 2  # conv and matmul flops = 2 x MACs
    graph = trace_model(model, resolution)
    assert abs(graph.model_macs / reference_macs - 1) < 0.01
    assert graph.macs >= graph.model_macs  # plus what the TFLite converter adds
    # parameters after BatchNorm folding: every conv gains a bias, BN's own parameters disappear
    folded = sum(p.numel() for n, p in model.named_parameters() if ".bn." not in n and not n.startswith("bn"))
    folded += sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d) and m.bias is None)
    assert graph.params >= folded * 0.99


# ---------------------------------------------------------------- planner on hand-built graphs

def _graph(ops, sizes, inputs=("x",), outputs=None):
    tensors = {name: Tensor(name, (size,)) for name, size in sizes.items()}
    return Graph("hand", "traced", tensors, ops, list(inputs), list(outputs or [ops[-1].output]))


def _plan(graph):
    buffers = [Buffer(n, graph.tensors[n].elements, a, b) for n, (a, b) in graph.lifetimes().items()]
    return plan_greedy(buffers), buffers


def test_planner_residual_block():
    # x -> conv1 -> a -> conv2 -> b ; y = x + b: x lives until the add, so x, a and then x, b, y overlap
    ops = [Op("conv1", "CONV_2D", ["x"], "a"), Op("conv2", "CONV_2D", ["a"], "b"), Op("add", "ADD", ["x", "b"], "y")]
    plan, buffers = _plan(_graph(ops, {"x": 1024, "a": 2048, "b": 1024, "y": 1024}))
    assert plan.peak_bytes == 1024 + 2048 + 1024 == lower_bound(buffers)  # x + a + b at conv2
    offsets = plan.offsets
    assert offsets["a"] == 0 and offsets["x"] == 2048  # largest first at 0, then first fit
    assert offsets["y"] == 0  # a is dead by the add, so y reuses its space


def test_planner_branch_and_fragmentation():
    # two branches read x; their outputs meet in a concat
    ops = [Op("b1", "CONV_2D", ["x"], "p"), Op("b2", "CONV_2D", ["x"], "q"),
           Op("cat", "CONCATENATION", ["p", "q"], "r")]
    plan, buffers = _plan(_graph(ops, {"x": 100, "p": 50, "q": 50, "r": 100}))
    # sizes are aligned to 16 bytes: x 112, p 64, q 64, r 112; at op 1 x, p, q are alive, at op 2 p, q, r
    assert lower_bound(buffers) == 112 + 64 + 64
    assert plan.peak_bytes == 240
    # the greedy order can fragment: a buffer placed early blocks a gap the optimum would use
    frag = [Buffer("A", 64, 0, 1), Buffer("B", 48, 1, 2), Buffer("C", 48, 0, 0), Buffer("D", 64, 2, 3)]
    assert plan_greedy(frag).peak_bytes >= lower_bound(frag)


def test_planner_rejects_bad_lifetimes():
    with pytest.raises(ValueError, match="invalid"):
        plan_greedy([Buffer("t", 16, 3, 1)])


# ---------------------------------------------------------------- against TFLite Micro measurements

def _measurements():
    return [json.loads(line) for line in MEASUREMENTS.read_text().splitlines() if line.strip()]


def test_measurements_cover_the_zoo_at_two_resolutions():
    rows = _measurements()
    assert {r["resolution"] for r in rows} >= {32, 64}
    assert len({r["model"] for r in rows}) >= 5


@pytest.mark.parametrize("row", _measurements(), ids=lambda r: f"{r['model']}@{r['resolution']}")
def test_estimates_match_tflm_and_file_size(row):
    """The estimate from the traced PyTorch model (today's code) against what tools/measure_tflm.py measured on the
    real int8 .tflite: activations within 10% of TFLM's planned head, the arena within 10% of TFLM's total,
    flash within 5% of the file size."""
    model = create_model(row["model"], 10, low_res_stem=row["resolution"] <= 96)
    est = estimate_graph(trace_model(model, row["resolution"]), "int8")
    assert abs(est["activation_bytes"] / row["tflm"]["head"] - 1) <= 0.10
    assert abs(est["arena_bytes"] / row["tflm"]["total"] - 1) <= 0.10
    assert abs(est["flash_bytes"] / row["tflite_bytes"] - 1) <= 0.05


# ---------------------------------------------------------------- latency model

@pytest.mark.parametrize("target", [t.name for t in list_targets()])
def test_latency_model_reproduces_its_fit_references(target):
    rows = reference_errors(load_target(target))
    assert rows, f"{target} has no latency references"
    for row in rows:
        assert row["estimate_ms"] > 0
        if row["role"] == "fit":
            assert abs(row["error"]) < 0.25, row


# ---------------------------------------------------------------- Pareto and selection

def test_pareto_front_on_fixed_numbers():
    points = [{"acc": 0.80, "ms": 10}, {"acc": 0.85, "ms": 20}, {"acc": 0.84, "ms": 25}, {"acc": 0.70, "ms": 5},
              {"acc": 0.85, "ms": 30}]
    assert pareto_front(points, maximise=["acc"], minimise=["ms"]) == [0, 1, 3]


def test_select_picks_the_largest_that_fits_and_explains():
    target = load_target("cortex-m7")
    result = select(target, [Candidate("mobilenetv3_small_050", 32), Candidate("mobilenetv2_035", 64),
                             Candidate("mcunet_tiny", 32)])
    fitting = [r for r in result.rows if not r["misses"]]
    assert result.chosen["macs"] == max(r["macs"] for r in fitting)
    assert result.chosen["candidate"] in result.reason and "fit cortex-m7" in result.reason
    missed = [r for r in result.rows if r["misses"]]
    assert missed and all(r["candidate"] in result.reason for r in missed)


def test_select_when_nothing_fits_names_the_closest():
    with pytest.raises(EdgekdError, match=r"no candidate fits cortex-m4 .* the closest, mobilenetv2_050@64, misses"):
        select(load_target("cortex-m4"), [Candidate("mobilenetv2_050", 64), Candidate("mobilenetv2_100", 64)])


def test_sweep_spec():
    cands = parse_sweep("arch=mobilenetv2_100,mobilenetv3_small_100;width=0.35,0.5;res=32,64")
    assert len(cands) == 8 and Candidate("mobilenetv2_100", 64, 0.5) in cands
    for bad in ("arch=mobilenetv2_100", "arch=nope;res=32", "arch=mobilenetv2_100;res=x", "res=32;res=64",
                "arch=mcunet_tiny;width=0;res=32", "foo"):
        with pytest.raises(EdgekdError, match="sweep spec"):
            parse_sweep(bad)


# ---------------------------------------------------------------- CLI and reports

def test_profile_model_writes_json_markdown_and_plot(tmp_path):
    out = run("profile", "mcunet_tiny@32", "mobilenetv3_small_035@32", "--target", "cortex-m7,jetson-nano",
              "--runners", "pytorch", "--runs", "5", "--out", str(tmp_path))
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "cortex-m7" / "mcunet_tiny@32.json").read_text())
    assert report["estimate"]["macs"] > 1e6 and report["estimate"]["arena_bytes"] > report["estimate"]["activation_bytes"]
    host = report["latency"]["host"][0]
    assert host["where"] == "host" and host["p50_ms"] <= host["p90_ms"] <= host["p99_ms"]
    assert report["latency"]["host_limit_ms"] > 0 and len(report["layers"]) == report["graph"]["ops"]
    for target in ("cortex-m7", "jetson-nano"):
        assert (tmp_path / target / "report.png").stat().st_size > 10_000
        assert "not on the device" in (tmp_path / target / "report.md").read_text()
    fp16 = json.loads((tmp_path / "jetson-nano" / "mcunet_tiny@32.json").read_text())
    assert fp16["estimate"]["weight_bytes"] == 2 * fp16["estimate"]["params"]


def test_the_two_parameter_counts_have_two_names(tmp_path):
    """Training prints the PyTorch parameter count; the profile and select count the deployed graph's weights."""
    model = create_model("mobilenetv3_small_050", 10, low_res_stem=True).eval()  # the demo's student
    graph = trace_model(model, 32)
    duplicated = sum(op.params for op in graph.ops if op.converter_added)  # the head FC before its hard-swish
    assert (sum(p.numel() for p in model.parameters()), graph.params, duplicated) == (409_394, 553_778, 147_968)
    out = run("profile", "mobilenetv3_small_050@32", "--target", "cortex-m7", "--runners", "none", "--no-plot",
              "--out", str(tmp_path))
    assert out.exit_code == 0, out.output
    report = (tmp_path / "cortex-m7" / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| model |"))
    assert "| deployed weights |" in header and "params" not in header and "554K" in report
    assert "Deployed weights: the weight and bias elements of the deployed graph" in report
    out = run("select", "mobilenetv3_small_050@32", "--target", "cortex-m7")
    assert out.exit_code == 0 and "deployed weights" in out.output and "params" not in out.output, out.output


@pytest.mark.parametrize("args, message", [
    (["profile", "mcunet_tiny@32", "--target", "cortex-m7", "--runners", "tpu"], "unknown runner 'tpu'"),
    (["profile", "mcunet_tiny@32", "--target", "cortex-m7", "--runners", "litert"], "needs an int8 .tflite"),
    (["profile", "mcunet_tiny", "--target", "cortex-m7"], "needs a resolution"),
    (["profile", "mcunet_tiny@32"], "pass --target"),
    (["profile", "no_such_model@32", "--target", "cortex-m7"], "not a run, an export or a zoo model"),
    (["select", "--target", "cortex-m7", "--sweep", "arch=mcunet_tiny"], "malformed sweep spec"),
    (["select", "--target", "cortex-m7", "--resolutions", "3x"], "--resolutions takes whole numbers"),
])
def test_profile_and_select_errors_are_one_line(args, message):
    out = run(*args)
    assert out.exit_code == 2 and message in out.output and "Traceback" not in out.output


def test_unfinished_run_and_corrupt_checkpoint_are_one_line_errors(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("student: mcunet_tiny\n")
    out = run("profile", str(tmp_path / "run"), "--target", "cortex-m7")
    assert out.exit_code == 2 and "without best.pt" in out.output
    (tmp_path / "run" / "best.pt").write_bytes(b"not a checkpoint")
    out = run("profile", str(tmp_path / "run"), "--target", "cortex-m7")
    assert out.exit_code == 2 and "Traceback" not in out.output and "best.pt" in out.output


def test_artifact_without_manifest_is_rejected(tmp_path):
    (tmp_path / "model.tflite").write_bytes(b"\0" * 64)
    out = run("profile", str(tmp_path / "model.tflite"), "--target", "cortex-m7")
    assert out.exit_code == 2 and "has no manifest.json" in out.output


def test_train_student_auto_chooses_and_records_why(tmp_path):
    run_dir = tmp_path / "auto"
    out = run("train", "--student", "auto", "--target", "cortex-m4", "--resolution", "32", "--data", "digits",
              "--method", "ce", "--epochs", "1", "--limit", "200", "--out", str(run_dir))  # --out: train's --run-dir
    assert out.exit_code == 0, out.output
    selection = json.loads((run_dir / "selection.json").read_text())
    assert "--student auto: chose" in out.output and selection["chosen"]["model"] in out.output
    assert not selection["chosen"]["misses"]
    from edgekd.config import TrainConfig

    assert TrainConfig.load(run_dir / "config.yaml").student == selection["chosen"]["model"]


def test_student_auto_needs_a_target(tmp_path):
    out = run("train", "--student", "auto", "--data", "digits", "--method", "ce", "--run-dir", str(tmp_path / "r"))
    assert out.exit_code == 2 and "--student auto chooses for a device: pass --target" in out.output


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("source"), r"missing key 'latency_model.references\[0\].source'"),
    (lambda r: r.update(role="train"), r"'latency_model.references\[0\].role' is 'train', must be one of fit, check"),
    (lambda r: r.update(latency_ms=-1), r"'latency_model.references\[0\].latency_ms' must be a positive number"),
])
def test_latency_references_are_validated(change, message):
    import copy

    from edgekd.targets import parse_target

    data = copy.deepcopy(load_target("cortex-m7").to_dict())
    change(data["latency_model"]["references"][0])
    with pytest.raises(EdgekdError, match=message):
        parse_target(data, "cortex-m7.yaml")
