"""Shipped targets load and are sane; every validation rule rejects bad files with a one-line message."""
from __future__ import annotations

import copy
import pickle
import re
from pathlib import Path

import pytest
import yaml

from edgekd.errors import EdgekdError
from edgekd.targets import (
    TARGETS_DIR,
    Compute,
    ExportDefaults,
    InputSpec,
    Memory,
    Target,
    list_targets,
    load_target,
    parse_target,
)

SHIPPED = ["cortex-m4", "cortex-m7", "esp32-s3", "jetson-nano", "jetson-orin-nano", "nrf52840", "raspberry-pi-4"]
RESOLUTION = {"cortex-m4": 48, "nrf52840": 32, "cortex-m7": 64, "esp32-s3": 64,
              "raspberry-pi-4": 128, "jetson-nano": 160, "jetson-orin-nano": 224}


def _good() -> dict:
    return load_target("cortex-m7").to_dict()


def _write(tmp_path: Path, data, name: str = "custom") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def _rejects(tmp_path: Path, data, pattern: str, name: str = "custom") -> str:
    path = _write(tmp_path, data, name)
    with pytest.raises(EdgekdError) as info:
        load_target(str(path))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(str(path)), msg  # names the file
    assert re.search(pattern, msg), msg
    return msg


# ---------------------------------------------------------------- shipped targets


def test_every_shipped_target_loads():
    assert [t.name for t in list_targets()] == SHIPPED
    for name in SHIPPED:
        assert load_target(name).source_path == TARGETS_DIR / f"{name}.yaml"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_target_fields(name):
    t = load_target(name)
    assert isinstance(t.export, ExportDefaults) and isinstance(t.memory, Memory)
    assert isinstance(t.compute, Compute) and isinstance(t.input, InputSpec)
    for v in (t.memory.ram_bytes, t.memory.flash_bytes, t.compute.clock_hz, t.input.resolution, t.input.channels):
        assert type(v) is int and v > 0
    for v in (t.compute.peak_macs_per_s, t.compute.memory_bandwidth_bytes_per_s, t.latency_budget_ms):
        assert type(v) is float and v > 0
    assert t.input.resolution == RESOLUTION[name]
    assert t.model_options["low_res_stem"] is (t.input.resolution <= 96)
    with pytest.raises(TypeError):
        t.model_options["low_res_stem"] = False  # read-only
    if t.device_class == "mcu":
        assert (t.runtime, t.export.format, t.export.precision) == ("tflite-micro", "tflite", "int8")
        assert t.memory.ram_bytes <= 512 * 1024
    # Peak MAC rate and clock must agree with at most a few thousand MACs per cycle (GPU) and at least 1 (MCU).
    assert 1 <= t.compute.peak_macs_per_s / t.compute.clock_hz <= 10_000


def test_shipped_files_cite_or_assume_every_number():
    for path in sorted(TARGETS_DIR.glob("*.yaml")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"^\s*\w+:\s*[\d.]+\s*(#.*)?$", line):
                context = line + " ".join(lines[max(0, i - 4):i])  # inline comment or the comment block above
                assert re.search(r"ref §\d|assumption", context), f"{path.name}:{i + 1} has no source: {line}"


def test_known_numbers():
    m7, nano = load_target("cortex-m7"), load_target("jetson-nano")
    assert m7.memory.ram_bytes == 512 * 1024 and m7.memory.flash_bytes == 2 * 1024 * 1024
    assert m7.compute.peak_macs_per_s == 2 * 480e6
    assert nano.compute.peak_macs_per_s == 128 * 2 * 921.6e6  # = 472 GFLOPS fp16 / 2
    assert load_target("cortex-m4").memory.ram_bytes == 128 * 1024
    assert load_target("nrf52840").memory.ram_bytes == 256 * 1024


def test_summary_rows_are_human_readable():
    rows = dict(load_target("cortex-m7").summary_rows())
    assert rows["RAM (activations)"] == "512 KiB"
    assert rows["flash (weights)"] == "2 MiB"
    assert rows["clock"] == "480 MHz"
    assert rows["peak compute"] == "0.96 GMAC/s"
    assert rows["input"] == "64x64x3"
    assert rows["model options"] == "low_res_stem=true"
    assert dict(load_target("jetson-nano").summary_rows())["clock"] == "921.6 MHz"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in load_target("jetson-orin-nano").summary_rows())


def test_to_dict_round_trips_and_pickles():
    for t in list_targets():
        again = parse_target(yaml.safe_load(yaml.safe_dump(t.to_dict())), str(t.source_path))
        assert again == t
        assert pickle.loads(pickle.dumps(t)) == t
        assert copy.deepcopy(t) == t
        hash(t)


