"""The training objective: label-only head equals the full-logits loss; TC features pooled at the right places."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from random_checkpoints import make_hf_checkpoint

from ncal_core.batching import collate
from ncal_core.model import load_model
from ncal_core.objective import TrainingObjective, target_index
from ncal_core.prompts import EncodedRow

# fp32: the same sums computed over a subset of positions vs all positions with masking
ATOL_FP32 = 1e-5


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(make_hf_checkpoint(tmp_path_factory.mktemp("m"), vocab_size=97))


def _batch():
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i, (prompt, label) in enumerate([(5, 2), (9, 3), (3, 1), (7, 2)]):
        ids = torch.randint(0, 97, (prompt + label,), generator=gen).tolist()
        rows.append(EncodedRow(input_ids=ids, prompt_len=prompt, label_index=i % 2, example_id=str(i)))
    return rows, collate(rows, pad_id=0)


def test_label_only_head_equals_masked_cross_entropy_over_full_logits(model):
    rows, batch = _batch()
    objective = TrainingObjective(model, use_tc=False)
    query, target = target_index(batch.prompt_lens, batch.seq_lens, batch.input_ids.shape[1])
    model.zero_grad()
    lm_sum, z, first_logits = objective(batch, query, target)
    lm_sum.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert z is None

    model.zero_grad()
    logits = model.lm_head(model(batch.input_ids, attention_mask=batch.attention_mask))  # [B, T, V]
    labels = batch.input_ids.clone()
    positions = torch.arange(labels.shape[1])
    labels[positions < batch.prompt_lens[:, None]] = -100            # prompt positions carry no loss
    labels[positions >= batch.seq_lens[:, None]] = -100              # nor does padding
    full = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")
    full.backward()
    assert torch.allclose(first_logits, logits[torch.arange(len(rows)), batch.prompt_lens - 1], atol=ATOL_FP32)
    assert len(target) == sum(len(r.input_ids) - r.prompt_len for r in rows)
    assert torch.allclose(lm_sum, full, atol=ATOL_FP32)
    for name, param in model.named_parameters():
        assert torch.allclose(ours[name], param.grad, atol=ATOL_FP32), name


@pytest.mark.parametrize("pooling", ["last", "seq_last", "mean"])
def test_tc_feature_is_pooled_where_method_md_says(model, pooling):
    rows, batch = _batch()
    objective = TrainingObjective(model, use_tc=True, pooling=pooling, e_w=1e6)  # no clamp: raw features
    query, target = target_index(batch.prompt_lens, batch.seq_lens, batch.input_ids.shape[1])
    with torch.no_grad():
        z = objective(batch, query, target).z
        for i, row in enumerate(rows):
            hidden = model(torch.tensor([row.input_ids]))[0]
            expected = {"last": hidden[row.prompt_len - 1], "seq_last": hidden[-1],
                        "mean": hidden[:row.prompt_len].mean(0)}[pooling]
            assert torch.allclose(z[i], expected, atol=ATOL_FP32)
