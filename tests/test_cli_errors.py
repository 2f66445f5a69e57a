"""Bad input through the real commands: one line on stderr naming the file, line or flag and what is wrong, exit 2.

Every case runs `python -m ncal_core.train` or `python -m ncal_core.infer` in a subprocess. Most fail
before any model is built; the ones about checkpoints share a few broken copies of one tiny checkpoint.
The table runs through tests/warm_commands.py (dependencies imported once, one forked child per
command, run as `python -m` runs it); a sample also runs as cold `python -m` processes, to show both agree.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from checkpoint_with_tokenizer import make_checkpoint_with_tokenizer
from training_runs import REPO, TINY, command_env, run, tmwpl_rows
from warm_commands import run_warm

GOOD = tmwpl_rows(6)
TRAIN = ["--dataset_path", "{tmp}/train.jsonl", "--output_dir", "{tmp}/out", *TINY, "--max_steps", "1",
         "--per_device_train_batch_size", "2", "--save_strategy", "no"]
INFER = ["--model_path", "{models}/ok", "--labels", "回忆,识别,推断"]


def jsonl(*rows: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)


def good_with(line: int, row: object) -> str:
    """The good training rows with row number `line` (1-based) replaced."""
    rows: list[object] = list(GOOD)
    rows[line - 1] = row
    return jsonl(*rows)


@dataclass(frozen=True)
class Case:
    """One bad input: the command, its flags and files, and a fragment the one-line error must contain."""

    id: str
    command: str  # "train" or "infer"
    args: list[str]
    expect: str
    files: dict[str, str | bytes | None] = field(default_factory=dict)  # None: an empty folder
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, tmp: Path, models: Path) -> list[str]:
        base = TRAIN if self.command == "train" else []
        return [a.format(tmp=tmp, models=models) for a in base + self.args]


Q = "question"
CASES = [
    # rows of the training file
    Case("malformed_json_line", "train", [], "train.jsonl:3: malformed JSON",
         {"train.jsonl": good_with(3, '{"id": "x", "question": "三角形",')}),
    Case("question_not_a_string", "train", [], "train.jsonl:2: question: must be a string, got number",
         {"train.jsonl": good_with(2, {"id": "x", Q: 12, "class": "回忆"})}),
    Case("class_not_a_string", "train", [], "train.jsonl:4: class: must be a string, got array",
         {"train.jsonl": good_with(4, {"id": "x", Q: "三角形", "class": ["回忆"]})}),
    Case("empty_question", "train", [], "train.jsonl:1: question: must not be empty",
         {"train.jsonl": good_with(1, {"id": "x", Q: "  ", "class": "回忆"})}),
    Case("empty_class", "train", [], "train.jsonl:5: class: must not be empty",
         {"train.jsonl": good_with(5, {"id": "x", Q: "三角形", "class": ""})}),
    Case("missing_class", "train", [], "train.jsonl:2: class: missing",
         {"train.jsonl": good_with(2, {"id": "x", Q: "三角形"})}),
    Case("row_not_an_object", "train", [], "train.jsonl:3: a row must be a JSON object, got array",
         {"train.jsonl": good_with(3, [1, 2])}),
    Case("unknown_row_format", "train", [], "train.jsonl:2: unknown row format",
         {"train.jsonl": good_with(2, {"body": "三角形", "label": "回忆"})}),
    Case("duplicate_id", "train", [], "train.jsonl:4: id: duplicate id 'r0' (first on line 1)",
         {"train.jsonl": good_with(4, {**GOOD[3], "id": "r0"})}),
    Case("id_of_wrong_type", "train", [], "train.jsonl:2: id: must be a non-empty string or an integer",
         {"train.jsonl": good_with(2, {**GOOD[1], "id": True})}),
    Case("empty_training_file", "train", [], "train.jsonl: the file is empty", {"train.jsonl": ""}),
    Case("not_utf8", "train", [], "train.jsonl:2: not UTF-8 text",
         {"train.jsonl": jsonl(GOOD[0]).encode() + b'{"question": "\xff\xfe"}\n'}),
    Case("json_array_malformed", "train", ["--dataset_path", "{tmp}/train.json"], "train.json:4: malformed JSON",
         {"train.json": "[\n" + json.dumps(GOOD[0]) + ",\n" + json.dumps(GOOD[1])[:-1] + "\n]\n"}),
    Case("mixed_row_formats", "train", [], "train.jsonl:2: a PMTD row in a file of TMWPL rows (line 1)",
         {"train.jsonl": good_with(2, {"dialog_content": "对。", "class": "回忆",
                                       "dialog_history": [{"student": "对。"}]})}),
    Case("one_class_only", "train", [], "train.jsonl: classification needs at least 2 classes",
         {"train.jsonl": jsonl(*[{**r, "class": "回忆"} for r in GOOD])}),
    Case("training_file_missing", "train", ["--dataset_path", "{tmp}/nope.jsonl"],
         "nope.jsonl: no such file, and not a known data set name"),
    Case("class_outside_label_types", "train", ["--label_types", "回忆,识别"],
         "train.jsonl:3: class '推断' is not one of the training labels ['回忆', '识别']"),
    Case("dataset_download_fails", "train", ["--dataset_path", "pmtd"],
         "{tmp}/mirror/PMTD_train.jsonl: download failed",
         env={"NCAL_DATA_URL": "file://{tmp}/mirror"}),
    Case("dataset_download_checksum_mismatch", "train", ["--dataset_path", "pmtd"],
         "PMTD_train.jsonl: sha256 mismatch for PMTD_train.jsonl", {"mirror/PMTD_train.jsonl": jsonl(*GOOD)},
         env={"NCAL_DATA_URL": "file://{tmp}/mirror"}),
    # the evaluation file
    Case("unknown_label_in_eval_file", "train", ["--eval_dataset_path", "{tmp}/eval.jsonl"],
         "eval.jsonl:2: class '未知' is not one of the training labels",
         {"eval.jsonl": jsonl(GOOD[0], {"id": "e", Q: "苹果", "class": "未知"})}),
    Case("empty_eval_file", "train", ["--eval_dataset_path", "{tmp}/eval.jsonl"], "eval.jsonl: the file is empty",
         {"eval.jsonl": "\n \n"}),
    # flags
    Case("fp16_on_cpu", "train", ["--fp16", "true"], "--fp16: float16 mixed precision needs a CUDA GPU"),
    Case("negative_lambda", "train", ["--lambda_lc", "-1"], "--lambda_lc: must be >= 0, not -1.0"),
    Case("zero_e_w", "train", ["--e_w", "0"], "--e_w: must be > 0, not 0.0"),
    Case("lora_rank_zero", "train", ["--use_lora", "true", "--lora_r", "0"], "--lora_r: must be >= 1 with --use_lora"),
    Case("label_types_one_class", "train", ["--label_types", "回忆"], "--label_types: needs at least 2 classes"),
    Case("bf16_and_fp16", "train", ["--bf16", "true", "--fp16", "true"], "--fp16: --bf16 and --fp16 are exclusive"),
    Case("unknown_flag", "train", ["--lamda_lc", "1"],
         "command line: --lamda_lc: no such flag; did you mean --lambda_lc?"),
    Case("abbreviated_flag", "train", ["--lr", "1e-4"],
         "command line: --lr: no such flag; did you mean --learning_rate?"),
    Case("abbreviated_flag_with_equals", "train", ["--output=x"],
         "command line: --output: no such flag; did you mean --output_dir?"),
    Case("fractional_max_steps", "train", ["--max_steps", "1.5"], "command line: --max_steps: invalid literal"),
    Case("boolean_not_true_or_false", "train", ["--use_lora", "maybe"],
         "command line: --use_lora: expected true or false, got 'maybe'"),
    Case("zero_batch_size", "train", ["--per_device_train_batch_size", "0"],
         "--per_device_train_batch_size: must be >= 1, not 0"),
    Case("config_file_not_json", "train", ["--config", "{tmp}/run.json"], "run.json: not valid JSON",
         {"run.json": '{"lambda_lc": 1,'}),
    Case("config_file_unknown_key", "train", ["--config", "{tmp}/run.json"], "run.json: lamda_lc: not a flag",
         {"run.json": '{"lamda_lc": 1}'}),
    Case("too_few_rows_for_a_step", "train", ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps",
                                              "2", "--val_size", "0"],
         "train.jsonl: 6 rows are fewer than one optimizer step needs"),
    Case("cutoff_len_below_the_chat_framing", "train", ["--model_name_or_path", "{models}/ok", "--cutoff_len", "4"],
         "train.jsonl:1: cutoff_len 4 is too small"),
    Case("lora_target_matches_nothing", "train", ["--model_name_or_path", "{models}/ok", "--target_modules", "qkv"],
         "target_modules: ['qkv'] match no linear layer"),
    Case("lora_target_is_the_head", "train", ["--model_name_or_path", "{models}/ok", "--target_modules",
                                              "q_proj,lm_head"], "target_modules: lm_head cannot be adapted"),
    # the output folder
    Case("output_dir_under_a_file", "train", ["--output_dir", "{tmp}/a_file/out"],
         "--output_dir {tmp}/a_file/out: cannot write there", {"a_file": "not a folder"}),
    Case("output_dir_is_a_file", "train", ["--output_dir", "{tmp}/a_file"],
         "--output_dir {tmp}/a_file: exists and is not a folder", {"a_file": "not a folder"}),
    Case("output_dir_of_something_else", "train", [], "--output_dir {tmp}/out: holds files of something else",
         {"out/thesis.tex": "mine"}),
    Case("resume_latest_without_checkpoint", "train", ["--resume_from_checkpoint", "latest"],
         "--resume_from_checkpoint latest: {tmp}/out holds no complete checkpoint", {"out": None}),
    Case("resume_from_a_non_checkpoint", "train", ["--resume_from_checkpoint", "{tmp}/somewhere"],
         "--resume_from_checkpoint {tmp}/somewhere: not a checkpoint folder", {"somewhere": None}),
    Case("resume_from_a_foreign_trainer_state", "train", ["--model_name_or_path", "{models}/ok", "--use_lora", "false",
                                                          "--resume_from_checkpoint", "{models}/hf_trainer_checkpoint"],
         "{models}/hf_trainer_checkpoint/trainer_state.json: not a checkpoint of ncal_core.train"),
    Case("resume_from_an_unreadable_trainer_state", "train",
         ["--model_name_or_path", "{models}/ok", "--use_lora", "false", "--resume_from_checkpoint",
          "{models}/truncated_state"], "{models}/truncated_state/trainer_state.json: not a readable trainer state"),
    # the base checkpoint
    Case("model_path_missing", "train", ["--model_name_or_path", "{tmp}/no_model"],
         "--model_name_or_path {tmp}/no_model: not a checkpoint folder"),
    Case("checkpoint_shard_missing", "train", ["--model_name_or_path", "{models}/shard_missing"],
         "safetensors: shard listed in {models}/shard_missing/model.safetensors.index.json not found"),
    Case("corrupt_safetensors_header", "train", ["--model_name_or_path", "{models}/corrupt_header"],
         "{models}/corrupt_header/model.safetensors: not a readable safetensors file"),
    Case("llama_config", "train", ["--model_name_or_path", "{models}/llama"],
         "{models}/llama/config.json: model_type: 'llama' is not supported"),
    Case("tokenizer_without_chat_template", "train", ["--model_name_or_path", "{models}/no_template"],
         "{models}/no_template: chat_template: the tokenizer has no chat template"),
    Case("checkpoint_without_tokenizer", "train", ["--model_name_or_path", "{models}/no_tokenizer"],
         "{models}/no_tokenizer: no tokenizer here"),
    # inference
    Case("infer_model_path_missing", "infer", ["--model_path", "{tmp}/no_model", "--prompt", "三角形"],
         "--model_path {tmp}/no_model: not a checkpoint folder, nor a hub id"),
    Case("infer_prompt_and_prompts_file", "infer", [*INFER, "--prompt", "三角形", "--prompts_file", "{tmp}/p.jsonl"],
         "give exactly one of --prompt, --prompts_file and --interactive", {"p.jsonl": jsonl(GOOD[0])}),
    Case("infer_without_model_path", "infer", ["--prompt", "三角形"], "--model_path is required"),
    Case("infer_folder_without_model", "infer", ["--model_path", "{tmp}/empty", "--prompt", "三角形"],
         "--model_path {tmp}/empty: neither a checkpoint (config.json) nor an adapter", {"empty": None}),
    Case("infer_adapter_without_base", "infer", ["--model_path", "{tmp}/adapter", "--prompt", "三角形"],
         "adapter_config.json: base_model_name_or_path /nonexistent/base: not a checkpoint folder, nor a hub id",
         {"adapter/adapter_config.json": json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                     "base_model_name_or_path": "/nonexistent/base",
                                                     "target_modules": ["q_proj"]})}),
    Case("infer_adapter_config_not_an_object", "infer", ["--model_path", "{tmp}/adapter", "--prompt", "三角形"],
         "{tmp}/adapter/adapter_config.json: not a PEFT adapter config: expected a JSON object, got list",
         {"adapter/adapter_config.json": "[]"}),
    Case("infer_malformed_prompts_file", "infer", [*INFER, "--prompts_file", "{tmp}/p.jsonl"],
         "p.jsonl:2: malformed JSON", {"p.jsonl": jsonl(GOOD[0], "{oops")}),
    Case("infer_gold_label_outside_labels", "infer", [*INFER[:2], "--labels", "回忆,识别", "--prompts_file",
                                                      "{tmp}/p.jsonl"], "p.jsonl:3: class '推断' is not one of",
         {"p.jsonl": jsonl(*GOOD[:3])}),
    Case("infer_corrupt_safetensors_header", "infer",
         ["--model_path", "{models}/corrupt_header", "--labels", "回忆,识别", "--prompt", "三角形"],
         "{models}/corrupt_header/model.safetensors: not a readable safetensors file"),
    Case("infer_zero_batch_size", "infer", [*INFER, "--prompt", "三角形", "--batch_size", "0"],
         "--batch_size: must be >= 1, not 0"),
]


def _break_models(root: Path) -> Path:
    """One tiny checkpoint with a tokenizer, and broken copies of it, one per way a checkpoint can be wrong."""
    ok = make_checkpoint_with_tokenizer(root / "ok", hidden_size=32, intermediate_size=64, layers=1, heads=2,
                                        kv_heads=1)
    sharded = make_checkpoint_with_tokenizer(root / "shard_missing", hidden_size=32, intermediate_size=64, layers=1,
                                             heads=2, kv_heads=1, max_shard_size=20_000)
    shards = sorted(sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2, shards
    shards[1].unlink()

    def copy(name: str) -> Path:
        return Path(shutil.copytree(ok, root / name))

    header = copy("corrupt_header") / "model.safetensors"
    data = bytearray(header.read_bytes())
    data[8:16] = b"\x00garbage"  # the JSON header after the 8-byte length is no longer JSON
    header.write_bytes(bytes(data))
    config = copy("llama") / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "llama",
                                  "architectures": ["LlamaForCausalLM"]}))
    no_template = copy("no_template")
    tok_config = no_template / "tokenizer_config.json"
    tok_config.write_text(json.dumps({k: v for k, v in json.loads(tok_config.read_text()).items()
                                      if k != "chat_template"}))
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    no_tokenizer = copy("no_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (no_tokenizer / name).unlink(missing_ok=True)
    # what the paper's reference code (HF Trainer) leaves in a checkpoint folder, beside full weights
    hf_trainer = copy("hf_trainer_checkpoint")
    (hf_trainer / "trainer_state.json").write_text(json.dumps({"global_step": 2, "epoch": 0.5, "log_history": []}))
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.ones(3)
    optimizer.step()
    torch.save(optimizer.state_dict(), hf_trainer / "optimizer.pt")
    (copy("truncated_state") / "trainer_state.json").write_text('{"step": 2, "epo')
    return root


def _setup(case: Case, tmp: Path) -> None:
    files = {"train.jsonl": jsonl(*GOOD), **case.files} if case.command == "train" else case.files
    for name, content in files.items():
        path = tmp / name
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


@dataclass
class Result:
    """What one case's command did, and the folders its paths were made from."""

    returncode: int
    stderr: str
    tmp: Path
    models: Path


