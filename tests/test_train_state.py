"""The training state read back from trainer_state.json: ours round-trips, anything else is refused in one line."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from ncal_core.errors import NCALError
from ncal_core.train.state import TrainState

PATH = Path("ckpt/trainer_state.json")


def test_a_state_written_as_json_reads_back_equal():
    state = TrainState(step=7, epoch=1, micro_batch=4, best_macro_f1=0.625, best_checkpoint="out/checkpoint-4",
                       log_lines=9, run={"seed": 3, "target_modules": ["q_proj"]},
                       scheduler={"last_epoch": 7, "base_lrs": [1e-3]}, scaler={"scale": 65536.0})
    assert TrainState.from_json(json.loads(json.dumps(asdict(state))), PATH) == state


def test_older_checkpoints_without_the_optional_fields_read_with_their_defaults():
    state = TrainState.from_json({"step": 2, "epoch": 0, "micro_batch": 2, "scheduler": {}}, PATH)
    assert state == TrainState(step=2, micro_batch=2, scheduler={})


@pytest.mark.parametrize("data, message", [
    ({"global_step": 2, "epoch": 0.5, "log_history": []}, "not a checkpoint of ncal_core.train (no int 'step')"),
    ([1, 2], "not a checkpoint of ncal_core.train (no int 'step')"),
    ({"step": 2, "epoch": 0, "micro_batch": 2}, "not a checkpoint of ncal_core.train (no dict 'scheduler')"),
    ({"step": 2, "epoch": 0, "micro_batch": 2, "scheduler": {}, "stpe": 3}, "unknown trainer state field 'stpe'"),
    ({"step": True, "epoch": 0, "micro_batch": 2, "scheduler": {}}, "field 'step' is True; expected int"),
    ({"step": 2, "epoch": 0, "micro_batch": 2, "scheduler": {}, "best_macro_f1": "0.5"},
     "field 'best_macro_f1' is '0.5'; expected float"),
    ({"step": 2, "epoch": 0, "micro_batch": 2, "scheduler": {}, "run": []}, "field 'run' is []; expected dict"),
])
def test_a_state_of_another_shape_is_refused_naming_the_file_and_field(data, message):
    with pytest.raises(NCALError) as err:
        TrainState.from_json(data, PATH)
    assert str(err.value).startswith(f"{PATH}: ") and message in str(err.value) and "\n" not in str(err.value)
