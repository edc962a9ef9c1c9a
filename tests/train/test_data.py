"""Data loading, example building and tokenization, checked against the raw files and by decoding."""

import csv
import json
import os
from collections import Counter
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from lorakit.train.data import (
    E2E_INSTRUCTION,
    ClassExample,
    Collator,
    DataError,
    Example,
    apply_prompt_format,
    encode_causal,
    encode_classification,
    encode_prompt,
    format_prompt,
    load_data,
    sample_dir,
)
from support.files import tiny_tokenizer

FULL_DATA = Path(os.environ.get("LORAKIT_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data")
needs_full_data = pytest.mark.skipif(not (FULL_DATA / "e2e").is_dir(), reason="full data sets not present")


def refs_per_mr(path: Path) -> Counter:
    with path.open(encoding="utf-8", newline="") as f:
        return Counter(row["mr"] for row in csv.DictReader(f))


# ---------------------------------------------------------------- built-in data sets


def test_e2e_evaluation_splits_have_one_example_per_mr_with_all_references():
    for split, file in [("test", "testset_w_refs.csv"), ("validation", "devset.csv")]:
        counts = refs_per_mr(sample_dir("e2e") / file)
        data = load_data("e2e", split)
        assert data.task == "causal-lm"
        assert len(data) == len(counts) == 100
        for example in data.examples:
            mr = example.prompt.split(": ", 1)[1]
            assert len(example.references) == counts[mr]
            assert example.target == example.references[0]


@needs_full_data
def test_e2e_sample_keeps_every_reference_of_its_mrs():
    full = refs_per_mr(FULL_DATA / "e2e" / "testset_w_refs.csv")
    sample = refs_per_mr(sample_dir("e2e") / "testset_w_refs.csv")
    assert all(full[mr] == n for mr, n in sample.items())


def test_e2e_template_writes_the_prompt_from_the_meaning_representation():
    default, templated = load_data("e2e", "validation"), load_data("e2e", "validation", template="MR: {mr} =>")
    assert [e.references for e in default.examples] == [e.references for e in templated.examples]
    for plain, written in zip(default.examples, templated.examples, strict=True):
        assert plain.prompt.startswith(E2E_INSTRUCTION)
        assert written.prompt == f"MR: {plain.prompt.removeprefix(E2E_INSTRUCTION)} =>"
    with pytest.raises(DataError, match="template field 'name' is not in the data"):
        load_data("e2e", template="{name}")
    with pytest.raises(DataError, match="'sst2' is for seq-cls, which takes no prompt template"):
        load_data("sst2", template="{sentence}")


def test_e2e_train_has_one_example_per_row():
    data = load_data("e2e")
    with (sample_dir("e2e") / "trainset.csv").open(newline="") as f:
        assert len(data) == sum(1 for _ in csv.DictReader(f)) > 0
    assert all(ex.target in ex.references for ex in data.examples)
    assert data.examples[0].prompt.startswith("Describe this restaurant")


def test_glue_samples():
    sst2_train, sst2_dev = load_data("sst2"), load_data("sst2", "validation")
    assert (len(sst2_train), len(sst2_dev)) == (2000, 872)
    assert sst2_dev.label_names == ("negative", "positive") and sst2_dev.num_labels == 2
    assert sst2_dev.examples[0] == ClassExample("it 's a charming and often affecting journey .", None, 1)

    mrpc_train, mrpc_dev = load_data("mrpc"), load_data("mrpc", "validation")
    assert (len(mrpc_train), len(mrpc_dev)) == (2000, 408)
    assert all(ex.text_pair for ex in mrpc_dev.examples)
    assert {ex.label for ex in mrpc_train.examples} == {0, 1}


@needs_full_data
def test_full_data_from_data_dir_and_environment(monkeypatch):
    assert len(load_data("e2e-full", "test", data_dir=FULL_DATA / "e2e")) == 630  # distinct test MRs
    monkeypatch.setenv("LORAKIT_DATA", str(FULL_DATA))
    assert len(load_data("sst2-full")) == 67349
    # GLUE's MRPC train split, rebuilt from the MSR file (train.tsv itself lacks a pair).
    assert len(load_data("mrpc-full")) == 3668


def test_full_data_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_DATA", str(tmp_path))
    with pytest.raises(DataError, match="LORAKIT_DATA"):
        load_data("e2e-full")


def test_builtin_errors():
    with pytest.raises(DataError, match="no split 'test'"):
        load_data("sst2", "test")
    with pytest.raises(DataError, match="is for task 'seq-cls'"):
        load_data("mrpc", task="causal-lm")


# ---------------------------------------------------------------- local files and hub data sets


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_jsonl_with_default_fields(tmp_path):
    rows = [{"prompt": "Say hi", "completion": "Hi"}, {"prompt": "2+2?", "completion": 4}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = load_data(str(path))
    assert data.examples == [Example("Say hi", "Hi", ["Hi"]), Example("2+2?", "4", ["4"])]


def test_csv_with_named_fields_and_template(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('question,context,answer\n"Who, then?",a story,"Ann"\n')
    data = load_data(str(path), input_field="question", target_field="answer")
    assert data.examples[0] == Example("Who, then?", "Ann", ["Ann"])
    data = load_data(str(path), template="Q: {question} ({context})", target_field="answer")
    assert data.examples[0].prompt == "Q: Who, then? (a story)"


def test_tsv_keeps_quotes_literally(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text('text\tlabel\nhe said " no\tneg\nfine\tpos\n')
    data = load_data(str(path), task="seq-cls")
    assert data.examples == [ClassExample('he said " no', None, 0), ClassExample("fine", None, 1)]
    assert data.label_names == ("neg", "pos")  # sorted names


def test_alpaca_style_instruction_and_input(tmp_path):
    rows = [
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Name a colour.", "input": "", "output": "red"},
    ]
    data = load_data(str(write_jsonl(tmp_path / "a.jsonl", rows)))
    assert [ex.prompt for ex in data.examples] == ["Translate to French.\n\ncat", "Name a colour."]


def test_classification_pairs_and_label_names(tmp_path):
    rows = [{"sentence1": "a", "sentence2": "b", "label": "yes"}, {"sentence1": "c", "sentence2": "d", "label": "no"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    data = load_data(str(path), task="seq-cls", label_names=["no", "yes"])
    assert data.examples == [ClassExample("a", "b", 1), ClassExample("c", "d", 0)]
    numeric = write_jsonl(tmp_path / "n.jsonl", [{"text": "x", "label": 2}, {"text": "y", "label": "0"}])
    assert load_data(str(numeric), task="seq-cls").label_names == ("0", "1", "2")
    with pytest.raises(DataError, match="label 'maybe'"):
        load_data(
            str(write_jsonl(tmp_path / "b.jsonl", [{"text": "x", "label": "maybe"}])),
            "train",
            "seq-cls",
            label_names=["no", "yes"],
        )


def test_hub_path_goes_through_datasets_load_dataset(tmp_path):
    path = write_jsonl(tmp_path / "h.jsonl", [{"text": "good film", "label": 1}, {"text": "dull", "label": 0}])
    options = {"data_files": str(path), "cache_dir": str(tmp_path / "cache")}
    data = load_data("hf:json", task="seq-cls", hub_options=options)
    assert data.examples == [ClassExample("good film", None, 1), ClassExample("dull", None, 0)]


def test_unreachable_hub_data_set_is_a_data_error(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="could not load 'nobody/no-such-data'"):
        load_data("nobody/no-such-data")


@pytest.mark.parametrize(
    ("content", "kwargs", "message"),
    [
        (None, {}, "data file not found"),
        ("", {}, "the data set is empty"),
        (
            '{"q": "a", "a": "b"}\n',
            {},
            r"no target field among .*; fields present: q, a \(name one with target_field\)",
        ),
        ('{"q": "a", "output": "b"}\n', {}, r"no input field among input, text, .*; fields present: q, output"),
        ('{"q": "a", "a": "b"}\n', {"input_field": "question", "target_field": "a"}, "no input field 'question'"),
        ('{"q": "a", "a": "b"}\n', {"template": "{query}", "target_field": "a"}, "template field 'query' is not in"),
        (
            '{"q": "a", "a": "b"}\n{"q": "c"}\n',
            {"input_field": "q", "target_field": "a"},
            "record 2 has no value for field 'a'",
        ),
        ('{"q": "a"}\nnot json\n', {}, r"d.jsonl:2: invalid JSON"),
    ],
)
def test_bad_local_files_raise_data_error(tmp_path, content, kwargs, message):
    path = tmp_path / "d.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as caught:
        load_data(str(path), **kwargs)
    assert "\n" not in str(caught.value)


def test_unknown_spec_and_file_type(tmp_path):
    with pytest.raises(DataError, match=r"not a built-in data set \(e2e, sst2, mrpc\)"):
        load_data("no-such-thing")
    (tmp_path / "d.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="unsupported file type"):
        load_data(str(tmp_path / "d.parquet"))


# ---------------------------------------------------------------- tokenization


@pytest.mark.parametrize("chat", [False, True])
def test_causal_encoding_masks_the_prompt(chat):
    tokenizer = tiny_tokenizer(chat)
    example = Example("name[The Vaults], eatType[pub]", "The Vaults is a pub.", ["The Vaults is a pub."])
    row = encode_causal(tokenizer, example, max_length=128)
    n_prompt = sum(label == -100 for label in row["labels"])
    target_ids = [t for t in row["labels"] if t != -100]

    assert tokenizer.decode(target_ids) == example.target + tokenizer.eos_token
    assert tokenizer.decode(row["input_ids"][:n_prompt]) == format_prompt(tokenizer, example.prompt)
    assert row["input_ids"][:n_prompt] == encode_prompt(tokenizer, example.prompt)  # what generation sees
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_prompt_formats():
    assert format_prompt(tiny_tokenizer(), "Hi") == "<s>Hi\n"
    assert format_prompt(tiny_tokenizer(chat=True), "Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    chat = tiny_tokenizer(chat=True)
    apply_prompt_format(chat, "chat")
    assert format_prompt(chat, "Hi").startswith("<|im_start|>user")
    apply_prompt_format(chat, "plain")  # the template goes: BOS, the text, a newline
    assert format_prompt(chat, "Hi") == "<|im_start|>Hi\n"
    with pytest.raises(DataError, match="prompt format must be one of chat, plain, got 'raw'"):
        apply_prompt_format(chat, "raw")


def test_long_target_is_cut_after_a_whole_short_prompt():
    tokenizer = tiny_tokenizer()
    example = Example("name[The Vaults], eatType[pub]", "The Vaults is a pub near Café Adriatic. " * 4, [])
    n_prompt = len(encode_prompt(tokenizer, example.prompt))
    row = encode_causal(tokenizer, example, max_length=2 * n_prompt + 3)  # the prompt takes under half
    assert row["input_ids"][:n_prompt] == encode_prompt(tokenizer, example.prompt)
    assert len(row["input_ids"]) == 2 * n_prompt + 3
    target_ids = tokenizer(example.target, add_special_tokens=False).input_ids
    assert row["labels"][n_prompt:] == target_ids[: n_prompt + 3]  # its start, without the EOS


def test_classification_encoding_and_collation():
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    rows = [
        encode_classification(tokenizer, ClassExample("a charming journey", "it is", 1), max_length=64),
        encode_classification(tokenizer, ClassExample("dull", None, 0), max_length=64),
    ]
    long_row = encode_classification(tokenizer, ClassExample("word " * 100, None, 0), max_length=8)
    assert len(long_row["input_ids"]) == 8

    batch = Collator(tokenizer.pad_token_id)(rows)
    n = len(rows[0]["input_ids"])
    assert batch["input_ids"].shape == (2, n) and batch["labels"].tolist() == [1, 0]
    short = len(rows[1]["input_ids"])
    assert batch["input_ids"][1, short:].tolist() == [tokenizer.pad_token_id] * (n - short)
    assert batch["attention_mask"][1].tolist() == [1] * short + [0] * (n - short)


def test_collator_pads_token_labels_with_ignore_index():
    tokenizer = tiny_tokenizer()
    rows = [
        encode_causal(tokenizer, Example("Say", "a longer answer here", []), 64),
        encode_causal(tokenizer, Example("Say", "ok", []), 64),
    ]
    batch = Collator(pad_token_id=0)(rows)
    long, short = (len(r["input_ids"]) for r in rows)
    assert batch["labels"].dtype == torch.long
    assert batch["labels"][1].tolist() == rows[1]["labels"] + [-100] * (long - short)
    assert batch["input_ids"][1, short:].tolist() == [0] * (long - short)