def test_load_by_path(tmp_path):
    path = _write(tmp_path, _good(), "cortex-m7")
    assert load_target(str(path)).source_path == path


# ---------------------------------------------------------------- rejections


def test_unknown_top_level_key_suggests(tmp_path):
    data = _good()
    data["latency_budget"] = data.pop("latency_budget_ms")
    _rejects(tmp_path, data, r"unknown key 'latency_budget'; did you mean 'latency_budget_ms'\?")


def test_unknown_nested_key_suggests(tmp_path):
    data = _good()
    data["compute"]["clok_hz"] = data["compute"].pop("clock_hz")
    _rejects(tmp_path, data, r"unknown key 'compute.clok_hz'; did you mean 'clock_hz'\?")


def test_unknown_key_without_close_match_lists_allowed(tmp_path):
    data = _good()
    data["memory"]["zzz"] = 1
    _rejects(tmp_path, data, r"unknown key 'memory.zzz'; remove it \(allowed: ram_bytes, flash_bytes\)")


def test_missing_field(tmp_path):
    data = _good()
    del data["memory"]["flash_bytes"]
    _rejects(tmp_path, data, r"missing key 'memory.flash_bytes'; add it")
    data = _good()
    del data["compute"]
    _rejects(tmp_path, data, r"missing key 'compute'; add it")


def test_model_options_may_be_omitted(tmp_path):
    data = _good()
    del data["model_options"]
    assert dict(load_target(str(_write(tmp_path, data, "cortex-m7"))).model_options) == {}


@pytest.mark.parametrize(
    "section,key,value,pattern",
    [
        ("memory", "ram_bytes", True, r"'memory.ram_bytes' must be a whole number .*got bool True"),
        ("memory", "ram_bytes", "512K", r"'memory.ram_bytes' must be a whole number .*got str"),
        ("memory", "ram_bytes", 512.5, r"'memory.ram_bytes' must be a whole number .*drop the decimal part"),
        ("compute", "peak_macs_per_s", "9.6e8", r"must be a number .*write 1.0e\+9, not 1e9"),
        ("compute", "peak_macs_per_s", [1], r"'compute.peak_macs_per_s' must be a number .*got list"),
        (None, "name", 7, r"'name' must be a non-empty string"),
        (None, "memory", [1, 2], r"'memory' must be a mapping"),
        (None, "model_options", [1], r"'model_options' must be a mapping"),
        ("model_options", "widths", [8, 16], r"'model_options.widths' must be a bool, number or string"),
    ],
)
def test_wrong_types(tmp_path, section, key, value, pattern):
    data = _good()
    (data[section] if section else data)[key] = value
    _rejects(tmp_path, data, pattern)


@pytest.mark.parametrize(
    "section,key,value",
    [("memory", "ram_bytes", 0), ("compute", "clock_hz", -480), ("input", "resolution", 0),
     ("compute", "peak_macs_per_s", -1.0), (None, "latency_budget_ms", 0.0), ("compute", "peak_macs_per_s", ".nan")],
)
def test_non_positive_numbers(tmp_path, section, key, value):
    data = _good()
    (data[section] if section else data)[key] = value
    text = yaml.safe_dump(data, sort_keys=False).replace("'.nan'", ".nan")  # a real YAML NaN
    _rejects(tmp_path, text, rf"'{(section + '.') if section else ''}{key}' must be a positive number")


@pytest.mark.parametrize(
    "section,key,value,pattern",
    [
        (None, "device_class", "microcontroller", r"'device_class' is 'microcontroller', must be one of mcu, cpu, gpu"),
        (None, "runtime", "tflite_micro", r"must be one of tensorrt, tflite, tflite-micro; did you mean 'tflite-micro'\?"),
        ("export", "format", "tf-lite", r"'export.format' is 'tf-lite', must be one of onnx, tflite, tensorrt"),
        ("export", "precision", "int4", r"'export.precision' is 'int4', must be one of fp32, fp16, int8"),
    ],
)
def test_enum_values(tmp_path, section, key, value, pattern):
    data = _good()
    (data[section] if section else data)[key] = value
    _rejects(tmp_path, data, pattern)


@pytest.mark.parametrize(
    "changes,pattern",
    [
        ({"export.format": "onnx"}, r"runtime 'tflite-micro' needs export.format tflite, got 'onnx'"),
        ({"export.precision": "fp32"}, r"runtime 'tflite-micro' needs export.precision int8, got 'fp32'"),
        ({"device_class": "cpu"}, r"runtime 'tflite-micro' needs device_class mcu, got 'cpu'"),
        ({"runtime": "tensorrt", "device_class": "gpu"},
         r"runtime 'tensorrt' needs export.format tensorrt or onnx, got 'tflite'"),
        ({"runtime": "tensorrt", "export.format": "onnx"}, r"runtime 'tensorrt' needs device_class gpu, got 'mcu'"),
        ({"runtime": "tflite", "device_class": "cpu", "export.format": "onnx"},
         r"runtime 'tflite' needs export.format tflite, got 'onnx'"),
    ],
)
def test_impossible_combinations(tmp_path, changes, pattern):
    data = _good()
    for dotted, value in changes.items():
        *parent, key = dotted.split(".")
        (data[parent[0]] if parent else data)[key] = value
    _rejects(tmp_path, data, pattern)


