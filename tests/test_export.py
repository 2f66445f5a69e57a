"""`python -m ncal_core.export`: the adapter merged as peft merges it, a checkpoint transformers loads with our label
log-probabilities, and infer on the export predicting what it predicted on the run.

Tolerance (fp32): merged weights within 1e-6 of peft's merge_and_unload; label probabilities within 1e-5 (the merged
matmul sums in another order than the unmerged one)."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_with_tokenizer import LABELS, TEXTS
from random_checkpoints import make_hf_checkpoint, randomise_lora_b
from reference_scoring import reference_probabilities
from training_runs import run, tmwpl_rows, trained_lora_run, write_jsonl

from ncal_core.errors import NCALError
from ncal_core.export import ExportConfig, export
from ncal_core.model.lora import inject_lora, lora_state_dict, merge_lora_weights, save_adapter
from ncal_core.model.qwen import load_model
from ncal_core.model.tokenizer import load_tokenizer
from ncal_core.model.weights import checkpoint_files, read_tensors

PROB_ATOL = 1e-5


def test_merging_is_peft_merge_and_unload(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = make_hf_checkpoint(tmp_path / "base")
    model = load_model(base)
    inject_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base), r=4, alpha=8, dropout=0.0,
                 target_modules=["q_proj", "v_proj", "down_proj"])
    base_tensors = {k: t for _, k, t in read_tensors(checkpoint_files(base)[0])}
    before = {k: t.clone() for k, t in base_tensors.items()}
    ours = merge_lora_weights(base_tensors, lora_state_dict(model), 8 / 4)
    assert all(torch.equal(base_tensors[k], before[k]) for k in before)  # a pure function
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
    theirs = peft_model.merge_and_unload().state_dict()
    changed = [k for k in ours if not torch.equal(ours[k], before[k])]
    assert len(changed) == 3 * 2  # q, v and down of both layers
    for key, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[key], rtol=0, atol=1e-6, msg=key)


def test_a_float32_export_over_a_bf16_base_keeps_the_merged_weights_unrounded(tmp_path):
    # the run computes W (bf16 values in fp32) + s B A in fp32; rounding the sum back to the base's bf16 changes
    # what the exported model predicts (on the real 0.5B checkpoint: label probabilities off by 2e-3 after one step)
    base = make_hf_checkpoint(tmp_path / "base", dtype=torch.bfloat16)
    model = load_model(base)
    inject_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj"])
    randomise_lora_b(model, seed=1, std=1e-3)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base), r=4, alpha=8, dropout=0.0,
                 target_modules=["q_proj"])
    export(ExportConfig(model_path=str(tmp_path / "adapter"), output_dir=str(tmp_path / "out"), dtype="float32"))
    written = {k: t for _, k, t in read_tensors(checkpoint_files(tmp_path / "out")[0])}
    key = "model.layers.0.self_attn.q_proj.weight"
    q_proj = model.layers[0].self_attn.q_proj  # loaded in fp32: the bf16 weights exactly, the update unrounded
    assert written[key].dtype == torch.float32
    torch.testing.assert_close(written[key], (q_proj.weight + q_proj.delta()).detach(), rtol=0, atol=1e-7)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    out, env = trained_lora_run(root)
    exported = root / "exported"
    result = run("ncal_core.export", ["--model_path", str(out), "--output_dir", str(exported), "--dtype", "float32"],
                 env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"wrote {exported}: a float32 Hugging Face checkpoint, labels ")
    return {"root": root, "run": out, "exported": exported, "env": env}


def test_transformers_loads_the_export_and_gives_our_label_probabilities(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    exported, run_dir = trained["exported"], trained["run"]
    assert not (exported / "adapter_config.json").exists()
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
            "ncal_run.json"} <= {p.name for p in exported.iterdir()}
    messages = [[{"role": "user", "content": text}] for text in TEXTS[:6]]
    tokenizer = load_tokenizer(exported)
    merged = reference_probabilities(AutoModelForCausalLM.from_pretrained(exported).eval(), tokenizer, messages,
                                     LABELS)
    base = json.loads((run_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run_dir).eval()
    assert torch.allclose(merged, reference_probabilities(unmerged, tokenizer, messages, LABELS), atol=PROB_ATOL)


def test_infer_on_the_export_predicts_what_it_predicted_on_the_run(trained):
    root, env = trained["root"], trained["env"]
    rows = write_jsonl(root / "test.jsonl", tmwpl_rows(30, seed=1, prefix="t"))
    outputs = {}
    for name in ("run", "exported"):
        result = run("ncal_core.infer", ["--model_path", str(trained[name]), "--prompts_file", str(rows),
                                         "--output_file", str(root / f"{name}.jsonl")], env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "logit_adjust_tau 1.5 (the training run's, else 0)" in result.stderr  # the run's tau, recorded
        outputs[name] = [json.loads(line) for line in (root / f"{name}.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in outputs["exported"]] == [r["prediction"] for r in outputs["run"]]
    for a, b in zip(outputs["exported"], outputs["run"], strict=True):
        assert a["scores"] == pytest.approx(b["scores"], abs=PROB_ATOL)


def test_a_folder_that_holds_something_is_not_written_over(trained, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(NCALError, match=f"^--output_dir {tmp_path}: exists and is not an empty folder$"):
        export(ExportConfig(model_path=str(trained["run"]), output_dir=str(tmp_path)))
    assert (tmp_path / "keep.txt").read_text() == "mine"