def _run_warm(requests: list[dict], at_once: int = 3) -> dict[str, int]:
    return run_warm(requests, command_env(None), REPO, at_once)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return _break_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def results(request, tmp_path_factory, models) -> dict[str, Result]:
    """Every selected case run once, warm (see tests/warm_commands.py)."""
    wanted = {item.callspec.params["case"].id for item in request.session.items
              if getattr(item, "originalname", None) in ("test_bad_input_is_one_line_error",
                                                         "test_cold_command_gives_the_same_error_as_the_warm_run")}
    selected = [case for case in CASES if case.id in wanted]
    requests, tmps = [], {}
    for case in selected:
        tmp = tmps[case.id] = tmp_path_factory.mktemp(case.id)
        _setup(case, tmp)
        requests.append({"id": case.id, "module": f"ncal_core.{case.command}", "argv": case.argv(tmp, models),
                         "env": command_env(tmp / "cache", **{k: v.format(tmp=tmp) for k, v in case.env.items()}),
                         "cwd": str(REPO), "stdout": str(tmp / "stdout.txt"), "stderr": str(tmp / "stderr.txt")})
    codes = _run_warm(requests) if requests else {}
    return {case.id: Result(codes[case.id], (tmps[case.id] / "stderr.txt").read_text(encoding="utf-8"),
                            tmps[case.id], models) for case in selected}


