"""Load whatever a user points inference at into one model + tokenizer + label set.

A folder may be: a training output or checkpoint of ours (ncal_run.json beside the weights), a
PEFT adapter (ours, or one saved by the paper's reference code) over a base checkpoint, or a plain
Hugging Face checkpoint (base, merged or fully fine-tuned).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ncal_core.cli import DTYPES
from ncal_core.data.prompts import PromptBuilder
from ncal_core.data.rows import Example
from ncal_core.durable import read_json
from ncal_core.errors import NCALError, at
from ncal_core.evaluation.classify import classify
from ncal_core.evaluation.scoring import score_labels
from ncal_core.loss.logit_adjustment import log_prior
from ncal_core.loss.tc import TCConfig
from ncal_core.model.classifier import (
    QwenClassifier,
    attach_head,
    is_classifier_folder,
    load_adapter_head,
    load_classifier,
    num_labels,
)
from ncal_core.model.hub import checkpoint_folder
from ncal_core.model.lora import adapter_head_size, load_adapter
from ncal_core.model.qwen import QwenModel, load_model
from ncal_core.model.tokenizer import load_tokenizer
from ncal_core.run_record import RUN_FILE, RunRecord


@dataclass
class Predictor:
    """A model ready for scoring, with the tokenizer and what the run that made it knew."""

    model: QwenModel
    tokenizer: Any
    labels: list[str] | None      # None: the caller must supply them (a plain checkpoint or foreign adapter)
    instruction: str | None
    cutoff_len: int
    truncation: str
    tc: TCConfig                  # the run's TC feature settings (the defaults for a model of no run of ours)
    eos_ids: list[int]  # where --generate stops: the tokenizer's eos and generation_config.json's eos_token_id
    classifier: QwenClassifier | None = None  # a head model's (model is then its decoder, without an LM head)

    @property
    def scorer(self) -> QwenModel | QwenClassifier:
        """What predicts the class: the classifier, else the decoder with its LM head (label scoring)."""
        return self.classifier or self.model

    def prompt_builder(self, labels: list[str], instruction: str | None = None) -> PromptBuilder:
        """Prompts built as the training run built them; a given `instruction` replaces the run's."""
        instruction = self.instruction if instruction is None else instruction
        return PromptBuilder(self.tokenizer, labels, instruction=instruction, cutoff_len=self.cutoff_len,
                             truncation=self.truncation)


@dataclass
class ModelFolder:
    """A model folder checked before any weight is read."""

    path: Path
    run: RunRecord | None  # what its training run recorded; None for a model of no run of ours
    base: Path | None    # the base checkpoint under an adapter; None for a full checkpoint
    num_classes: int | None = None  # K of a classification head model; None for one scoring labels with its LM head


def open_model_folder(model_path: str | Path, base_model_path: str | Path | None = None,
                      revision: str | None = None) -> ModelFolder:
    """What `model_path` (a folder or a hub id) is, adapter or full checkpoint, the base an adapter needs (a
    folder or a hub id too), and its run's record."""
    path = checkpoint_folder(model_path, revision, what="--model_path")
    run = RunRecord.read(path)
    if (path / "adapter_config.json").is_file():
        base = base_model_path or (run and run.base_model) \
            or read_json(path / "adapter_config.json", "PEFT adapter config").get("base_model_name_or_path")
        if not base:
            raise NCALError(f"{path / 'adapter_config.json'}: base_model_name_or_path: names no base checkpoint; "
                            "pass --base_model_path")
        what = "--base_model_path" if base_model_path else f"{path / 'adapter_config.json'}: base_model_name_or_path"
        return ModelFolder(path, run, checkpoint_folder(base, what=what), adapter_head_size(path))
    if (path / "config.json").is_file():
        config = path / "config.json"
        return ModelFolder(path, run, None, num_labels(read_json(config), config) if is_classifier_folder(path)
                           else None)
    raise NCALError(f"--model_path {model_path}: neither a checkpoint (config.json) nor an adapter "
                    "(adapter_config.json)")


