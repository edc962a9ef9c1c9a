"""`--references central`: one training row per input, its target the reference its siblings agree with most."""

import json

import pytest
import sacrebleu

from lorakit.train.config import RunConfig, RunError
from lorakit.train.examples import CLASSIFICATION, GENERATION, ClassExample, DataError, DataSplit, Example
from lorakit.train.references import central_examples, central_reference, choose_references
from lorakit.train.splits import load_splits

OUTLIER = "Near the river you will find a family place."
TWINS = ["Aromi is a cheap pub in the city centre.", "Aromi is a cheap pub in the city centre!"]


def test_the_central_reference_is_the_one_its_siblings_agree_with():
    assert central_reference([OUTLIER, *TWINS]) in TWINS
    assert central_reference([*TWINS, OUTLIER]) in TWINS
    assert central_reference([OUTLIER]) == OUTLIER
    with pytest.raises(ValueError):
        central_reference([])


def test_the_choice_maximises_sentence_bleu_against_the_other_references():
    refs = [
        "The Eagle is a coffee shop near Burger King.",
        "Near Burger King there is a coffee shop called The Eagle.",
        "The Eagle coffee shop is near Burger King in the city centre.",
        "Try The Eagle, a coffee shop by Burger King.",
    ]
    # sacrebleu's functional API, lower-cased input and the same smoothing, one reference list per candidate.
    scores = [
        sacrebleu.sentence_bleu(r.lower(), [o.lower() for o in refs if o is not r], smooth_method="exp").score
        for r in refs
    ]
    assert len(set(scores)) == len(scores)
    assert central_reference(refs) == refs[scores.index(max(scores))]


def test_central_examples_keep_one_row_per_prompt_in_order():
    conversation = ({"role": "user", "content": "hi"},)
    rows = [
        Example("mr A", OUTLIER, [OUTLIER]),
        Example(conversation, "Hello!", ["Hello!"]),
        Example("mr A", TWINS[0], [TWINS[0]]),
        Example("mr B", "only", ["only"]),
        Example("mr A", TWINS[1], [TWINS[1]]),
        Example(({"role": "user", "content": "hi"},), "Hi there.", ["Hi there."]),
    ]
    out = central_examples(rows)
    assert [e.prompt for e in out] == ["mr A", conversation, "mr B"]
    assert out[0].target in TWINS and out[0].references == [OUTLIER, *TWINS]
    assert out[1].references == ["Hello!", "Hi there."] and out[2].target == "only"


def test_choose_references_checks_its_choice_and_the_task():
    split = DataSplit(GENERATION, [Example("p", "t", ["t"]), Example("p", "u", ["u"])])
    assert choose_references(split, "all") is split
    assert len(choose_references(split, "central")) == 1
    with pytest.raises(DataError, match="all, central"):
        choose_references(split, "best")
    with pytest.raises(DataError, match="generation data"):
        choose_references(DataSplit(CLASSIFICATION, [ClassExample("a", None, 0)]), "central")


def test_a_run_trains_on_central_references_and_scores_against_all(tmp_path):
    train = tmp_path / "train.jsonl"
    rows = [("a", OUTLIER), ("a", TWINS[0]), ("b", "x"), ("a", TWINS[1]), ("c", "y")]
    train.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rows))
    dev = tmp_path / "dev.jsonl"
    dev.write_text(json.dumps({"prompt": "a", "completion": OUTLIER}) + "\n")
    trained, _, scored = load_splits(RunConfig(data=str(train), eval_data=str(dev), references="central"))
    assert [(e.prompt, e.target in TWINS or e.target) for e in trained.examples] == [
        ("a", True),
        ("b", "x"),
        ("c", "y"),
    ]
    assert [e.target for e in scored.examples] == [OUTLIER]  # evaluation data is never reduced
    everything, _, _ = load_splits(RunConfig(data=str(train), eval_data=str(dev)))
    assert len(everything) == len(rows)


def test_the_option_is_checked_before_a_run_starts():
    with pytest.raises(RunError, match="unknown --references"):
        RunConfig(references="median").resolved()
    with pytest.raises(RunError, match="applies to causal-lm"):
        RunConfig(data="sst2", references="central").resolved()
