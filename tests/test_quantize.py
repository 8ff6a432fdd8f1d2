"""NNCF quantization (edgekd quantize) and the int8 export paths, on a small student trained on real data
(scikit-learn digits at 32 px).

Fast tests: the quantizer table, bad input, the per-layer report on a deliberately broken layer. Tests marked
slow run NNCF PTQ/QAT and the real exports (NNCF compiles a C++ extension on first use, ~1 min once per machine).
"""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgekd import api
from edgekd.cli import main
from edgekd.config import OptimConfig, TrainConfig
from edgekd.errors import EdgekdError
from edgekd.export import formats
from edgekd.export.verify import check, compare, onnxruntime_logits
from edgekd.train.checkpoint import file_sha256, load_model, read_checkpoint
from edgekd.train.trainer import TrainingInterrupted

pytest.importorskip("nncf", reason="the nncf extra is not installed (pip install 'edgekd[nncf]')")

TINY = "mobilenetv3_small_050"


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    """MobileNetV3-small-0.5 on digits, ~95% test accuracy (the export tests' student)."""
    run_dir = tmp_path_factory.mktemp("quantize") / "float"
    api.train(TrainConfig(
        run_dir=str(run_dir), data="digits", resolution=32, student=TINY, student_options={"low_res_stem": False},
        teacher=None, method="ce", epochs=8, batch_size=64, optim=OptimConfig(lr=0.1, warmup_epochs=0.5), seed=0,
        checkpoint_interval_s=1e9,
    ))
    return run_dir


def _qat(float_run: Path, out: Path, **kw) -> dict:
    # one calibration image: NNCF's initial ranges are poor, so PTQ loses accuracy that QAT has to win back.
    # lr 1e-4: digits gives 2 x 22 steps, too few for the default 1e-5 (sized for thousands of images) to move
    # the ranges much (with 2 threads it won back a third of the loss)
    kw = {"lr": 1e-4, **kw}
    return api.quantize(float_run, method="nncf-qat", out=out, calib_images=1, epochs=2, batch_size=64, device="cpu",
                        checkpoint_interval_s=1e9, **kw)


@pytest.fixture(scope="module")
def qat_run(float_run):
    return _qat(float_run, float_run.parent / "qat")


# ---------------------------------------------------------------- bad input (fast)


@pytest.mark.parametrize(
    "format, precision, quantizer, quantized, message",
    [
        ("tflite", "int8", "ort", None, "quantizer ort cannot make tflite int8 (it writes a QDQ ONNX, not TFLite): "
                                        "use --quantizer onnx2tf|nncf"),
        ("tensorrt", "int8", "onnx2tf", None, "quantizer onnx2tf cannot make tensorrt int8 (it writes TFLite"),
        ("onnx", "int8", "onnx2tf", None, "use --quantizer ort|nncf"),
        ("tflite", "fp16", "nncf", None, "--quantizer makes int8 models; tflite fp16 is not quantized"),
        ("tensorrt", "fp16", None, "nncf-qat", "the model is quantized (nncf-qat): it exports at int8 only"),
        ("tensorrt", None, "ort", "nncf-qat", "it exports through its own quantizers (--quantizer nncf)"),
        ("onnx", None, "tflm", None, "unknown quantizer 'tflm'"),
    ],
)
def test_quantizers_that_cannot_make_the_format_are_refused(format, precision, quantizer, quantized, message):
    with pytest.raises(EdgekdError, match=re.escape(message)):
        formats.choose(format, precision, None, {}, quantizer=quantizer, quantized=quantized)


def test_quantizer_defaults():
    assert formats.choose("tflite", "int8", None, {}).quantizer == "onnx2tf"
    assert formats.choose("tensorrt", "int8", None, {}).quantizer == "ort"
    assert formats.choose("tensorrt", None, None, {}).quantizer is None  # fp16: nothing to quantize
    quantized = formats.choose("tensorrt", None, None, {}, quantized="nncf-qat")
    assert (quantized.precision, quantized.quantizer) == ("int8", "nncf")
    assert formats.choose("tflite", None, None, {}, quantizer="nncf").precision == "int8"
    for fmt in formats.FORMATS.values():
        assert set(fmt.quantizers) <= set(formats.QUANTIZERS) and fmt.quantizers


