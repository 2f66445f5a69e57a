"""The shared flag parser: defaults < config file < command line, booleans as true/false, one-line errors."""

from __future__ import annotations

import json

import pytest

from ncal_core.cli import parse_bool, parse_config
from ncal_core.errors import NCALError
from ncal_core.train_config import TrainConfig


def parse(argv):
    return parse_config(TrainConfig, argv, description="test", prog="train")


def test_defaults_when_no_flags():
    cfg = parse([])
    assert cfg == TrainConfig()


def test_booleans_lists_and_numbers_parse_like_the_reference():
    cfg = parse(["--use_lora", "false", "--class_diff", "False", "--target_modules", "q_proj,v_proj",
                 "--lambda_lc", "1", "--max_steps", "7", "--learning_rate", "2e-4"])
    assert cfg.use_lora is False and cfg.class_diff is False
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.lambda_lc == 1.0 and cfg.max_steps == 7 and cfg.learning_rate == 2e-4


@pytest.mark.parametrize("suffix,writer", [(".json", json.dumps), (".yaml", lambda d: "\n".join(
    f"{k}: {v}" for k, v in d.items()))])
def test_config_file_is_read_and_flags_win(tmp_path, suffix, writer):
    path = tmp_path / f"run{suffix}"
    path.write_text(writer({"lambda_lc": 0.5, "pooling": "mean", "seed": 3}))
    cfg = parse(["--config", str(path), "--seed", "9"])
    assert cfg.lambda_lc == 0.5 and cfg.pooling == "mean" and cfg.seed == 9


@pytest.mark.parametrize("argv,fragment", [
    (["--use_lora", "maybe"], "--use_lora: expected true or false"),
    (["--max_steps", "1.5"], "--max_steps"),
    (["--no_such_flag", "1"], "unrecognized arguments"),
])
def test_bad_flags_are_one_line_errors(argv, fragment):
    with pytest.raises(NCALError) as err:
        parse(argv)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_config_file_with_an_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lamda_lc": 1}))
    with pytest.raises(NCALError, match=r"c\.json: lamda_lc: not a flag"):
        parse(["--config", str(path)])


@pytest.mark.parametrize("flags,fragment", [
    (["--lambda_lc", "-1"], "--lambda_lc"),
    (["--e_w", "0"], "--e_w"),
    (["--use_lora", "true", "--lora_r", "0"], "--lora_r"),
    (["--bf16", "true", "--fp16", "true"], "--fp16"),
    (["--pooling", "first"], "--pooling"),
    (["--label_types", "A"], "--label_types"),
    (["--save_strategy", "sometimes"], "--save_strategy"),
])
def test_out_of_range_flags_are_refused(flags, fragment):
    with pytest.raises(NCALError, match=fragment):
        parse(flags).check()


def test_parse_bool_accepts_reference_spellings():
    assert parse_bool("true") and parse_bool("True") and not parse_bool("false")
    with pytest.raises(ValueError):
        parse_bool("2")
