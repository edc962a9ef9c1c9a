"""Tiny offline stand-ins for pretrained tokenizers and models, built in a fraction of a second."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# E2E-style meaning representations and their texts: a data set small models learn in a few steps.
E2E_PAIRS = [
    ("name[The Vaults], eatType[pub]", "The Vaults is a pub."),
    ("name[Café Adriatic], near[The Vaults]", "Café Adriatic is near The Vaults."),
    ("name[The Vaults], priceRange[more than £30]", "The Vaults costs more than £30."),
    ("name[Blue Spice], eatType[pub]", "Blue Spice is a pub."),
] * 6


def write_pairs(path: Path, pairs: list[tuple[str, str]], input_key: str = "mr", target_key: str = "text") -> Path:
    """(input, target) pairs as a JSONL file with one object per pair under the given keys."""
    path.write_text("".join(json.dumps({input_key: a, target_key: b}) + "\n" for a, b in pairs))
    return path


CORPUS = [
    "The Vaults is a pub near Café Adriatic with a 5 out of 5 rating.",
    "name[The Vaults], eatType[pub], priceRange[more than £30], near[Café Adriatic]",
    "Describe this restaurant in one or two sentences.",
    "it 's a charming and often affecting journey .",
]

# A ChatML template like SmolLM2's, without the default system turn.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(chat: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (so any text decodes back exactly) with BOS and EOS but no pad token.
    chat=True gives it a ChatML template whose end-of-turn token is the EOS token."""
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    if chat:
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=CHATML
        )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def save_tiny_llama(path: Path, chat: bool = False) -> Path:
    """A 2-layer, hidden-16 Llama causal LM and its tokenizer saved in path."""
    tokenizer = tiny_tokenizer(chat)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_bert(path: Path) -> Path:
    """A 2-layer, hidden-16 BERT encoder without a task head (like MiniLM) and a tokenizer saved in path."""
    tokenizer = tiny_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def random_token_rows(n: int = 12, vocab: int = 32) -> list[dict]:
    """n tokenized causal-LM rows of 4-6 random tokens (seeded), the first position unlabelled."""
    import torch

    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        ids = torch.randint(1, vocab, (4 + i % 3,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] + ids[1:]})
    return rows


def interrupting_collator(pad_token_id: int, at_call: int):
    """A lorakit Collator that raises KeyboardInterrupt on its at_call-th call, as Ctrl-C would."""
    from lorakit.train.data import Collator

    class Interrupting(Collator):
        calls = 0

        def __call__(self, batch):
            self.calls += 1
            if self.calls == at_call:
                raise KeyboardInterrupt
            return super().__call__(batch)

    return Interrupting(pad_token_id)
