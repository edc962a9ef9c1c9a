"""Chat data: rows holding `messages` (a list of {"role", "content"} turns, roles system, user and
assistant, as the OpenAI and Hugging Face chat conventions write them), read as generation examples, and
their tokenization with the tokenizer's chat template.

The loss covers every assistant turn and nothing else: each assistant turn's text as the template writes it
(the content and the template's end-of-turn token, which the model must learn so that generation stops),
with every other token (system and user turns, role headers, the whitespace between turns) masked. Scoring
asks for the last assistant turn: the prompt is the conversation before it, the reference is its content.

The template renders the conversation one prefix at a time; the parts between prefixes are tokenized
separately, so that the last prompt is tokenized as generation tokenizes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from .examples import IGNORE_INDEX, Conversation, DataError, Example

MESSAGES_FIELD = "messages"
ROLES = ("system", "user", "assistant")


def conversation_example(messages: Any, where: str) -> Example:
    """The example of one row's `messages`: the conversation before its last turn, which must be the
    assistant's, as the prompt; that turn's content as the target and reference."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{MESSAGES_FIELD}' must be a non-empty list of {{role, content}} turns")
    turns = []
    for number, turn in enumerate(messages, 1):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("content"), str):
            raise DataError(f"{where}: turn {number} must be an object with a text 'content'")
        if turn.get("role") not in ROLES:
            raise DataError(f"{where}: turn {number} has role {turn.get('role')!r}; roles are {', '.join(ROLES)}")
        turns.append({"role": str(turn["role"]), "content": turn["content"]})
    if turns[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant turn (the one to learn)")
    if not any(turn["role"] == "user" for turn in turns[:-1]):
        raise DataError(f"{where}: the conversation needs a user turn before its last assistant turn")
    answer = turns[-1]["content"]
    return Example(tuple(turns[:-1]), answer, [answer])


def render(tokenizer: PreTrainedTokenizerBase, turns: Sequence[Mapping[str, str]], generation_prompt: bool) -> str:
    """The conversation as the tokenizer's chat template writes it (special tokens as text); with
    generation_prompt, followed by the header of the assistant turn to come."""
    if not tokenizer.chat_template:
        name = tokenizer.name_or_path or type(tokenizer).__name__
        raise DataError(f"chat data ('{MESSAGES_FIELD}') needs a tokenizer with a chat template; {name} has none")
    messages = [dict(turn) for turn in turns]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as err:  # e.g. "Conversation roles must alternate user/assistant/user/assistant/..."
        raise DataError(f"the chat template refused a conversation: {err}") from None
    return str(text)


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, prompt: Conversation, answer: str
) -> tuple[list[int], list[int], list[int]]:
    """A conversation whose last turn (answer) is the assistant's, tokenized for training: the prompt's ids,
    its labels (its assistant turns labelled, the rest masked), and the target's ids (the last assistant
    turn, its end-of-turn token included)."""
    turns = [*prompt, {"role": "assistant", "content": answer}]
    pieces: list[tuple[list[int], list[int]]] = []  # (masked, trained) tokens up to each assistant turn's end
    written = 0  # characters of the template text tokenized so far
    for index in [i for i, turn in enumerate(turns) if turn["role"] == "assistant"]:
        before = render(tokenizer, turns[:index], generation_prompt=True)
        with_turn = render(tokenizer, turns[: index + 1], generation_prompt=False)
        if not (with_turn.startswith(before) and before.startswith(with_turn[:written])):
            raise DataError(
                "the tokenizer's chat template does not write a conversation one turn after another, "
                "so its assistant turns cannot be told apart"
            )
        # The turn ends where the template's text for it ends: its end-of-turn token, not the newline after it.
        trained_text = with_turn[len(before) :].rstrip()
        trained = _tokens(tokenizer, trained_text) + _end_of_turn(tokenizer, trained_text)
        pieces.append((_tokens(tokenizer, before[written:]), trained))
        written = len(before) + len(trained_text)
    *earlier, (last_masked, target_ids) = pieces
    ids = [token for masked, trained in earlier for token in masked + trained] + last_masked
    labels = [label for masked, trained in earlier for label in [IGNORE_INDEX] * len(masked) + trained] + [
        IGNORE_INDEX
    ] * len(last_masked)
    return ids, labels, target_ids


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


def _end_of_turn(tokenizer: PreTrainedTokenizerBase, turn_text: str) -> list[int]:
    """[EOS] when the template ends an assistant turn with no special token of its own (else generation could
    not stop), otherwise nothing."""
    ends_with_special = any(turn_text.endswith(token) for token in tokenizer.all_special_tokens)
    if ends_with_special:
        return []
    if tokenizer.eos_token_id is None:
        raise DataError("the chat template ends assistant turns with no special token, and the tokenizer has no EOS")
    return [tokenizer.eos_token_id]