def test_cli_quantizer_error_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["export", str(tmp_path), "--format", "tensorrt", "--precision", "int8",
                                       "--quantizer", "onnx2tf"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("error: quantizer onnx2tf cannot make tensorrt")


def test_a_failed_gate_names_the_worst_layers():
    report = {"worst": ["blocks.1.0.conv_pw.conv (Conv)"],
              "layers": [{"layer": "blocks.1.0.conv_pw.conv (Conv)", "rel_error": 0.9, "added": 0.8}]}
    from edgekd.export.layer_errors import hint

    reference = np.eye(4, dtype=np.float32)
    metrics = compare(reference, np.roll(reference, 1, axis=1), np.arange(4))
    with pytest.raises(EdgekdError, match=re.escape("worst layers: blocks.1.0.conv_pw.conv (Conv) (rel. error 0.9")):
        check(metrics, "int8", "int8 QDQ ONNX", detail=hint(report))


def test_quantize_refuses_bad_methods_and_missing_runs(tmp_path):
    with pytest.raises(EdgekdError, match="unknown quantization method 'int4'"):
        api.quantize(tmp_path, method="int4")
    with pytest.raises(EdgekdError, match="does not exist: pass a float run"):
        api.quantize(tmp_path / "nope")
    with pytest.raises(EdgekdError, match="is not a quantized run"):
        api.quantize(tmp_path, resume=True)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- NNCF PTQ / QAT (slow)


@pytest.mark.slow
def test_ptq_model_runs_agrees_with_float_and_rebuilds_from_its_checkpoint(float_run):
    from edgekd.quantize.checkpoint import load_any
    from edgekd.quantize.run import calibration_batches

    summary = api.quantize(float_run, method="nncf-ptq", out=float_run.parent / "ptq", device="cpu")
    run = Path(summary["run_dir"])
    for name in ("quantize.yaml", "best.pt", "summary.json", "metrics.jsonl"):
        assert (run / name).is_file()
    assert summary["source"]["sha256"] == file_sha256(float_run / "best.pt")
    payload = read_checkpoint(run / "best.pt", kind="model")  # torch.load(weights_only=True)
    assert payload["quantization"]["method"] == "nncf-ptq"
    model, _ = load_any(run)
    floating, _ = load_model(float_run)
    from edgekd.data.datamodule import load_data

    dm = load_data("digits", resolution=32, channels=3, seed=0)
    x = torch.cat(calibration_batches(dm, 200, seed=1))
    with torch.no_grad():
        agreement = (model(x).argmax(1) == floating.eval()(x).argmax(1)).float().mean().item()
    assert agreement >= 0.95
    assert summary["test_acc"] >= summary["float_test_acc"] - 0.03
    # the rebuilt model is the one that was evaluated: same test accuracy to the last image
    loader = dm.loader("test", 512, augment=False)
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in loader)
    assert correct / len(dm.test) == pytest.approx(summary["test_acc"], abs=1e-12)


