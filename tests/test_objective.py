"""The training objective: label-only head equals the full-logits loss; TC features pooled at the right places;
the padding-free decoder (attention in blocks of rows) gives the loss and gradients of the one padded batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from random_checkpoints import make_hf_checkpoint

from ncal_core.data.batching import collate
from ncal_core.data.prompts import EncodedRow
from ncal_core.evaluation import features
from ncal_core.loss.logit_adjustment import label_decisions
from ncal_core.loss.objective import TrainingObjective
from ncal_core.loss.tc import TCConfig
from ncal_core.model.head import packing_available
from ncal_core.model.qwen import load_model

# fp32: the same sums computed over a subset of positions vs all positions with masking
ATOL_FP32 = 1e-5
# _batch's classes 0 and 1 as labels of one token and of two sharing their first (7 8 | 7 9), then eos (1):
# class 1 decides at its first and its second token
DECISIONS = label_decisions([[5, 1], [7, 8, 1], [7, 9, 1]], [3, 2, 1])


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


@pytest.mark.parametrize("padding_free", [False, True])
def test_label_only_head_equals_masked_cross_entropy_over_full_logits(model, padding_free):
    rows, batch = _batch()
    objective = TrainingObjective(model, padding_free=padding_free, decisions=DECISIONS)
    model.zero_grad()
    lm_sum, z, decision_scores, class_ids = objective(batch)
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
    # row b's decision d picks label token position[c, d]: the logits at prompt_len - 1 + that position
    c = batch.class_ids
    at = batch.prompt_lens[:, None] - 1 + DECISIONS.position[c]  # [B, D]
    expected = logits[torch.arange(len(rows))[:, None, None], at[..., None], DECISIONS.tokens[c]]  # [B, D, C]
    assert torch.allclose(decision_scores, expected, atol=ATOL_FP32)
    assert TrainingObjective(model, padding_free=padding_free)(batch).decision_scores is None
    assert len(batch.target) == sum(len(r.input_ids) - r.prompt_len for r in rows)
    assert class_ids.tolist() == [r.label_index for r in rows]
    assert torch.allclose(lm_sum, full, atol=ATOL_FP32)
    for name, param in model.named_parameters():
        assert torch.allclose(ours[name], param.grad, atol=ATOL_FP32), name


def pooled_alone(model, row, pooling: str) -> torch.Tensor:
    """The TC feature METHOD.md defines, from a forward of the row alone."""
    hidden = model(torch.tensor([row.input_ids]))[0]
    pooled = {"last": hidden[row.prompt_len - 1], "seq_last": hidden[-1], "mean": hidden[:row.prompt_len].mean(0)}
    return pooled[pooling]


@pytest.mark.parametrize("pooling", ["last", "seq_last", "mean"])
@pytest.mark.parametrize("padding_free", [False, True])
def test_tc_feature_is_pooled_where_method_md_says(model, pooling, padding_free):
    rows, batch = _batch()
    objective = TrainingObjective(model, tc=TCConfig(pooling=pooling, e_w=1e6),  # no clamp: raw features
                                  padding_free=padding_free)
    with torch.no_grad():
        z = objective(batch).z
        for i, row in enumerate(rows):
            assert torch.allclose(z[i], pooled_alone(model, row, pooling), atol=ATOL_FP32)


@pytest.mark.parametrize("pooling", ["last", "seq_last", "mean"])
@pytest.mark.parametrize("feature_tokens", [1024, 10])
def test_evaluation_pools_each_row_as_training_does(model, pooling, feature_tokens, monkeypatch):
    rows, _ = _batch()
    tc = TCConfig(pooling=pooling, e_w=1e6)
    # batches of 3 rows and of 1; at 10 tokens a forward the batch of 3 is split too
    monkeypatch.setattr(features, "EVAL_TOKENS", feature_tokens)
    with torch.no_grad():
        z = features.pooled_features(model, rows, pad_id=0, tc=tc, batch_size=3)
        for i, row in enumerate(rows):
            assert torch.allclose(z[i], pooled_alone(model, row, pooling), atol=ATOL_FP32)


@pytest.mark.parametrize("pooling", ["last", "seq_last", "mean"])
@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_padding_free_gives_the_padded_batchs_loss_features_and_gradients(model, pooling, blocks):
    rows, batch = _batch()
    padded = TrainingObjective(model, tc=TCConfig(pooling=pooling), padding_free=False, decisions=DECISIONS)
    ragged = TrainingObjective(model, tc=TCConfig(pooling=pooling), padding_free=True, decisions=DECISIONS)

    def run(objective, batch):
        model.zero_grad()
        out = objective(batch)
        order = torch.tensor([rows.index(r) for r in _rows_of(batch, rows)])
        assert out.class_ids.tolist() == [rows[i].label_index for i in order]
        (out.lm_sum + (out.z * torch.linspace(-1, 1, out.z.shape[1])).sum()).backward()  # touches every feature
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        z, first = torch.empty_like(out.z), torch.empty_like(out.decision_scores)
        z[order], first[order] = out.z, out.decision_scores                            # back to the rows' order
        return out.lm_sum, z, first, grads

    cut = collate(rows, pad_id=0, attention_blocks=blocks, block_cost=0)
    assert len(cut.ragged.blocks) == min(blocks, len(rows))
    one, free = run(padded, batch), run(ragged, cut)
    for a, b in zip(one[:3], free[:3]):
        assert torch.allclose(a, b, atol=ATOL_FP32)
    for name in one[3]:
        assert torch.allclose(one[3][name], free[3][name], atol=ATOL_FP32), name


def _rows_of(batch, rows):
    """The rows a batch holds, in its order, found by their token ids (the rows here are all distinct)."""
    found = []
    for b in range(batch.input_ids.shape[0]):
        ids = batch.input_ids[b, : batch.seq_lens[b]].tolist()
        found.append(next(r for r in rows if r.input_ids == ids))
    return found


def test_packed_head_gives_the_plain_heads_loss_and_gradients(model):
    rows, batch = _batch()
    objective = TrainingObjective(model, decisions=DECISIONS)

    def run(pack: bool):
        objective.head.pack = pack
        assert objective.head.usable(torch.zeros(1, 1)) == pack  # the path under test is the one taken
        model.zero_grad()
        out = objective(batch)
        (out.lm_sum + out.decision_scores.sum()).backward()
        return out.lm_sum, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.lm_head.weight.requires_grad_(False)  # frozen, as under LoRA: the head may pack its weight
    try:
        (packed_loss, packed), (plain_loss, plain) = run(packing_available()), run(False)
    finally:
        model.lm_head.weight.requires_grad_(True)
    assert torch.allclose(packed_loss, plain_loss, atol=ATOL_FP32)
    for name in plain:
        assert torch.allclose(packed[name], plain[name], atol=ATOL_FP32), name


def lora_model(checkpoint, dropout: float):
    """The checkpoint's model with LoRA r 4 on q/k/v/o, its factors seeded (every B non-zero), in train mode."""
    from ncal_core.model.lora import inject_lora

    model = load_model(checkpoint)
    torch.manual_seed(0)  # the A factors' initialisation
    inject_lora(model, 4, 8.0, dropout, ["q_proj", "k_proj", "v_proj", "o_proj"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.train()


@pytest.mark.slow
@pytest.mark.parametrize("lora_dropout", [None, 0.0, 0.1])
def test_compiled_layers_make_few_graphs_over_changing_padding_free_layouts(tmp_path, lora_dropout):
    """Ten micro-batches of different token counts, block counts and widths: two graphs in all, not one per layout.
    With LoRA (lora_dropout not None; its own autograd Function) layer 0's input needs no gradient (the frozen
    embedding's), which makes one more graph of each half, and no dropout mask breaks a graph; its values and
    LoRA gradients equal the eager model's (without dropout: compiled masks come from another RNG stream)."""
    from torch._dynamo.testing import CompileCounter

    from ncal_core.data.batching import ATTENTION_BLOCKS
    from ncal_core.loss.objective import compile_layers

    torch._dynamo.reset()
    checkpoint = make_hf_checkpoint(tmp_path, vocab_size=97)
    lora = lora_dropout is not None
    same_masks = not lora_dropout  # no dropout (None or 0): compiled and eager values agree
    model, eager_model = (lora_model(checkpoint, lora_dropout), lora_model(checkpoint, lora_dropout)) if lora else (
        load_model(checkpoint), load_model(checkpoint))
    counter = CompileCounter()
    compile_layers(model, backend=counter)
    tc = TCConfig(pooling="mean", backend="torch")
    objective, eager = TrainingObjective(model, tc=tc), TrainingObjective(eager_model, tc=tc)
    block_counts = set()
    for step in range(10):
        lens = [5 + (step * 37 + i * 53) % 160 for i in range(6 + step % 3)]
        rows = [EncodedRow([3 + (i * 7 + j) % 40 for j in range(n)] + [50, 1], n, i % 3, str(i))
                for i, n in enumerate(lens)]
        batch = collate(rows, 0, ATTENTION_BLOCKS)
        block_counts.add(len(batch.ragged.blocks))
        out, expected = objective(batch), eager(batch)
        out.lm_sum.backward()
        expected.lm_sum.backward()
        if same_masks:
            assert torch.allclose(out.lm_sum, expected.lm_sum, atol=ATOL_FP32) and torch.allclose(out.z, expected.z)
    if lora:
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all("lora_" in n and p.abs().sum() > 0 for n, p in grads.items())
        for name, param in eager_model.named_parameters():
            if param.requires_grad and same_masks:
                assert torch.allclose(grads[name], param.grad, atol=ATOL_FP32), name
    # one graph for each compiled half of a layer (attention_in, attention_out), shared by every layer and every
    # layout: before, a compiled layer made one graph per block count, and static sizes one per new layout
    # Tensor.random_ in a dropout mask was a graph break: 16 graphs with LoRA dropout before
    assert len(block_counts) > 1 and counter.frame_count == (4 if lora else 2), (counter.frame_count, block_counts)