def test_name_must_match_file_stem(tmp_path):
    _rejects(tmp_path, _good(), r"name 'cortex-m7' must equal the file name 'other'", name="other")


def test_yaml_errors_are_one_line(tmp_path):
    _rejects(tmp_path, "name: [unclosed\n  description: x\n", r"not valid YAML: .*; fix the syntax")
    _rejects(tmp_path, "", r"the file is empty")
    _rejects(tmp_path, "- a\n- b\n", r"the top level must be a mapping")
    _rejects(tmp_path, "name: a\nname: b\n", r"not valid YAML: .*duplicate key 'name'")


def test_yaml_never_executes_code(tmp_path):
    _rejects(tmp_path, "name: !!python/object/apply:os.system ['echo hacked']\n", r"not valid YAML")


def test_unknown_target_name_suggests():
    with pytest.raises(EdgekdError, match=r"^unknown target 'cortex-m8'; did you mean 'cortex-m7'\? "
                                          r"\(edgekd targets list shows them\)$"):
        load_target("cortex-m8")
    with pytest.raises(EdgekdError, match=r"^unknown target 'zzzz' \(edgekd targets list shows them\)$"):
        load_target("zzzz")


def test_missing_target_file_path(tmp_path):
    with pytest.raises(EdgekdError, match=r"target file '.*nope.yaml' not found"):
        load_target(str(tmp_path / "nope.yaml"))


# ---------------------------------------------------------------- targets directory


def test_env_override(tmp_path, monkeypatch):
    data = _good()
    data["name"] = "my-board"
    data["memory"]["ram_bytes"] = 1000
    _write(tmp_path, data, "my-board")
    monkeypatch.setenv("EDGEKD_TARGETS_DIR", str(tmp_path))
    assert [t.name for t in list_targets()] == ["my-board"]
    assert load_target("my-board").memory.ram_bytes == 1000
    with pytest.raises(EdgekdError, match="unknown target 'cortex-m7'"):
        load_target("cortex-m7")


def test_missing_targets_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKD_TARGETS_DIR", str(tmp_path / "absent"))
    for call in (list_targets, lambda: load_target("cortex-m7")):
        with pytest.raises(EdgekdError, match=r"targets directory '.*absent' does not exist; set EDGEKD_TARGETS_DIR"):
            call()


def test_list_targets_reports_a_bad_file(tmp_path, monkeypatch):
    _write(tmp_path, "name: broken\n", "broken")
    monkeypatch.setenv("EDGEKD_TARGETS_DIR", str(tmp_path))
    with pytest.raises(EdgekdError, match=r"broken.yaml: missing key 'description'"):
        list_targets()


def test_target_is_frozen():
    t = load_target("cortex-m7")
    with pytest.raises(AttributeError):
        t.name = "x"  # type: ignore[misc]
    assert isinstance(t, Target)


def test_formats_precisions_and_runtime_rules_come_from_the_export_formats_table():
    """One source of truth: edgekd/export/formats.py. Target validation and the CLI's choices are derived."""
    from edgekd import targets
    from edgekd.cli import export_cmd
    from edgekd.export import formats

    assert targets.FORMATS == tuple(formats.FORMATS) and targets.RUNTIMES == tuple(formats.RUNTIMES)
    assert targets.PRECISIONS is formats.TARGET_PRECISIONS and targets.DEVICE_CLASSES is formats.DEVICE_CLASSES
    for runtime in formats.RUNTIMES.values():
        rules = targets._RUNTIME_RULES[runtime.name]
        assert rules["device_class"] == runtime.device_classes and rules["export.format"] == runtime.formats
        assert rules.get("export.precision") == runtime.precisions
        # what a target of this runtime may default to, export accepts
        for fmt in runtime.formats:
            for precision in set(formats.FORMATS[fmt].precisions) & set(runtime.precisions or formats.PRECISIONS):
                assert precision in formats.RUNTIME_FORMATS[runtime.name][fmt]
    choices = {p.name: list(p.type.choices) for p in export_cmd.params if p.name in ("format_", "precision")}
    assert choices == {"format_": list(formats.FORMATS), "precision": list(formats.PRECISIONS)}
    assert formats.PRECISIONS == ("fp32", "fp16", "dynamic-range", "int8")
