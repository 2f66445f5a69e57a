"""Checkpoint files: atomic folders, half-written leftovers ignored, nothing executed on load."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from ncal_core.errors import NCALError
from ncal_core.train.checkpoint import (
    list_checkpoints,
    prune_checkpoints,
    read_optimizer_state,
    read_rng,
    read_state,
    resolve_checkpoint,
    save_checkpoint,
)
from ncal_core.train.state import TrainState


def _save(tmp_path, step):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = TrainState(step=step, scheduler={"last_epoch": step}, best_macro_f1=0.5, run={"seed": 1})
    return save_checkpoint(tmp_path, save_weights=lambda d: (d / "w.txt").write_text("w"),
                           save_optimizer=lambda d: torch.save(opt.state_dict(), d / "optimizer.pt"),
                           rng={"torch": torch.get_rng_state()}, state=state), opt


def test_checkpoint_round_trips_optimizer_rng_and_state(tmp_path):
    folder, opt = _save(tmp_path, 3)
    assert folder.name == "checkpoint-3" and (folder / "w.txt").read_text() == "w"
    assert read_state(folder) == TrainState(step=3, scheduler={"last_epoch": 3}, best_macro_f1=0.5, run={"seed": 1})
    loaded = read_optimizer_state(folder)
    assert torch.equal(loaded["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(read_rng(folder)["torch"], torch.get_rng_state())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_half_written_checkpoint_is_ignored_with_a_one_line_warning_given_once(tmp_path, capsys):
    _save(tmp_path, 2)
    leftover = tmp_path / ".tmp-checkpoint-checkpoint-4-123"
    leftover.mkdir()
    (tmp_path / "checkpoint-5").mkdir()  # no trainer_state.json: not complete
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert capsys.readouterr().err == f"warning: {leftover}: ignoring a half-written checkpoint left by an " \
                                      "interrupted run\n"
    assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-2"
    assert capsys.readouterr().err == ""  # said once per process, not at every look


def test_saving_the_same_step_again_replaces_it(tmp_path):
    _save(tmp_path, 2)
    folder, _ = _save(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert read_state(folder).step == 2


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_payload_in_optimizer_file_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder, _ = _save(tmp_path, 1)
    with open(folder / "optimizer.pt", "wb") as handle:
        pickle.dump({"state": _Payload()}, handle)
    with pytest.raises(NCALError, match="optimizer.pt: refused"):
        read_optimizer_state(folder)
    assert not (tmp_path / "PWNED").exists()


def test_prune_keeps_the_newest_and_the_protected(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step)
    prune_checkpoints(tmp_path, keep=2, protect=tmp_path / "checkpoint-1")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-3", "checkpoint-4"]


def test_resolve_checkpoint_errors_name_the_flag(tmp_path):
    with pytest.raises(NCALError, match="--resume_from_checkpoint latest"):
        resolve_checkpoint("latest", tmp_path)
    with pytest.raises(NCALError, match="not a checkpoint folder"):
        resolve_checkpoint(str(tmp_path), tmp_path)
