"""The CLI is a thin layer: commands list what is registered and bad input ends in one line, exit code 2."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgekd.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_listing_commands():
    out = run("targets", "list")
    assert out.exit_code == 0 and "cortex-m7" in out.output and "jetson-nano" in out.output
    out = run("targets", "show", "cortex-m7")
    assert out.exit_code == 0 and "480 MHz" in out.output and "512 KiB" in out.output
    out = run("models")
    assert out.exit_code == 0 and "mobilenetv3_small_050" in out.output and "resnet18" in out.output
    assert "resnet18" not in run("models", "--role", "student").output
    out = run("methods")
    assert out.exit_code == 0 and "kd" in out.output and "ce" in out.output


def test_module_form_has_every_command():
    """`python -m edgekd.cli` is what torchrun runs (README): it must know every command of `edgekd`."""
    out = subprocess.run([sys.executable, "-m", "edgekd.cli", "--help"], capture_output=True, text=True, check=True)
    for command in main.commands:
        assert command in out.stdout, f"`python -m edgekd.cli` lacks '{command}'"
    assert "profile" in main.commands and "select" in main.commands


@pytest.mark.parametrize(
    "args, message",
    [
        (["targets", "show", "jetson-nanoo"], "unknown target 'jetson-nanoo'; did you mean 'jetson-nano'?"),
        (["train", "--target", "cortex-m9"], "unknown target 'cortex-m9'"),
        (["train", "--student", "mobilenet"], "unknown model 'mobilenet'"),
        (["train", "--data", "cifar10:/no/such/dir"], "/no/such/dir"),
        (["train", "--data", "mnist"], "unknown data source 'mnist'"),
        (["train", "--method", "hinton"], "unknown method 'hinton'"),
        (["train", "--opt", "temperature"], "--opt expects KEY=VALUE"),
        (["train", "--opt", "temp=3", "--data", "digits"], "unknown method option 'temp'"),
        (["train", "--resume", "runs/x", "--epochs", "3"], "--resume uses the run's saved config; drop --epochs"),
        (["train", "--resume", "/no/such/run"], "config.yaml does not exist"),
    ],
)
def test_bad_input_is_one_line_with_exit_code_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output


def test_strict_data_makes_an_unreadable_image_fatal(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images" / "cat").mkdir(parents=True)
    (tmp_path / "images" / "cat" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # only a header
    args = ["train", "--data", "imagefolder:images", "--teacher", "none", "--method", "ce"]
    strict = CliRunner().invoke(main, [*args, "--strict-data"])
    assert strict.exit_code == 2 and strict.output.startswith("error: cannot decode image images/cat/x.png"), strict.output
    skipping = CliRunner().invoke(main, args)  # skipped, but one of one is over the limit
    assert skipping.exit_code == 2 and "error: 1 of 1 images under images cannot be decoded" in skipping.output


def test_train_writes_a_run_and_resume_of_a_finished_run_reports_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--data", "digits", "--resolution", "32", "--student", "mobilenetv3_small_050",
            "--student-opt", "low_res_stem=false", "--teacher", "none", "--method", "ce", "--epochs", "1", "--limit", "300"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "runs" / "mobilenetv3_small_050-ce" / "summary.json").read_text())
    assert summary["student"]["low_res_stem"] is False and summary["data"]["sizes"]["train"] == 300
    # a second identical command does not overwrite the first run
    assert run(*args).exit_code == 0
    assert (tmp_path / "runs" / "mobilenetv3_small_050-ce-2" / "summary.json").is_file()
    resumed = run("train", "--resume", "runs/mobilenetv3_small_050-ce")
    assert resumed.exit_code == 0 and "test accuracy" in resumed.output


def _commands(group, prefix=()):
    import click

    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, prefix + (name,))
        else:
            yield prefix + (name,), command


def test_every_command_documents_its_options_and_ends_with_examples():
    """A consistent CLI: every option says what it does, every command's --help ends with examples."""
    import click

    for path, command in _commands(main):
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"edgekd {' '.join(path)} {param.opts[0]} has no help"
        text = run(*path, "--help").output
        assert "Example" in text.split("Options:")[0], f"edgekd {' '.join(path)} --help shows no examples"


def test_every_option_shows_or_states_its_default():
    """Each option's help shows its default ([default: ...]), or says what happens without it (none given)."""
    import click

    for path, command in _commands(main):
        ctx = click.Context(command, info_name=path[-1])
        for param in command.params:
            if isinstance(param, click.Option):
                _, text = param.get_help_record(ctx)
                said = any(s in text for s in ("[default:", "(default:", "none given", "[required]"))
                assert said, f"edgekd {' '.join(path)} {param.opts[0]}: help neither shows nor states its default"


def test_train_help_shows_the_config_defaults():
    from edgekd.config import TrainConfig

    text = " ".join(run("train", "--help").output.split())
    assert f"[default: {TrainConfig().epochs}]" in text and "[default: --augment]" in text
    assert "[default: 0.05]" in text  # --lr, from OptimConfig


def test_a_list_option_given_twice_is_refused_not_half_used():
    out = CliRunner().invoke(main, ["profile", "mcunet_tiny@32", "--target", "cortex-m7", "--target", "cortex-m4"])
    assert out.exit_code == 2 and "--target cortex-m7,cortex-m4" in out.output