def model_labels(folder: ModelFolder, given: list[str] | None) -> list[str] | None:
    """The class names of a model's scores: --labels (`given`), else its run's. A head model's output i is the class i
    it was trained on: lacking both, its config.json's id2label, and never the gold labels of the rows; their number
    must be the head's. None: a model scoring labels by name that records none (the caller takes the rows' labels)."""
    labels = given or (folder.run.labels if folder.run else None)
    if folder.num_classes is None:
        return labels
    labels = labels or classifier_labels(folder.path)
    if labels is None:
        raise NCALError(f"--model_path {folder.path}: a classification head of {folder.num_classes} classes that "
                        "records no class names; pass --labels, in the order of the head's outputs")
    if len(labels) != folder.num_classes:
        source = "--labels" if given else at(folder.path / RUN_FILE, None, "labels")
        raise NCALError(f"{source}: {len(labels)} class names, but the classification head of {folder.path} has "
                        f"{folder.num_classes} outputs")
    return labels


def check_device(device: str | None, dtype: str) -> None:
    """--device and --dtype name a device of this machine and a dtype, or are unset / auto."""
    if dtype != "auto" and dtype not in DTYPES:
        raise NCALError(f"--dtype: must be auto, float32, bfloat16 or float16, not {dtype!r}")
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise NCALError(f"--device: not a device name: {device!r} (cpu, cuda, cuda:1, ...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise NCALError(f"--device: {device}: this machine has no CUDA GPU")


def pick_device(device: str | None) -> torch.device:
    """--device as given; unset, the GPU when there is one."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """--dtype as given; auto: bfloat16 on a GPU, float32 (the scores of a CPU run as they always were) on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def run_tau(run: RunRecord | None, tau: float | None) -> float:
    """--logit_adjust_tau as given; unset, the tau the run's own evaluation used (0 for a model of no run of ours)."""
    if tau is not None or run is None:
        return tau or 0.0
    # a run of an older version records the flag alone
    return run.logit_adjust_tau if run.logit_adjust_tau is not None else run.setting("logit_adjust_tau", None) or 0.0


def training_log_prior(path: str | Path, run: RunRecord | None, labels: list[str]) -> torch.Tensor:
    """log training prior [K] of `labels`, from the class counts a run recorded."""
    counts = dict(zip(run.labels or [], run.label_counts or [])) if run else {}
    if any(label not in counts for label in labels):
        raise NCALError(f"--logit_adjust_tau: {path} records no training class counts for these labels")
    return log_prior([counts[label] for label in labels])


def tau_offset(tau: float, path: str | Path, run: RunRecord | None, labels: list[str]) -> torch.Tensor:
    """-tau * log training prior [K] of `labels` from the class counts a run recorded; zeros for tau 0."""
    if not tau:
        return torch.zeros(len(labels))
    return -tau * training_log_prior(path, run, labels)


def class_scores(predictor: Predictor, prompts: list[list[int]], label_ids: list[list[int]], batch_size: int = 16
                 ) -> torch.Tensor:
    """[N, K]: a classification head's logits (one forward a prompt), else each label's summed log-probability
    after each prompt (evaluation.scoring)."""
    if predictor.classifier is not None:
        return classify(predictor.classifier, prompts, predictor.tokenizer.pad_token_id, batch_size)[0]
    return score_labels(predictor.model, prompts, label_ids, batch_size=batch_size)


def label_scorer(predictor: Predictor, labels: list[str], offset: torch.Tensor, instruction: str | None = None,
                 batch_size: int = 16) -> Callable[[list[Example]], torch.Tensor]:
    """rows -> log-softmax over the labels [N, K] of the model's label scores plus `offset` (tau_offset)."""
    builder = predictor.prompt_builder(labels, instruction)

    def score(rows: list[Example]) -> torch.Tensor:
        scores = class_scores(predictor, builder.prompt_ids_all(rows), builder.label_ids, batch_size)
        return torch.log_softmax(scores + offset.to(scores.device), dim=1)

    return score


def say_tau(taus: list[float], given: bool) -> None:
    """Which tau(s) adjust the label scores, on stderr (stdout holds the predictions)."""
    source = "--logit_adjust_tau" if given else "the training run's, else 0"
    print(f"logit_adjust_tau {', '.join(map(str, taus))} ({source})", file=sys.stderr)


@contextmanager
def progress(model: torch.nn.Module, total: int | None, desc: str) -> Iterator[None]:
    """A progress bar on stderr counting the rows of each forward pass of `model` towards `total`.

    Rows, not batches: a batch may be split into several passes to bound its tokens, so only rows can be counted
    before the work starts.
    """
    with tqdm(total=total, desc=desc, unit="row", dynamic_ncols=True) as bar:
        def tick(_module: torch.nn.Module, args: tuple, kwargs: dict, _output: Any) -> None:
            # returns None: a forward hook's return value would replace the output
            ragged = kwargs.get("ragged")
            bar.update(ragged.batch.rows if ragged is not None else (args[0] if args else kwargs["input_ids"]).shape[0])

        hook = model.register_forward_hook(tick, with_kwargs=True)
        try:
            yield
        finally:
            hook.remove()


def _generation_eos(folder: ModelFolder, eos_id: int) -> list[int]:
    """The tokenizer's eos and the eos_token_id (an id or a list) of the model's generation_config.json."""
    path = next((p / "generation_config.json" for p in (folder.path, folder.base)
                 if p is not None and (p / "generation_config.json").is_file()), None)
    extra = read_json(path, "generation config").get("eos_token_id") if path else None
    extra = [] if extra is None else extra if isinstance(extra, list) else [extra]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in extra):
        raise NCALError(f"{path}: eos_token_id: must be a token id or a list of them, not {extra!r}")
    return list(dict.fromkeys([eos_id, *extra]))