@pytest.mark.slow
def test_qat_wins_back_what_ptq_lost(qat_run):
    float_acc, ptq_acc, qat_acc = qat_run["float_test_acc"], qat_run["ptq"]["test_acc"], qat_run["test_acc"]
    # one calibration image hurts PTQ (by 1 to 3 points here, depending on the float run's thread count); QAT,
    # distilled from the float model, wins back at least half of that and ends within 2 points of float
    assert ptq_acc < float_acc
    assert qat_acc - ptq_acc >= 0.5 * (float_acc - ptq_acc) and qat_acc >= float_acc - 0.02
    records = [json.loads(line) for line in (Path(qat_run["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and all(r["phase"] == "qat" for r in records)
    assert qat_run["qat"]["teacher"]["kind"] == "float" and qat_run["qat"]["temperature"] == 4.0
    assert qat_run["qat"]["optimizer"] == "adamw" and qat_run["qat"]["lr"] == 1e-4


@pytest.mark.slow
def test_qat_that_only_hurts_hands_back_the_ptq_model(float_run):
    # SGD at lr 0.05 wrecks the BatchNorm-folded student (26% test accuracy after 2 epochs, from PTQ's 90%; at
    # lr 1 the loss turns NaN): no epoch can beat the PTQ start on validation
    wrecked = _qat(float_run, float_run.parent / "qat-wrecked", optimizer="sgd", lr=0.05)
    assert wrecked["best_epoch"] == -1 and wrecked["qat"]["kept_ptq"] is True
    assert wrecked["test_acc"] == wrecked["ptq"]["test_acc"] > wrecked["last_epoch_test_acc"]
    assert wrecked["qat"]["optimizer"] == "sgd"


@pytest.mark.slow
def test_qat_resumes_mid_epoch_exactly(float_run, qat_run):
    out = float_run.parent / "qat-interrupted"

    def stop(trainer, step):
        if step == 25:  # inside the second epoch (digits: 20 steps of 64 per epoch)
            trainer.request_stop()

    with pytest.raises(TrainingInterrupted):
        _qat(float_run, out, on_step=stop)
    state = read_checkpoint(out / "last.pt", kind="training")
    assert (state["epoch"], state["step"]) == (1, 6)
    resumed = api.quantize(out, resume=True)
    a = read_checkpoint(Path(qat_run["run_dir"]) / "last.pt")["student"]
    b = read_checkpoint(out / "last.pt")["student"]
    assert a.keys() == b.keys() and any(k.startswith("__nncf_hooks.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test_acc"] == qat_run["test_acc"]


@pytest.mark.slow
def test_quantizing_a_quantized_run_is_one_line(qat_run):
    result = CliRunner().invoke(main, ["quantize", qat_run["run_dir"], "--method", "nncf-ptq"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith("error: ") and "is already quantized (nncf-qat of" in result.output


@pytest.mark.slow
def test_qat_without_the_training_data_is_one_line_and_writes_nothing(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = tmp_path / "digits"
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images[:400], digits.target[:400])):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 16).clip(0, 255).astype(np.uint8)).save(folder / str(label) / f"{i}.png")
    run = tmp_path / "run"
    api.train(TrainConfig(run_dir=str(run), data=f"imagefolder:{folder}", resolution=32, student=TINY, teacher=None,
                          method="ce", epochs=1, batch_size=32, seed=0, checkpoint_interval_s=1e9))
    shutil.rmtree(folder)
    result = CliRunner().invoke(main, ["quantize", str(run), "--method", "nncf-qat"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith(f"error: nncf-qat fine-tunes and calibrates on the run's training data (imagefolder:{folder})")
    assert "which is not at hand" in result.output and "pass --data" in result.output
    assert not (tmp_path / "run-nncf-qat").exists()


@pytest.mark.slow
def test_the_runs_teacher_is_refused_for_a_run_without_one(float_run):
    with pytest.raises(EdgekdError, match="was trained without a teacher: use --teacher float"):
        api.quantize(float_run, teacher="run", out=float_run.parent / "no-teacher")
    assert not (float_run.parent / "no-teacher").exists()


@pytest.mark.slow
def test_a_checkpoint_cannot_name_code_outside_nncf_quantizers(qat_run, tmp_path):
    from edgekd.quantize.nncf_backend import rebuild

    payload = read_checkpoint(Path(qat_run["run_dir"]) / "best.pt", kind="model")
    payload["quantization"]["config"]["compression_state"][0]["module_path"] = "os"
    with pytest.raises(EdgekdError, match="does not rebuild as an NNCF-quantized"):
        rebuild(payload)


# ---------------------------------------------------------------- export of quantized runs (slow)


@pytest.mark.slow
def test_qdq_onnx_of_a_qat_run_is_standard_and_agrees_with_the_fake_quant_model(qat_run, tmp_path):
    import onnx
    from onnx import numpy_helper

    artifact = api.export(qat_run["run_dir"], format="onnx", out_dir=tmp_path / "bundles", verify_images=359)
    m = artifact.manifest
    assert (m["precision"], m["quantizer"]) == ("int8", "nncf")
    model = onnx.load(str(artifact.path))
    onnx.checker.check_model(model, full_check=True)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops and "BatchNormalization" not in ops
    zero_points = [numpy_helper.to_array(i) for i in model.graph.initializer if "zero_point" in i.name]
    weights = [numpy_helper.to_array(i) for i in model.graph.initializer if numpy_helper.to_array(i).dtype == np.int8]
    assert weights and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    # the reference is the fake-quantized PyTorch model: the graph as written reproduces it
    v = m["verification"]
    assert "fake-quantized" in v["reference"]
    assert v["onnxruntime_qdq_as_written"]["top1_agreement"] >= 0.99
    assert v["onnxruntime"]["passed"] and v["onnxruntime_qdq_as_written"]["passed"]
    assert v["onnxruntime"]["vs_float_source"]["top1_agreement"] >= 0.9
    assert m["source"]["quantized"]["method"] == "nncf-qat"
    assert (artifact.bundle / "layer_errors.md").is_file() and len(m["layer_errors"]["worst"]) == 3
    assert len(m["layer_errors"]["layers"]) > 50
    # and it runs in ONNX Runtime on its own
    from edgekd.data.datamodule import load_data

    x, _ = next(iter(load_data("digits", resolution=32, channels=3, seed=0).loader("test", 8, augment=False)))
    assert onnxruntime_logits(artifact.path, x.numpy()).shape == (8, 10)


@pytest.mark.slow
def test_tensorrt_bundle_of_a_qat_run_leaves_the_int8_engine_build_to_the_device(qat_run, tmp_path):
    artifact = api.export(qat_run["run_dir"], format="tensorrt", out_dir=tmp_path / "bundles", verify_images=200)
    m = artifact.manifest
    assert m["precision"] == "int8" and m["lint"]["passed"]
    script = (artifact.bundle / "build_engine.sh").read_text()
    assert f"--onnx={artifact.path.name}" in script and "--int8" in script
    assert m["tensorrt"]["engine_built"] is False and "on the device" in m["tensorrt"]["engine_build"]


@pytest.mark.slow
def test_the_layer_report_names_a_deliberately_broken_layer(qat_run, tmp_path):
    """One convolution's weight scale in the QDQ graph is tripled: the report must name that layer first."""
    import onnx
    from onnx import numpy_helper

    from edgekd.export.layer_errors import onnx_layer_errors, onnx_layer_name
    from edgekd.export.torch2onnx import export_onnx
    from edgekd.quantize.nncf_backend import float_model

    artifact = api.export(qat_run["run_dir"], format="onnx", out_dir=tmp_path / "bundles", verify_images=64)
    payload = read_checkpoint(Path(qat_run["run_dir"]) / "best.pt", kind="model")
    float_onnx = tmp_path / "float.onnx"
    export_onnx(float_model(payload), float_onnx, resolution=32, channels=3, fold=False)
    model = onnx.load(str(artifact.path))
    producers = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    victim = convs[len(convs) // 2]
    dequant = producers[victim.input[1]]  # the weight's DequantizeLinear
    scales = {i.name: i for i in model.graph.initializer}
    scale = scales[dequant.input[1]]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 3.0, scale.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    from edgekd.data.datamodule import load_data

    x, _ = next(iter(load_data("digits", resolution=32, channels=3, seed=0).loader("test", 32, augment=False)))
    healthy = onnx_layer_errors(float_onnx, artifact.path, x.numpy())
    report = onnx_layer_errors(float_onnx, broken, x.numpy())
    name = onnx_layer_name(victim.name, "Conv")
    assert report["worst"][0] == name and healthy["worst"][0] != name


@pytest.mark.slow
@pytest.mark.parametrize("quantizer", ["ort", "nncf"])
def test_one_float_student_through_each_qdq_quantizer(float_run, tmp_path, quantizer):
    artifact = api.export(float_run, format="onnx", precision="int8", quantizer=quantizer, out_dir=tmp_path,
                          verify_images=200)
    m = artifact.manifest
    assert m["quantizer"] == m["quantization"]["quantizer"] == quantizer
    assert "fake-quantized" not in m["verification"]["reference"]  # a float run: the reference is the float model
    if quantizer == "nncf":
        assert "post-training quantization here" in m["quantization"]["origin"]
    as_written = m["verification"]["onnxruntime_qdq_as_written"]
    assert as_written["passed"] and as_written["top1_agreement"] >= 0.9
    assert m["layer_errors"]["worst"] and (artifact.bundle / "layer_errors.md").is_file()


@pytest.mark.slow
def test_tflite_of_a_qat_run_takes_its_weights_and_says_onnx2tf_calibrated_the_activations(qat_run, tmp_path):
    artifact = api.export(qat_run["run_dir"], format="tflite", out_dir=tmp_path, verify_images=200)
    m = artifact.manifest
    assert (m["precision"], m["quantizer"]) == ("int8", "nncf")
    q = m["quantization"]
    assert q["learned_activation_ranges"] is False and "calibrated by onnx2tf" in q["activations"]
    assert "NNCF's int8 grid" in q["weights"]
    micro = m["verification"]["tflite_micro"]
    assert micro["passed"] and micro["vs_float_source"]["top1_agreement"] >= 0.9
    assert m["tflm"]["arena_bytes"] > 0 and m["c_array"]["header"].endswith(".h")
    # convolutions carry the ONNX layer names; the report ranks every op of the int8 model
    layers = [r["layer"] for r in m["layer_errors"]["layers"]]
    assert any(name.endswith("(Conv) -> CONV_2D") for name in layers) and len(layers) > 50
