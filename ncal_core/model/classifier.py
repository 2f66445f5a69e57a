"""A K-way classification head on the decoder's last real token, laid out as transformers'
Qwen2ForSequenceClassification / Qwen3ForSequenceClassification: the decoder under `model.`, a bias-free
`score` [K, H], no LM head.

Two heads (--head): `linear`, a trained layer; `etf`, the layer fixed to a simplex equiangular tight frame
(Yang et al., NeurIPS 2022) times one learned scalar temperature, so that cross-entropy over the K classes, its
logit adjustment and post-hoc tau apply to it unchanged. Either is saved as the one `score.weight` transformers
reads (the temperature folded in). This is a different thing from model.head, the LM head at label positions.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncal_core.durable import read_json, write_json
from ncal_core.errors import NCALError, at
from ncal_core.layout import Ragged
from ncal_core.model.lora import adapter_head
from ncal_core.model.qwen import ARCHITECTURES, ModelConfig, QwenModel
from ncal_core.model.weights import assign_parameters, checkpoint_files, hf_name, read_tensors, write_safetensors

HEADS = ("lm", "linear", "etf")  # lm: label scoring with the LM head, no classifier
SCORE_KEY = "score.weight"       # transformers' name of the head's weight
INIT_STD = 0.02                  # transformers' initializer_range default, which initialises its `score`
SEQ_CLS = {model_type: arch.replace("ForCausalLM", "ForSequenceClassification")
           for model_type, arch in ARCHITECTURES.items()}


class ClassifierHead(nn.Module):
    """logits [B, K] = pooled [B, H] @ weight.T, weight [K, H] in fp32: trained (linear), or a fixed simplex ETF
    times a learned temperature (etf)."""

    def __init__(self, hidden_size: int, num_classes: int, kind: str, seed: int = 0,
                 device: torch.device | str | None = None, frame: Tensor | None = None) -> None:
        """seed: the linear weight's initialisation; frame: the etf head's [K, H] unit rows (loss.tc.simplex_etf),
        None to be filled by load_weight."""
        super().__init__()
        if kind not in HEADS[1:]:
            raise ValueError(f"head kind must be linear or etf, not {kind!r}")
        self.kind = kind
        if kind == "linear":
            generator = torch.Generator().manual_seed(seed)
            self.linear_weight = nn.Parameter(
                torch.empty(num_classes, hidden_size).normal_(0.0, INIT_STD, generator=generator).to(device))
        else:
            frame = torch.zeros(num_classes, hidden_size) if frame is None else frame.float()
            self.register_buffer("etf", frame.to(device))  # [K, H] unit rows
            self.temperature = nn.Parameter(torch.ones((), device=device))

    @property
    def weight(self) -> Tensor:
        """[K, H] fp32: transformers' score.weight."""
        return self.linear_weight if self.kind == "linear" else self.temperature * self.etf

    @torch.no_grad()
    def load_weight(self, weight: Tensor, source: str) -> None:
        """Take a saved score.weight [K, H]; for etf, its rows' common norm is the temperature and their directions
        the frame (to fp32 rounding)."""
        expected = tuple(self.etf.shape if self.kind == "etf" else self.linear_weight.shape)
        if tuple(weight.shape) != expected:
            raise NCALError(f"{at(source, None, SCORE_KEY)}: shape {tuple(weight.shape)}, the head needs {expected}")
        weight = weight.float().to(self.weight.device)
        if self.kind == "linear":
            self.linear_weight.copy_(weight)
            return
        scale = weight.norm(dim=1).mean()
        self.temperature.copy_(scale)
        self.etf.copy_(weight / scale)

    def forward(self, pooled: Tensor) -> Tensor:
        """pooled [B, H] -> logits [B, K] fp32"""
        return F.linear(pooled.float(), self.weight)


def last_token(hidden: Tensor, seq_lens: Tensor) -> Tensor:
    """hidden [B, T, H] of right-padded rows -> [B, H] at each row's last real token (transformers' pooling)."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), seq_lens - 1]


class QwenClassifier(nn.Module):
    """The decoder (its LM head dropped) and a ClassifierHead: parameter names are transformers' own."""

    def __init__(self, model: QwenModel, score: ClassifierHead) -> None:
        super().__init__()
        model.lm_head = None  # unused; an untied one would hold vocabulary x hidden weights for nothing
        self.model = model
        self.score = score

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def forward(self, input_ids: Tensor, seq_lens: Tensor, ragged: Ragged | None = None) -> tuple[Tensor, Tensor]:
        """Right-padded input_ids [B, T] with seq_lens [B] real tokens -> (logits [B, K] fp32, pooled hidden [B, H])."""
        pooled = last_token(self.model(input_ids, ragged=ragged), seq_lens)
        return self.score(pooled), pooled