def load_predictor(model_path: str | Path, base_model_path: str | Path | None = None,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   revision: str | None = None) -> Predictor:
    """Resolve `model_path` (and the base it needs) into a Predictor in eval mode."""
    return load_folder(open_model_folder(model_path, base_model_path, revision), dtype, device)


def load_folder(folder: ModelFolder, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> Predictor:
    """The Predictor of a folder open_model_folder has already checked (and whose run record it read)."""
    path, run = folder.path, folder.run
    classifier = None
    if folder.base is not None:
        model = load_model(folder.base, dtype=dtype, device=device)
        load_adapter(model, path)
        num_classes = adapter_head_size(path)
        if num_classes is not None:  # a SEQ_CLS adapter: its head predicts, as saved (an etf head's frame included)
            classifier = attach_head(model, num_classes, "linear", 0)
            load_adapter_head(classifier, path)
    elif is_classifier_folder(path):
        classifier = load_classifier(path, dtype=dtype, device=device)
        model = classifier.model
    else:
        model = load_model(path, dtype=dtype, device=device)
    tokenizer_dir = path if (path / "tokenizer_config.json").is_file() else folder.base or path
    model.eval()
    tokenizer = load_tokenizer(tokenizer_dir)
    setting = run.setting if run else (lambda name, default: default)
    tc = TCConfig(pooling=setting("pooling", TCConfig.pooling), e_w=setting("e_w", TCConfig.e_w))
    labels = run.labels if run else classifier_labels(path) if classifier is not None else None
    return Predictor(model=model, tokenizer=tokenizer, labels=labels, classifier=classifier,
                     instruction=setting("instruction", None), cutoff_len=setting("cutoff_len", 2048),
                     truncation=setting("truncation", "left"), tc=tc,
                     eos_ids=_generation_eos(folder, tokenizer.eos_token_id))


def classifier_labels(path: Path) -> list[str] | None:
    """The class names a transformers sequence-classification config.json names (id2label), None without one."""
    config = path / "config.json"
    id2label = read_json(config, "model config").get("id2label") if config.is_file() else None
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        return [str(id2label[str(i)]) for i in range(len(id2label))]
    except KeyError:
        raise NCALError(f"{config}: id2label: keys must be 0..{len(id2label) - 1}") from None
