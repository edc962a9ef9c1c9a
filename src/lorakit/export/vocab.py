"""The tokenizer inside a GGUF file: a byte-level BPE vocabulary (llama.cpp's `gpt2` tokenizer model) with its
merges, token types, special token ids, BOS/EOS flags, pre-tokenizer name and chat template, read from a
transformers fast tokenizer.

llama.cpp picks its pre-tokenizer (how text is split before the merges) by name, so the name is chosen from
the tokenizer's own pre-tokenizer; one this module does not recognise is refused rather than guessed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import gguf

from .names import ExportError

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class GgufVocab:
    """What llama.cpp's tokenizer keys hold, in id order."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # bos / eos / unk / pad → id, those the tokenizer has
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def gguf_vocab(tokenizer: Any, vocab_size: int) -> GgufVocab:
    """The GGUF tokenizer of a transformers fast tokenizer, padded to the model's `vocab_size` rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizers-backed) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or spec.get("normalizer") is not None:
        raise ExportError(
            f"GGUF export writes byte-level BPE tokenizers; this one is {model.get('type')!r}"
            + (" with a normalizer" if spec.get("normalizer") is not None else "")
        )
    ids = tokenizer.get_vocab()
    if max(ids.values()) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(ids.values())}, the model only {vocab_size} embeddings")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # rows no token uses, as llama.cpp's converter names them
    token_types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in ids.items():
        tokens[index], token_types[index] = token, gguf.TokenType.NORMAL
    for index, added in tokenizer.added_tokens_decoder.items():
        token_types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    probe = tokenizer.encode("a")
    special = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    template = tokenizer.chat_template
    return GgufVocab(
        pre=_pre_tokenizer_name(spec.get("pre_tokenizer")),
        tokens=tokens,
        token_types=[int(t) for t in token_types],
        merges=[m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])],
        special_ids={name: index for name, index in special.items() if index is not None},
        add_bos=bool(probe) and probe[0] == tokenizer.bos_token_id,
        add_eos=bool(probe) and probe[-1] == tokenizer.eos_token_id,
        chat_template=template if isinstance(template, str) else None,
    )


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for the way this byte-level tokenizer splits text."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"  # GPT-2's split pattern
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # single digits, then GPT-2's pattern
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT:
        return "llama-bpe"
    raise ExportError(f"GGUF export does not know llama.cpp's name for this pre-tokenizer: {json.dumps(pre)}")


def write_vocab(writer: gguf.GGUFWriter, vocab: GgufVocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for name, index in vocab.special_ids.items():
        getattr(writer, f"add_{name}_token_id")(index)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)