def test_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_error(case, results):
    result = results[case.id]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert case.expect.format(tmp=result.tmp, models=result.models) in lines[0]


COLD = ["negative_lambda", "duplicate_id", "checkpoint_shard_missing", "infer_prompt_and_prompts_file"]


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c.id in COLD], ids=lambda c: c.id)
def test_cold_command_gives_the_same_error_as_the_warm_run(case, tmp_path, models, results):
    """The forking server is only a shortcut: a real `python -m` prints the same line and exit code."""
    _setup(case, tmp_path)
    proc = run(f"ncal_core.{case.command}", case.argv(tmp_path, models), command_env(tmp_path / "cache"), 120)
    warm = results[case.id]
    assert proc.returncode == warm.returncode == 2
    assert proc.stderr == warm.stderr.replace(str(warm.tmp), str(tmp_path))


def test_rerun_after_an_error_is_not_refused_as_an_earlier_run(tmp_path, models):
    """A run that stopped on bad input left only its run file; fixing the input and running again just works."""
    bad = Case("bad_eval", "train", ["--eval_dataset_path", "{tmp}/eval.jsonl"], "eval.jsonl: the file is empty",
               {"eval.jsonl": "", "eval2.jsonl": jsonl(GOOD[0], {"id": "e", Q: "苹果", "class": "未知"})})
    _setup(bad, tmp_path)
    request = {"module": "ncal_core.train", "env": command_env(tmp_path / "cache"), "cwd": str(REPO),
               "stdout": str(tmp_path / "out.txt")}
    fixed = [*bad.argv(tmp_path, models), "--eval_dataset_path", str(tmp_path / "eval2.jsonl")]
    codes = _run_warm([{**request, "id": "1", "argv": bad.argv(tmp_path, models), "stderr": str(tmp_path / "1.txt")},
                       {**request, "id": "2", "argv": fixed, "stderr": str(tmp_path / "2.txt")}], at_once=1)
    assert codes == {"1": 2, "2": 2}
    assert "eval.jsonl: the file is empty" in (tmp_path / "1.txt").read_text(encoding="utf-8")
    assert "class '未知' is not one of the training labels" in (tmp_path / "2.txt").read_text(encoding="utf-8")
