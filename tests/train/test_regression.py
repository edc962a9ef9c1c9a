"""Regression (one output, MSE) and the task a run infers from its data: examples, the model's head and loss
(MSE written out), and a tiny encoder that learns a synthetic linear task (Pearson correlation by scipy)."""

import json
import random

import pytest
import torch
from scipy.stats import pearsonr

from lorakit.models import load_model
from lorakit.train.data import ClassExample, Collator, DataError, encode_classification, load_data
from lorakit.train.tasks import choose_task
from support.files import save_tiny_bert

WORDS = ["pub", "near", "The", "Vaults", "rating"]


def linear_rows(n: int, seed: int) -> list[dict]:
    """Sentences of 3-8 words; the score is linear in the word counts: 0.5 + 0.8·#pub − 0.6·#near."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
        rows.append({"sentence": " ".join(words), "score": 0.5 + 0.8 * words.count("pub") - 0.6 * words.count("near")})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_regression_targets_are_numbers(tmp_path):
    path = write_jsonl(
        tmp_path / "sts.jsonl",
        [{"text": "a", "text_pair": "b", "label": "3.800"}, {"text": "c", "text_pair": "d", "label": 1}],
    )
    data = load_data(str(path), task="regression")
    assert data.examples == [ClassExample("a", "b", 3.8), ClassExample("c", "d", 1.0)]
    assert data.num_labels == 1 and data.label_names == ()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": "high"}])
    with pytest.raises(DataError, match="record 1 has target 'high', not a number"):
        load_data(str(bad), task="regression")


def test_the_task_is_inferred_where_the_data_is_unambiguous(tmp_path):
    scores = write_jsonl(tmp_path / "stsb.jsonl", [{"text": "a", "label": "5.000"}, {"text": "b", "label": "3"}])
    assert choose_task(None, str(scores), None) == ("regression", "the target column is numeric")
    assert choose_task(None, str(scores), "minilm-l6").task == "regression"  # a score is no class
    mnli = write_jsonl(
        tmp_path / "mnli.jsonl", [{"text": t, "label": t} for t in ("entailment", "neutral", "contradiction")]
    )
    assert choose_task(None, str(mnli), None) == ("seq-cls", "the target column 'label' holds 3 labels")
    ints = write_jsonl(tmp_path / "ints.jsonl", [{"text": "a", "target": 2}, {"text": "b", "target": 0}])
    assert choose_task(None, str(ints), None).task == "seq-cls"
    assert choose_task(None, str(ints), "smollm2-135m").task == "causal-lm"  # a built-in causal LM says otherwise
    texts = write_jsonl(
        tmp_path / "gen.jsonl", [{"prompt": "Say hi", "completion": "Hi"}, {"prompt": "2+2", "completion": 4}]
    )
    assert choose_task(None, str(texts), None).task == "causal-lm"
    assert choose_task("seq-cls", str(scores), None) == ("seq-cls", "given")
    assert choose_task(None, "sst2", "smollm2-135m").task == "seq-cls"  # the built-in data set's own


def test_regression_model_has_one_output_and_mse_loss(tmp_path):
    torch.manual_seed(0)
    model, tokenizer = load_model(str(save_tiny_bert(tmp_path / "bert")), "regression")
    assert (model.config.num_labels, model.config.problem_type) == (1, "regression")
    rows = [encode_classification(tokenizer, ClassExample(r["sentence"], None, r["score"])) for r in linear_rows(4, 0)]
    batch = Collator(tokenizer.pad_token_id)(rows)
    assert batch["labels"].dtype == torch.float32
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (4, 1)
    expected = ((out.logits[:, 0].double() - batch["labels"].double()) ** 2).mean()
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)


def test_a_tiny_encoder_learns_a_linear_task(tmp_path):
    torch.manual_seed(0)
    model, tokenizer = load_model(str(save_tiny_bert(tmp_path / "bert")), "regression")
    train = load_data(
        str(write_jsonl(tmp_path / "train.jsonl", linear_rows(192, 1))), task="regression", target_field="score"
    )
    test = load_data(
        str(write_jsonl(tmp_path / "test.jsonl", linear_rows(64, 2))), task="regression", target_field="score"
    )
    collate = Collator(tokenizer.pad_token_id)

    def predictions() -> list[float]:
        model.eval()
        with torch.no_grad():
            batch = collate([encode_classification(tokenizer, e) for e in test.examples])
            batch.pop("labels")
            return model(**batch).logits[:, 0].tolist()

    truth = [e.label for e in test.examples]
    before = pearsonr(predictions(), truth).statistic
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    features = [encode_classification(tokenizer, e) for e in train.examples]
    model.train()
    for _ in range(4):  # epochs
        for start in range(0, len(features), 16):
            loss = model(**collate(features[start : start + 16])).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    after = pearsonr(predictions(), truth).statistic
    assert after > 0.7 and after > before + 0.5, (before, after)
