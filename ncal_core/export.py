"""`python -m ncal_core.export`: a run's weights as one plain Hugging Face checkpoint, its adapter merged in.

The folder holds config.json, safetensors, the run's tokenizer, generation_config.json and the run record
(labels, training class counts, the evaluation's tau and pooling), so transformers' AutoModelForCausalLM and
vLLM load it as any Qwen checkpoint, and `python -m ncal_core.infer --model_path DIR` predicts what it
predicted on the run. A classification head's run (--head linear / etf) exports as a
Qwen2ForSequenceClassification / Qwen3ForSequenceClassification with its labels (id2label, label2id),
which pipeline("text-classification") runs.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ncal_core.cli import DTYPES, flag, parse_config
from ncal_core.durable import read_json, write_atomically, write_json
from ncal_core.errors import NCALError, run_cli
from ncal_core.evaluation.predictor import ModelFolder, open_model_folder
from ncal_core.model.classifier import SCORE_KEY, is_classifier_folder, seq_cls_config
from ncal_core.model.lora import CONFIG_FILE, WEIGHTS_FILE, merge_lora_weights, read_adapter_config
from ncal_core.model.tokenizer import load_tokenizer
from ncal_core.model.weights import checkpoint_files, read_tensors, write_safetensors
from ncal_core.outputs import TOKENIZER_FILES, check_new_folder
from ncal_core.run_record import RunRecord

SHARD_BYTES = 5 * 10**9


@dataclass
class ExportConfig:
    """Flags of `python -m ncal_core.export`."""

    model_path: str | None = flag(None, "a training output or checkpoint (LoRA adapter or full weights): a folder or a "
                                        "hub id")
    output_dir: str | None = flag(None, "where the checkpoint goes: a new or empty folder")
    base_model_path: str | None = flag(None, "the base checkpoint under an adapter, a folder or a hub id (default: "
                                           "the one its run or adapter_config.json names)")
    revision: str | None = flag(None, "the hub revision of a --model_path that is a hub id; default: main")
    dtype: str = flag("bfloat16", "dtype of the written weights: bfloat16, float16 or float32")

    def check(self) -> None:
        if not self.model_path:
            raise NCALError("--model_path: required (a training output or checkpoint)")
        if not self.output_dir:
            raise NCALError("--output_dir: required")
        if self.dtype not in DTYPES:
            raise NCALError(f"--dtype: must be float32, bfloat16 or float16, not {self.dtype!r}")
        check_new_folder("--output_dir", self.output_dir)


def merged_tensors(folder: ModelFolder, dtype: torch.dtype) -> dict:
    """The checkpoint's tensors under Hugging Face's keys: the base with the adapter merged in (merged weights in
    `dtype`, the others as stored), or the full weights."""
    source = folder.base or folder.path
    tensors = {key: t for _, key, t in read_tensors(checkpoint_files(source)[0])}
    if folder.base is None:
        return tensors
    config = read_adapter_config(folder.path / CONFIG_FILE)
    adapter = {key: t for _, key, t in read_tensors([folder.path / WEIGHTS_FILE])}
    return merge_lora_weights(tensors, adapter, config["lora_alpha"] / config["r"], dtype)


def _copy_tokenizer(folder: ModelFolder, out: Path) -> None:
    source = folder.path if (folder.path / "tokenizer_config.json").is_file() else folder.base or folder.path
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)


def _generation_config(folder: ModelFolder, out: Path) -> None:
    """The base's generation_config.json, else one naming the tokenizer's eos (where generation stops)."""
    found = next((p / "generation_config.json" for p in (folder.path, folder.base)
                  if p is not None and (p / "generation_config.json").is_file()), None)
    if found:
        shutil.copyfile(found, out / "generation_config.json")
        return
    tokenizer = load_tokenizer(out)
    write_json(out / "generation_config.json", {"eos_token_id": tokenizer.eos_token_id,
                                                "pad_token_id": tokenizer.pad_token_id})


def export(cfg: ExportConfig) -> Path:
    """Write the checkpoint; returns its folder."""
    cfg.check()
    folder = open_model_folder(cfg.model_path, cfg.base_model_path, cfg.revision)
    dtype = DTYPES[cfg.dtype]

    def fill(out: Path) -> None:
        _copy_tokenizer(folder, out)
        config = read_json((folder.base or folder.path) / "config.json")
        tensors = merged_tensors(folder, dtype)
        if SCORE_KEY in tensors and not is_classifier_folder(folder.base or folder.path):
            # a classification head's adapter merged into its causal-LM base: the sequence classifier transformers
            # builds, without the LM head
            tensors.pop("lm_head.weight", None)
            labels = folder.run.labels if folder.run and folder.run.labels else \
                [f"LABEL_{i}" for i in range(tensors[SCORE_KEY].shape[0])]
            config = seq_cls_config(config, labels, load_tokenizer(out).pad_token_id)
        write_json(out / "config.json", {**config, "torch_dtype": cfg.dtype})
        write_safetensors(tensors, out, dtype=dtype, max_shard_bytes=SHARD_BYTES)
        _generation_config(folder, out)
        if folder.run:  # what infer needs to score as the run did; the base is merged in, so none is named
            replace(folder.run, base_model=None, use_lora=False).write(out)

    out = Path(cfg.output_dir)
    if out.is_dir():
        out.rmdir()  # empty, as check() made sure
    return write_atomically(out.absolute(), fill)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ExportConfig, argv, description=__doc__.splitlines()[0], prog="python -m ncal_core.export")
    out = export(cfg)
    record = RunRecord.read(out)
    labels = f", labels {','.join(record.labels)}" if record and record.labels else ""
    print(f"wrote {out}: a {cfg.dtype} Hugging Face checkpoint{labels}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


if __name__ == "__main__":
    run_cli(main)
