"""Label probabilities the long way, with transformers: the independent reference for scoring tests."""

from __future__ import annotations

import torch


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """transformers' own rendering of a chat prompt with the generation prompt, as token ids."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def summed_logprobs(logits_of, prompts: list[list[int]], label_ids: list[list[int]]) -> torch.Tensor:
    """[N, K]: sum of log p(label tokens | prompt), one full forward per (prompt, label) — METHOD.md §1 written out."""
    out = torch.zeros(len(prompts), len(label_ids))
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            for c, label in enumerate(label_ids):
                logp = torch.log_softmax(logits_of(torch.tensor([prompt + label]))[0].float(), -1)
                out[i, c] = sum(logp[len(prompt) - 1 + j, tok] for j, tok in enumerate(label))
    return out


def reference_probabilities(hf_model, tokenizer, messages_list: list[list[dict]], labels: list[str]) -> torch.Tensor:
    """[N, K] softmax over labels of a transformers causal LM, prompts rendered by the tokenizer's template."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    label_ids = [tokenizer(label, add_special_tokens=False)["input_ids"] + [eos] for label in labels]
    prompts = [chat_prompt_ids(tokenizer, messages) for messages in messages_list]
    return torch.softmax(summed_logprobs(lambda ids: hf_model(ids).logits, prompts, label_ids), dim=1)