def attach_head(model: QwenModel, num_classes: int, kind: str, seed: int, frame: Tensor | None = None
                ) -> QwenClassifier:
    """A new head of `kind` on a loaded decoder, on its device (frame: the etf head's, see ClassifierHead)."""
    return QwenClassifier(model, ClassifierHead(model.config.hidden_size, num_classes, kind, seed,
                                                device=model.embed_tokens.weight.device, frame=frame))


def load_adapter_head(classifier: QwenClassifier, adapter_dir: str | Path) -> None:
    """The head a SEQ_CLS adapter saved into the classifier's score, in place (an etf head's frame and temperature
    included); an adapter without one is refused."""
    head = adapter_head(adapter_dir)
    if head is None:
        raise NCALError(f"{adapter_dir}: the adapter holds no classification head (score.weight)")
    classifier.score.load_weight(head, str(adapter_dir))


def classifier_tensors(classifier: QwenClassifier) -> dict[str, Tensor]:
    """Every weight under transformers' sequence-classification keys."""
    tensors = {hf_name(name): p.detach() for name, p in classifier.model.named_parameters()}
    tensors[SCORE_KEY] = classifier.score.weight.detach()
    return tensors


def seq_cls_config(config: dict, labels: list[str], pad_token_id: int) -> dict:
    """A causal-LM config.json dict as its ForSequenceClassification twin with these labels."""
    model_type = config.get("model_type")
    if model_type not in SEQ_CLS:
        raise ValueError(f"model_type {model_type!r}: not a Qwen2/Qwen3 config")
    return {**config, "architectures": [SEQ_CLS[model_type]], "num_labels": len(labels),
            "id2label": {str(i): label for i, label in enumerate(labels)},
            "label2id": {label: i for i, label in enumerate(labels)}, "pad_token_id": pad_token_id}


def save_classifier(classifier: QwenClassifier, path: str | Path, labels: list[str], pad_token_id: int) -> None:
    """config.json + model.safetensors (in the decoder's dtype) that transformers' AutoModelForSequenceClassification
    loads."""
    path = Path(path)
    dtype = classifier.model.embed_tokens.weight.dtype
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / "config.json", seq_cls_config(classifier.config.to_hf(dtype), labels, pad_token_id))
    write_safetensors(classifier_tensors(classifier), path, dtype=dtype)


def is_classifier_folder(path: Path) -> bool:
    """Whether a checkpoint folder holds a sequence-classification model (config.json's architectures)."""
    architectures = read_json(path / "config.json").get("architectures") or []
    return any(str(a).endswith("ForSequenceClassification") for a in architectures)


def num_labels(config: dict, source: Path) -> int:
    """K of a sequence-classification config.json (num_labels, else id2label's size)."""
    k = config.get("num_labels", len(config.get("id2label") or {}))
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise NCALError(f"{at(source, None, 'num_labels')}: must be a number of classes >= 2, not {k!r}")
    return k


def _split_score(files: list[Path], found: list[Tensor]):
    """The tensors of checkpoint files but score.weight, which is appended to `found` (and an LM head, unused)."""
    for file, key, tensor in read_tensors(files):
        if key == SCORE_KEY:
            found.append(tensor)
        elif key != "lm_head.weight":
            yield file, key, tensor


def _assign(classifier: QwenClassifier, path: Path, **how) -> None:
    """A sequence-classification folder's weights into the classifier (how: assign_parameters' keywords)."""
    files, source = checkpoint_files(path)
    score: list[Tensor] = []
    assign_parameters(classifier.model, _split_score(files, score), hf_name, source=source, **how)
    if not score:
        raise NCALError(f"{at(source, None, SCORE_KEY)}: weight missing")
    classifier.score.load_weight(score[0], str(source))


def load_classifier_weights(classifier: QwenClassifier, path: str | Path) -> None:
    """Copy a sequence-classification folder's weights into the classifier's own parameters (in place)."""
    _assign(classifier, Path(path), in_place=True)


def load_classifier(path: str | Path, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> QwenClassifier:
    """A sequence-classification folder (ours or transformers') as a QwenClassifier in eval mode, its head a linear
    one whatever it was trained as (an etf head is saved as the score.weight it computes)."""
    path = Path(path)
    config_path = path / "config.json"
    hf = read_json(config_path)
    config = ModelConfig.from_hf(hf, str(config_path))
    classifier = QwenClassifier(QwenModel(config, device="meta"),
                                ClassifierHead(config.hidden_size, num_labels(hf, config_path), "linear", device=device))
    _assign(classifier, path, dtype=dtype, device=device)
    return classifier.eval()
