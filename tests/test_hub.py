"""Hub ids resolve through the Hugging Face cache, laid out here as huggingface_hub lays it out, with no network:
training, inference on its adapter (whose base is recorded as the hub id) and a pinned revision."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from checkpoint_with_tokenizer import make_checkpoint_with_tokenizer
from training_runs import command_env, run, tmwpl_rows, write_jsonl

from ncal_core.errors import NCALError
from ncal_core.model.hub import checkpoint_folder, is_hub_id

REPO_ID = "acme/tiny-qwen"


def cache_snapshot(cache: Path, repo_id: str, folder: Path, revision: str = "main") -> Path:
    """Put `folder` into a hub cache as a snapshot of repo_id at `revision`: blobs by content hash, the snapshot's
    files symlinked to them, refs/<revision> naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for path in sorted(folder.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    main = make_checkpoint_with_tokenizer(root / "main", hidden_size=32, intermediate_size=64, layers=1, heads=2,
                                          kv_heads=1)
    other = make_checkpoint_with_tokenizer(root / "other", seed=1, hidden_size=32, intermediate_size=64, layers=1,
                                           heads=2, kv_heads=1)
    cache = root / "hf-cache"
    snapshots = {"main": cache_snapshot(cache, REPO_ID, main), "v1": cache_snapshot(cache, REPO_ID, other, "v1")}
    env = command_env(root / "ncal-cache", HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    return {"root": root, "cache": cache, "snapshots": snapshots, "env": env}


def test_a_hub_id_is_told_from_a_folder(tmp_path, monkeypatch):
    assert is_hub_id("Qwen/Qwen2.5-7B-Instruct") and not is_hub_id("tiny") and not is_hub_id("/abs/path")
    (tmp_path / "Qwen" / "local").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # an existing relative folder of the same shape is a folder
    assert not is_hub_id("Qwen/local") and checkpoint_folder("Qwen/local", what="--x") == Path("Qwen/local")


def test_train_and_infer_on_a_cached_hub_id_without_the_network(hub):
    root, env = hub["root"], hub["env"]
    rows = write_jsonl(root / "train.jsonl", tmwpl_rows(24))
    out = root / "run"
    trained = run("ncal_core.train", ["--model_name_or_path", REPO_ID, "--dataset_path", str(rows),
                                      "--eval_dataset_path", "none", "--output_dir", str(out), "--max_steps", "2",
                                      "--per_device_train_batch_size", "8", "--save_strategy", "no"], env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    adapter = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    assert adapter["base_model_name_or_path"] == REPO_ID  # portable: any machine with the model loads it
    record = json.loads((out / "ncal_run.json").read_text(encoding="utf-8"))
    assert Path(record["base_model"]) == hub["snapshots"]["main"]
    (out / "ncal_run.json").write_text(json.dumps({**record, "base_model": None}))  # the adapter's id alone
    scored = run("ncal_core.infer", ["--model_path", str(out), "--prompt", "三角形的内角和"], env)
    assert scored.returncode == 0, scored.stderr[-3000:]


def test_a_revision_picks_its_snapshot(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub["cache"]))
    assert checkpoint_folder(REPO_ID, what="--m") == hub["snapshots"]["main"]
    assert checkpoint_folder(REPO_ID, "v1", what="--m") == hub["snapshots"]["v1"]
    with pytest.raises(NCALError, match=r"^--m acme/tiny-qwen \(revision v2\): not in the Hugging Face cache and "
                                        r"HF_HUB_OFFLINE is set; download it first"):
        checkpoint_folder(REPO_ID, "v2", what="--m")


def test_an_id_missing_from_the_cache_offline_is_one_line_naming_the_flag(hub):
    result = run("ncal_core.train", ["--model_name_or_path", "acme/absent", "--max_steps", "1"], hub["env"])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --model_name_or_path acme/absent: not in the Hugging Face cache and "
                               "HF_HUB_OFFLINE is set")
