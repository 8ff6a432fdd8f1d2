"""One validator (edgekd/validate.py) for training configs, target YAMLs, method options and model options: the
same one-line message form whatever the source."""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import pytest
import yaml

from edgekd.config import OptimConfig, TrainConfig
from edgekd.distill.kd import KDOptions
from edgekd.errors import ValidationError
from edgekd.models import create_model
from edgekd.quantize.config import QuantizeConfig
from edgekd.targets import load_target, parse_target
from edgekd.validate import build, setting


def _target(section: str | None, key: str, value):
    data = load_target("cortex-m7").to_dict()
    (data[section] if section else data)[key] = value
    return parse_target(data, "t.yaml")


def _message(make) -> str:
    with pytest.raises(ValidationError) as err:
        make()
    return str(err.value)


@pytest.mark.parametrize("make, message", [
    (lambda: TrainConfig.from_dict({"epoch": 3}, "run.yaml"), "run.yaml: unknown key 'epoch'; did you mean 'epochs'?"),
    (lambda: _target("compute", "clok_hz", 1), "t.yaml: unknown key 'compute.clok_hz'; did you mean 'clock_hz'?"),
    (lambda: KDOptions.from_strings({"temprature": "2"}, "kd"),
     "kd: unknown method option 'temprature'; did you mean 'temperature'?"),
    (lambda: create_model("resnet18", 10, widht_mult=0.5),
     "resnet18: unknown model option 'widht_mult'; did you mean 'width_mult'?"),
], ids=["config", "target", "method", "model"])
def test_an_unknown_key_is_named_with_the_closest_known_one(make, message):
    assert _message(make) == message


@pytest.mark.parametrize("make, message", [
    (lambda: TrainConfig.from_dict({"epochs": "ten"}, "run.yaml"),
     "run.yaml: key 'epochs' must be a whole number, got str 'ten'"),
    (lambda: _target("memory", "ram_bytes", True),
     "t.yaml: key 'memory.ram_bytes' must be a whole number (bytes available to activations), got bool True"),
    (lambda: KDOptions.from_strings({"alpha": "high"}, "kd"),
     "kd: method option 'alpha' must be a number, got str 'high' (not a valid float)"),
    (lambda: create_model("resnet18", 10, low_res_stem="yes"),
     "resnet18: model option 'low_res_stem' must be true or false, got str 'yes'"),
], ids=["config", "target", "method", "model"])
def test_a_value_of_the_wrong_type_names_key_value_and_type(make, message):
    assert _message(make) == message


@pytest.mark.parametrize("make, message", [
    (lambda: TrainConfig.from_dict({"epochs": 0}, "run.yaml"), "run.yaml: key 'epochs' must be a number >= 1, got 0"),
    (lambda: _target("memory", "ram_bytes", 0),
     "t.yaml: key 'memory.ram_bytes' must be a positive number (bytes available to activations), got 0"),
    (lambda: create_model("resnet18", 10, dropout=1.0),
     "resnet18: model option 'dropout' must be a number in [0, 1) (dropout before the classifier), got 1.0"),
], ids=["config", "target", "model"])  # method options word their ranges themselves (each Options.__post_init__)
def test_a_value_out_of_range_names_the_range(make, message):
    assert _message(make) == message


def test_a_value_not_among_the_choices_gets_a_suggestion_and_direct_construction_is_checked_too():
    assert _message(lambda: TrainConfig.from_dict({"teacher_cache": "memroy"}, "run.yaml")) == (
        "run.yaml: key 'teacher_cache' is 'memroy', must be one of auto, memory, disk, off; did you mean 'memory'?")
    assert _message(lambda: OptimConfig(lr=0)) == "config: key 'lr' must be a positive number (the peak learning rate), got 0"
    assert _message(lambda: TrainConfig(epochs=True)) == "config: key 'epochs' must be a whole number, got bool True"


@dataclass(frozen=True)
class _Inner:
    size: int = setting(above=0, hint="a size")


@dataclass(frozen=True)
class _Outer:
    inner: _Inner
    names: Mapping[str, str] = setting(default_factory=dict)
    scale: float | None = None
    flag: bool = False


def test_build_nests_dataclasses_parses_text_and_says_what_a_missing_key_needs():
    built = build(_Outer, {"inner": {"size": "3"}, "names": {"a": "b"}, "scale": "0.5", "flag": "yes"},
                  parse_strings=True)
    assert built == _Outer(_Inner(3), MappingProxyType({"a": "b"}), 0.5, True)
    assert isinstance(built.names, MappingProxyType)  # read-only
    assert build(_Outer, {"inner": {"size": 1}, "scale": None}).scale is None
    assert _message(lambda: build(_Outer, {"inner": {}}, context="x")) == "x: missing key 'inner.size'; add it (a size)"
    assert _message(lambda: build(_Outer, {})) == "missing key 'inner'; add it (a section with size)"
    assert _message(lambda: build(_Outer, {"inner": [1]})) == "key 'inner' must be a mapping of keys, got list [1]"
    assert _message(lambda: build(_Outer, {"inner": {"size": 1}, "names": {"a": 1}})) == (
        "key 'names.a' must be a string, got int 1")


def test_quantize_yaml_is_checked_by_the_same_validator(tmp_path):
    good = QuantizeConfig(source="runs/a", run_dir="runs/a-nncf-qat")
    good.save(tmp_path / "quantize.yaml")
    assert QuantizeConfig.load(tmp_path / "quantize.yaml") == good
    path = tmp_path / "q.yaml"
    for data, message in [
        ({**good.to_dict(), "epoch": 3}, "unknown key 'epoch'; did you mean 'epochs'?"),
        ({"run_dir": "runs/b"}, "missing key 'source'; add it (a string)"),
        ({**good.to_dict(), "epochs": "two"}, "key 'epochs' must be a whole number, got str 'two'"),
        ({**good.to_dict(), "alpha": 1.5}, "key 'alpha' must be a number in [0, 1] (the weight of the KD term), got 1.5"),
    ]:
        path.write_text(yaml.safe_dump(data))
        assert _message(lambda: QuantizeConfig.load(path)) == f"{path}: {message}"
    assert _message(lambda: good.replace(teacher="teacher")) == (
        "quantize config: key 'teacher' is 'teacher', must be one of float, run")
