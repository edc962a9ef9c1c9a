"""Which rows a run trains on, validates on and scores: a separate evaluation file (`eval_data`) replaces the
held-out tenth, and its labels take the training file's ids."""

import json

from lorakit.train.config import RunConfig
from lorakit.train.splits import load_splits


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_eval_data_is_validated_and_scored_with_the_training_label_ids(tmp_path):
    train_rows = [{"text": f"t{i}", "label": name} for i, name in enumerate(["cat", "dog", "emu"] * 4)]
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    # Only two of the three labels, in another order: sorted on their own they would be ids 0 and 1.
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"text": "d0", "label": "emu"}, {"text": "d1", "label": "dog"}])
    cfg = RunConfig(data=str(train), eval_data=str(dev), task="seq-cls")
    trained, validation, scored = load_splits(cfg)
    assert len(trained) == 12  # nothing held out of the training file
    assert trained.label_names == ("cat", "dog", "emu")
    assert [e.label for e in scored.examples] == [2, 1] and validation.examples == scored.examples


def test_without_eval_data_a_seeded_tenth_is_held_out(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(30)]
    cfg = RunConfig(data=str(write_jsonl(tmp_path / "d.jsonl", rows)))
    trained, validation, scored = load_splits(cfg)
    assert (len(trained), len(validation)) == (27, 3) and scored.examples == validation.examples
    assert {e.prompt for e in trained.examples} | {e.prompt for e in scored.examples} == {r["prompt"] for r in rows}


def test_a_resumed_run_must_keep_its_data_options():
    saved = RunConfig(eval_data="dev.tsv", columns=["a", "b"]).to_dict()
    assert RunConfig(eval_data="dev.tsv", columns=["a", "b"]).changed_since(saved) == []
    changed = RunConfig(eval_data="other.tsv", long_rows="drop").changed_since(saved)
    assert changed == ["columns", "eval_data", "long_rows"]


def test_eval_examples_are_spread_over_the_whole_scored_file(tmp_path):
    """Not the head of the file: 4 of 10 rows are rows 0, 2, 5 and 7 (i · 10 // 4)."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(8)])
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"prompt": f"d{i}", "completion": "c"} for i in range(10)])
    _, _, scored = load_splits(RunConfig(data=str(train), eval_data=str(dev), eval_examples=4))
    assert [e.prompt for e in scored.examples] == ["d0", "d2", "d5", "d7"]
    _, _, whole = load_splits(RunConfig(data=str(train), eval_data=str(dev), eval_examples=50))
    assert [e.prompt for e in whole.examples] == [f"d{i}" for i in range(10)]
