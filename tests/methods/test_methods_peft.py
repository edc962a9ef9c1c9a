"""Prefix and prompt tuning against PEFT 0.21.2 where the parametrisations map one to one: PEFT's prefix
embedding holds, per virtual token, every layer's key then value (heads × head_dim each); its prompt embedding
is our soft prompt. PEFT numbers the tokens after a prefix from P (the prefix fills positions 0..P-1 of its
cache), lorakit from 0: given position ids P, P+1, ... lorakit computes PEFT's outputs. PEFT returns the prompt's
positions in a causal LM's logits, lorakit cuts them off. (PEFT's prefix tuning does not run on BERT under
transformers 5, which has no cache for encoders.)"""

from __future__ import annotations

import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

from lorakit.methods import MethodOptions, apply_method
from support.models import VOCAB, make_bert, make_llama, randomize_trainable

P = 3


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    return ids, mask


@torch.no_grad()
def test_prefix_tuning_matches_peft_on_llama():
    ours = make_llama()
    apply_method(ours, "prefix", MethodOptions(prefix_length=P))
    randomize_trainable(ours, std=0.5)
    peft = get_peft_model(make_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)).eval()
    config = peft.peft_config["default"]
    weight = peft.prompt_encoder["default"].embedding.weight
    table = weight.view(P, config.num_layers * 2, config.num_attention_heads, -1)
    for index, layer in enumerate(ours.model.layers):
        prefix = layer.self_attn.lorakit_prefix  # (heads, P, head_dim)
        table[:, 2 * index] = prefix.key.transpose(0, 1)
        table[:, 2 * index + 1] = prefix.value.transpose(0, 1)
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    expected = peft(input_ids=ids, attention_mask=mask, labels=labels)
    got = ours(input_ids=ids, attention_mask=mask, labels=labels, position_ids=torch.arange(P, P + 7).expand(2, 7))
    real = mask.bool()
    torch.testing.assert_close(got.logits[real], expected.logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make, task", [(make_llama, "CAUSAL_LM"), (make_bert, "SEQ_CLS")])
@torch.no_grad()
def test_prompt_tuning_matches_peft(make, task):
    ours = make()
    apply_method(ours, "prompt", MethodOptions(prompt_length=P))
    randomize_trainable(ours, std=0.5)
    peft = get_peft_model(make(), PromptTuningConfig(task_type=task, num_virtual_tokens=P)).eval()
    peft.prompt_encoder["default"].embedding.weight.copy_(ours.lorakit_prompt.embeddings)
    if task == "SEQ_CLS":  # the same trained head on both sides
        peft.base_model.classifier.modules_to_save["default"].load_state_dict(ours.classifier.state_dict())
    ids, mask = batch()
    if task == "CAUSAL_LM":
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, 0] = -100  # PEFT also scores the first token, from the prompt's last position; lorakit does not
    else:
        labels = torch.tensor([0, 2])
    expected = peft(input_ids=ids, attention_mask=mask, labels=labels)
    got = ours(input_ids=ids, attention_mask=mask, labels=labels)
    if task == "CAUSAL_LM":
        real = mask.bool()
        torch.testing.assert_close(got.logits[real], expected.logits[:, P:][real], rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
