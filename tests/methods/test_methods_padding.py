"""Prefix and prompt tuning under padding and in generation: a padded batch gives every row what the row gives
alone (left and right padding for Llama, left for GPT-2; BERT is right-padded, its pooler reads position 0),
`generate` with a left-padded batch equals greedy decoding written out with full forward passes of each row
alone, and the causal-LM loss with a soft prompt covers exactly the caller's target tokens (the plain and the
fused loss)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit.methods import MethodOptions, apply_method
from lorakit.train.loss import causal_lm_loss
from support.models import VOCAB, randomize_trainable

OPTIONS = MethodOptions(prefix_length=3, prompt_length=4, adapter_size=4)
PAD = 2
ROWS = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (6, 3, 5)]


def padded(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in ROWS)
    ids = torch.full((len(ROWS), width), PAD)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(ROWS):
        cols = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, cols], mask[i, cols] = row, 1
    return ids, mask


def tuned(base_copy, key: str, method: str):
    model = base_copy(key)
    torch.manual_seed(0)
    apply_method(model, method, OPTIONS)
    randomize_trainable(model, std=0.5)
    return model


@pytest.mark.parametrize("key, side", [("llama", "left"), ("llama", "right"), ("bert", "right"), ("gpt2", "left")])
@pytest.mark.parametrize("method", ["prefix", "prompt"])
@torch.no_grad()
def test_a_padded_batch_gives_each_row_what_it_gives_alone(base_copy, key, side, method):
    model = tuned(base_copy, key, method)
    ids, mask = padded(side)
    batch = model(input_ids=ids, attention_mask=mask).logits
    for i, row in enumerate(ROWS):
        alone = model(input_ids=row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long)).logits[0]
        got = batch[i] if key == "bert" else batch[i][mask[i].bool()]
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@torch.no_grad()
def test_generate_equals_greedy_decoding_of_each_row_alone(base_copy, method):
    model = tuned(base_copy, "llama", method).eval()
    ids, mask = padded("left")
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None
    )
    for i, row in enumerate(ROWS):
        sequence = row[None]
        for _ in range(6):  # no cache: the whole sequence through the model at every step
            logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert out[i, ids.shape[1] :].tolist() == sequence[0, len(row) :].tolist()


def test_prompt_loss_covers_the_callers_target_tokens_only(base_copy):
    model = tuned(base_copy, "llama", "prompt")
    ids, mask = padded("right")
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # an unlabelled "prompt" part, as lorakit's data has
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (*ids.shape, VOCAB)  # the soft prompt's positions are not in the output
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    # The training loop's fused loss (backbone + chunked head) sees the same tokens.
    torch.testing.assert_close(
        causal_lm_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels}),
        expected,
        rtol=1e-5,
        atol=1e-6,
    )
