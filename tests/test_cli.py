"""The shared flag parser: defaults < config file < command line, booleans as true/false, one-line errors."""

from __future__ import annotations

import json

import pytest

from ncal_core.cli import parse_bool, parse_config
from ncal_core.errors import NCALError
from ncal_core.infer import InferConfig
from ncal_core.train.config import TrainConfig


def parse(argv):
    return parse_config(TrainConfig, argv, description="test", prog="train")


def parse_infer(argv):
    return parse_config(InferConfig, argv, description="test", prog="infer")


def test_defaults_when_no_flags_are_the_documented_ones():
    """A few defaults as the README's flag table states them (a parser that drops or mangles defaults fails)."""
    cfg = parse([])
    assert (cfg.dataset_path, cfg.model_name_or_path, cfg.output_dir) == ("tmwpl", "tiny", "outputs/ncal-tiny-tmwpl")
    assert (cfg.cutoff_len, cfg.lora_r, cfg.max_steps, cfg.seed) == (2048, 8, -1, 42)
    assert cfg.per_device_train_batch_size == 32
    assert (cfg.lambda_lc, cfg.lora_alpha, cfg.logit_adjust_tau, cfg.num_train_epochs) == (1.0, 32.0, None, 3.0)
    assert cfg.dev_weighting == "balanced"
    assert cfg.use_etf_loss is True and cfg.class_diff is True and cfg.bf16 is False
    assert cfg.use_lora is None and cfg.learning_rate is None and cfg.label_types is None
    assert cfg.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.lr_scheduler_type == "linear" and cfg.pooling == "mean" and cfg.resample == "sqrt"


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
    (["--no_such_flag", "1"], "--no_such_flag: no such flag"),
    (["--seed", "1", "extra"], "unrecognized arguments: extra"),
])
def test_bad_flags_are_one_line_errors(argv, fragment):
    with pytest.raises(NCALError) as err:
        parse(argv)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_config_file_with_an_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lamda_lc": 1}))
    with pytest.raises(NCALError, match=r"c\.json: lamda_lc: not a flag of train; did you mean --lambda_lc\?"):
        parse(["--config", str(path)])


@pytest.mark.parametrize("argv,flag,meant", [
    (["--lr", "1e-4"], "--lr", "--learning_rate"),  # a prefix of --lr_scheduler_type, not taken for it
    (["--lr=1e-4"], "--lr", "--learning_rate"),
    (["--lr_sched", "cosine"], "--lr_sched", "--lr_scheduler_type"),
    (["--output", "runs/x"], "--output", "--output_dir"),
    (["--output=runs/x"], "--output", "--output_dir"),
    (["--seed", "1", "--lamda_lc", "1"], "--lamda_lc", "--lambda_lc"),
    (["--learning-rate", "1e-4"], "--learning-rate", "--learning_rate"),
])
def test_prefixes_and_misspellings_are_refused_naming_the_closest_flag(argv, flag, meant):
    with pytest.raises(NCALError) as err:
        parse(argv)
    message = str(err.value)
    assert message == f"command line: {flag}: no such flag; did you mean {meant}? (see --help)"


def test_an_unknown_flag_far_from_every_flag_gets_no_suggestion():
    with pytest.raises(NCALError) as err:
        parse(["--zzzzqqq", "1"])
    assert str(err.value) == "command line: --zzzzqqq: no such flag (see --help)"


def test_a_prefix_of_a_boolean_is_not_taken_for_it():
    with pytest.raises(NCALError, match=r"--inter: no such flag; did you mean --interactive\?"):
        parse_infer(["--inter"])


@pytest.mark.parametrize("argv", [["--interactive"], ["--interactive", "--model_path", "m"],
                                  ["--model_path", "m", "--interactive"], ["--interactive=true"],
                                  ["--interactive", "yes", "--generate", "false"]])
def test_a_bare_boolean_flag_means_true(argv):
    cfg = parse_infer(argv)
    assert cfg.interactive is True and cfg.generate is False
    assert cfg.model_path == (["m"] if "m" in argv else None)


def test_a_boolean_flag_still_takes_true_or_false():
    assert parse(["--use_lora", "false", "--bf16", "true"]).use_lora is False
    assert parse(["--use_lora=false", "--bf16=true"]).bf16 is True
    assert parse(["--overwrite_output_dir", "--seed", "3"]).overwrite_output_dir is True


def test_flag_equals_value_form():
    cfg = parse(["--learning_rate=1e-4", "--target_modules=q_proj,v_proj", "--lambda_lc=-1",
                 "--instruction=a = b"])
    assert cfg.learning_rate == 1e-4 and cfg.target_modules == ["q_proj", "v_proj"] and cfg.lambda_lc == -1.0
    assert cfg.instruction == "a = b"


def test_values_that_start_with_a_dash_are_not_taken_for_flags():
    cfg = parse(["--lambda_lc", "-1", "--max_steps", "-1", "--instruction", "-- be brief"])
    assert cfg.lambda_lc == -1.0 and cfg.max_steps == -1 and cfg.instruction == "-- be brief"


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
