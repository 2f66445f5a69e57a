"""ncal_core.outputs: an output is refused when it is an input (by any path to it), a run's or a model's file, or
cannot be written; otherwise its folder is made. The commands' use of it is in tests/test_faults.py."""

from __future__ import annotations

import pytest

from ncal_core.errors import NCALError
from ncal_core.outputs import check_new_folder, check_output_dir, check_output_file, records_of
from ncal_core.run_record import RUN_FILE


def test_an_output_file_reached_through_a_link_is_still_the_input(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("{}\n")
    (tmp_path / "link.jsonl").symlink_to(rows)
    with pytest.raises(NCALError, match="is the --prompts_file file"):
        check_output_file("--output_file", tmp_path / "link.jsonl", [("--prompts_file", str(rows))])
    assert rows.read_text() == "{}\n"


def test_an_output_file_in_a_new_folder_gets_its_folder_and_a_run_folder_takes_new_files_only(tmp_path):
    out = check_output_file("--output_file", tmp_path / "a" / "b" / "preds.jsonl", [("--prompts_file", None)])
    assert out.parent.is_dir() and not out.exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_FILE).write_text("{}")
    (run / "eval.json").write_text("{}")
    check_output_file("--output_file", run / "predictions.jsonl", [])
    with pytest.raises(NCALError, match=r"--metrics_file .*eval\.json: a file of a training run"):
        check_output_file("--metrics_file", run / "eval.json", [])


def test_a_folder_is_named_by_what_it_holds(tmp_path):
    assert records_of(tmp_path) is None
    (tmp_path / "config.json").write_text("{}")
    assert records_of(tmp_path) == "a model"
    (tmp_path / "metrics.jsonl").write_text("")
    assert records_of(tmp_path) == "a training run"


def test_an_output_folder_of_a_run_needs_overwrite_and_the_input_folder_is_never_one(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_FILE).write_text("{}")
    with pytest.raises(NCALError, match="holds the records of a training run; .* --overwrite_output_dir true"):
        check_output_dir("--output_dir", run, [], writes=["eval.json"], overwrite=False)
    assert check_output_dir("--output_dir", run, [], writes=["eval.json"], overwrite=True) == run
    with pytest.raises(NCALError, match="is --model_path"):
        check_output_dir("--output_dir", tmp_path / "." / "run", [("--model_path", str(run))], writes=[],
                         overwrite=True)
    # a subfolder of the model's folder writes over none of its files
    assert check_output_dir("--output_dir", run / "analysis", [("--model_path", str(run))], writes=["eval.json"],
                            overwrite=False).is_dir()


def test_a_new_folder_must_be_absent_or_empty_and_its_parent_writable(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    with pytest.raises(NCALError, match="exists and is not an empty folder"):
        check_new_folder("--output_dir", tmp_path / "full")
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(NCALError, match="cannot write there"):
        check_new_folder("--output_dir", tmp_path / "a_file" / "out")
    assert not check_new_folder("--output_dir", tmp_path / "p" / "out").exists()
    assert (tmp_path / "p").is_dir()


def test_a_file_an_earlier_command_wrote_in_a_model_folder_may_be_written_again_but_not_its_own_files(tmp_path):
    """Running infer twice with one output file in a model's folder was refused the second time: only the folder's
    own files (records, weights, tokenizer, reports) are kept from any output, existing or not."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    preds = check_output_file("--output_file", model / "preds.jsonl", [("--model_path", str(model))])
    preds.write_text("{}\n")
    assert check_output_file("--output_file", model / "preds.jsonl", [("--model_path", str(model))]) == preds
    for name in ("model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                 "tokenizer.json", "generation_config.json", "optimizer.pt", "eval.json", "dev_ids.json",
                 "sphere.png", "after_training_error.txt", "README.md", RUN_FILE, "metrics.jsonl"):
        with pytest.raises(NCALError, match=rf"{name}: a file of a model"):
            check_output_file("--output_file", model / name, [("--model_path", str(model))])
    assert not (model / "eval.json").exists()  # refused before it exists, too


def test_an_existing_file_inside_an_input_data_set_folder_is_never_an_output(tmp_path):
    """A data set saved by save_to_disk is a folder of none of a model's files: its state.json was once returned as
    a writable output."""
    ds = tmp_path / "ds"
    (ds / "train").mkdir(parents=True)
    (ds / "train" / "state.json").write_text("mine")
    (ds / "dataset_dict.json").write_text("mine")
    for out in (ds / "dataset_dict.json", ds / "train" / "state.json", tmp_path / "." / "ds" / "train" / "state.json"):
        with pytest.raises(NCALError, match=r"a file of the --prompts_file folder"):
            check_output_file("--output_file", out, [("--prompts_file", str(ds))])
    assert check_output_file("--output_file", ds / "new.jsonl", [("--prompts_file", str(ds))]) == ds / "new.jsonl"
    (ds / "out").mkdir()
    (ds / "out" / "eval.json").write_text("mine")
    with pytest.raises(NCALError, match=r"would write over .*eval\.json of the --prompts_file folder"):
        check_output_dir("--output_dir", ds / "out", [("--prompts_file", str(ds))], writes=["eval.json"],
                         overwrite=False)
    assert (ds / "train" / "state.json").read_text() == "mine" and (ds / "out" / "eval.json").read_text() == "mine"
