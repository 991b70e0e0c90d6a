from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from trainflow.flows.cli import build_parser, parse_config
from trainflow.flows.config import PredictConfig, TrainConfig

REPO = Path(__file__).resolve().parents[2]
PROG = "train_flow.py"

REQUIRED_FLAGS = [
    "--data",
    "--target",
    "--val-fraction",
    "--batch-size",
    "--model",
    "--hidden",
    "--optimizer",
    "--lr",
    "--loss",
    "--epochs",
    "--device",
    "--split-seed",
    "--init-seed",
    "--shuffle-seed",
    "--runs-dir",
    "--run-name",
]


def parser_flags() -> set[str]:
    parser = build_parser(TrainConfig, PROG, "")
    return {option for action in parser._actions for option in action.option_strings}


def exit_and_stderr(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        parse_config(TrainConfig, argv, prog=PROG)
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("field", list(TrainConfig.model_fields))
def test_every_field_has_flag_and_description(field):
    assert "--" + field.replace("_", "-") in parser_flags()
    assert TrainConfig.model_fields[field].description


@pytest.mark.parametrize("field", list(PredictConfig.model_fields))
def test_every_predict_flag_is_documented_and_read_by_the_flow(field):
    """A flag the predict flow never reads would be accepted and do nothing."""
    assert "--" + field.replace("_", "-") in (REPO / "docs" / "prediction.md").read_text()
    assert f"cfg.{field}" in (REPO / "flows" / "predict_flow.py").read_text()


@pytest.mark.parametrize("flag", REQUIRED_FLAGS)
def test_required_flag_exists(flag):
    assert flag in parser_flags()


def test_no_arguments_give_defaults():
    config = parse_config(TrainConfig, [], prog=PROG)
    assert config == TrainConfig()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("val_fraction", 0.2),
        ("split_seed", 13),
        ("batch_size", 16),
        ("init_seed", 42),
        ("optimizer", "sgd"),
        ("lr", 0.1),
        ("loss", "mse"),
        ("epochs", 200),
        ("model", "linear"),
        ("data", "synthetic"),
    ],
)
def test_defaults_match_tutorial(field, value):
    assert getattr(TrainConfig(), field) == value


def test_values_convert_to_field_types():
    argv = ["--lr", "0.05", "--epochs", "3", "--hidden", "8,4", "--target", "a,b", "--model", "mlp"]
    config = parse_config(TrainConfig, argv, prog=PROG)
    assert config.lr == 0.05
    assert config.epochs == 3
    assert config.hidden == (8, 4)
    assert config.target == ("a", "b")
    assert config.model == "mlp"


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--lr", "-1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "abc"], "--batch-size"),
        (["--model", "nope"], "--model"),
        (["--val-fraction", "1.5"], "--val-fraction"),
        (["--hidden", "0,3"], "--hidden"),
        (["--device", "tpu"], "--device"),
        (["--run-name", "../evil"], "--run-name"),
        (["--run-name", "a/b"], "--run-name"),
        (["--nope"], "--nope"),
    ],
)
def test_bad_value_exits_2_with_one_line(argv, named, capsys):
    code, err = exit_and_stderr(argv, capsys)
    assert code == 2
    assert err.endswith("\n")
    assert err.count("\n") == 1
    assert err.startswith(f"{PROG}: error: ")
    assert named in err


def test_invalid_choice_message(capsys):
    _, err = exit_and_stderr(["--model", "nope"], capsys)
    assert "invalid choice" in err


def test_config_is_frozen():
    config = TrainConfig()
    with pytest.raises(ValidationError):
        config.lr = 1.0


def test_config_rejects_unknown_fields():
    with pytest.raises(ValidationError):
        TrainConfig(learning_rate=0.1)


def test_help_exits_0_and_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(TrainConfig, ["--help"], prog=PROG)
    assert info.value.code == 0
    out = capsys.readouterr().out
    for field in TrainConfig.model_fields:
        assert "--" + field.replace("_", "-") in out


def test_script_rejects_bad_flag_before_flow_starts():
    result = subprocess.run(
        [sys.executable, "flows/train_flow.py", "--lr", "-1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = result.stderr.strip()
    assert result.returncode == 2
    assert "Traceback" not in err
    assert "\n" not in err
    assert err.startswith(f"{PROG}: error: --lr")


DEVICE_RULE = "must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
NAME_RULE = "must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
CE_RULE = (
    "needs class targets, but the synthetic data's target is continuous (use mse, l1 or huber)"
)


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--device", "gpu"], f"--device: {DEVICE_RULE} (got 'gpu')"),
        (["--hidden", "0,3"], "--hidden: hidden sizes must be between 1 and 1048576 (got '0,3')"),
        (["--run-name", "a/b"], f"--run-name: {NAME_RULE} (got 'a/b')"),
        (["--loss", "cross_entropy"], f"--loss cross_entropy {CE_RULE}"),
    ],
)
def test_a_validator_s_message_is_shown_without_pydantic_s_prefix(argv, line, capsys):
    code, err = exit_and_stderr(argv, capsys)
    assert (code, err) == (2, f"{PROG}: error: {line}\n")


def _exit_code_and_line(main, argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("cli", "argv", "abbreviated"),
    [
        ("trainflow.flows.train_flow", ["--ep", "3"], "--ep"),
        ("trainflow.flows.train_flow", ["--checkpoint-every", "3"], "--checkpoint-every"),
        ("trainflow.flows.sweep_flow", ["--grid", "lr=0.1", "--rand", "2"], "--rand"),
        ("trainflow.flows.sweep_flow", ["--grid", "lr=0.1", "--ep", "2"], "--ep"),
        ("trainflow.flows.cache_cli", ["--cache=x", "list"], "--cache=x"),
        ("trainflow.flows.cache_cli", ["prune", "--older", "7d"], "--older"),
    ],
)
def test_no_command_line_accepts_an_abbreviated_flag(cli, argv, abbreviated, capsys):
    # A flag added later would silently change what an abbreviation means.
    import importlib

    main = importlib.import_module(cli).main
    code, line = _exit_code_and_line(main, argv, capsys)
    assert code == 2
    assert "unrecognized arguments" in line and abbreviated in line, line


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        ("trainflow.flows.cache_cli", ["prune", "--max-size", "lots"]),
        ("trainflow.flows.cache_cli", []),
        ("trainflow.flows.cache_cli", ["list", "--bogus"]),
        ("trainflow.flows.session.server", ["bogus"]),
    ],
)
def test_the_cache_and_server_commands_say_bad_input_in_one_line(module, argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "error:" in err
