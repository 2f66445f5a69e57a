"""The training loop through the fused Triton TC path (interpreted on CPU) reaches the PyTorch path's losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# fp32 losses of 4 steps: the two TC implementations differ by summation order only
RTOL_LOSS = 1e-4


def _rows(path):
    words = ["苹果", "三角形", "面积", "分数", "速度", "长方形", "周长", "小数"]
    rows = [{"id": str(i), "question": f"{words[i % 8]}和{words[(i * 3) % 8]}的问题{i}", "class": "ABC"[i % 3]}
            for i in range(48)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.slow
def test_fused_triton_tc_path_trains_to_the_same_losses_as_pytorch(tmp_path):
    data = _rows(tmp_path / "rows.jsonl")
    losses = {}
    for backend in ("torch", "triton"):
        out = tmp_path / backend
        env = {**os.environ, "NCAL_CACHE_DIR": str(tmp_path / "cache"), "TRITON_INTERPRET": "1"}
        subprocess.run([sys.executable, "-m", "ncal_core.train", "--dataset_path", str(data), "--output_dir", str(out),
                        "--eval_dataset_path", "none", "--save_strategy", "no", "--max_steps", "4",
                        "--logging_steps", "1", "--per_device_train_batch_size", "12", "--lambda_lc", "1",
                        "--tiny_hidden_size", "64", "--tiny_num_layers", "1", "--tiny_vocab_size", "300",
                        "--tc_backend", backend], check=True, env=env, capture_output=True)
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[backend] = [(x["lm_loss"], x["tc_loss"]) for x in lines if "lm_loss" in x]
    assert len(losses["torch"]) == 4
    assert losses["torch"][0][1] > 0  # the TC term is really there
    for (lm_t, tc_t), (lm_k, tc_k) in zip(losses["torch"], losses["triton"]):
        assert lm_k == pytest.approx(lm_t, rel=RTOL_LOSS) and tc_k == pytest.approx(tc_t, rel=RTOL_LOSS)
