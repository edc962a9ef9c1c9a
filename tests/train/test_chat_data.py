"""Chat data (`messages`): examples, the prompt generation sees, and the training mask token by token, against
the ChatML text written out by hand (the tiny tokenizer's template is SmolLM2's ChatML without its default
system turn)."""

import json

import pytest

from lorakit.train.data import DataError, Example, encode_causal, format_prompt, load_data
from support.files import tiny_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Is The Vaults a pub?"},
    {"role": "assistant", "content": "Yes."},
    {"role": "user", "content": "Near what?"},
    {"role": "assistant", "content": "Café Adriatic."},
]


def chatml(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def test_messages_rows_become_conversation_examples(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    data = load_data(str(path))
    assert data.task == "causal-lm"
    assert data.examples == [Example(tuple(CONVERSATION[:-1]), "Café Adriatic.", ["Café Adriatic."])]
    # What scoring feeds the model: the conversation up to the last assistant turn, and its header.
    expected = "".join(chatml(t["role"], t["content"]) for t in CONVERSATION[:-1]) + "<|im_start|>assistant\n"
    assert format_prompt(tiny_tokenizer(chat=True), data.examples[0].prompt) == expected


def test_loss_covers_each_assistant_turn_and_its_end_of_turn_token_only():
    tokenizer = tiny_tokenizer(chat=True)
    example = Example(tuple(CONVERSATION[:-1]), "Café Adriatic.", [])
    row = encode_causal(tokenizer, example)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    # The ChatML text in the pieces that are masked (False) and trained (True); the newline after
    # <|im_end|> belongs to the template, not to the turn.
    pieces = [
        (chatml("system", "Be brief.") + chatml("user", "Is The Vaults a pub?") + "<|im_start|>assistant\n", False),
        ("Yes.<|im_end|>", True),
        ("\n" + chatml("user", "Near what?") + "<|im_start|>assistant\n", False),
        ("Café Adriatic.<|im_end|>", True),
    ]
    expected_ids = [token for text, _ in pieces for token in ids(text)]
    expected_labels = [token if trained else -100 for text, trained in pieces for token in ids(text)]
    assert row["input_ids"] == expected_ids
    assert row["labels"] == expected_labels
    trained = [tokenizer.decode([t]) for t in row["labels"] if t != -100]
    assert trained.count("<|im_end|>") == 2 and tokenizer.eos_token == "<|im_end|>"  # generation stops there


def test_a_template_without_an_end_of_turn_token_gets_eos():
    tokenizer = tiny_tokenizer(chat=True)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    row = encode_causal(tokenizer, Example(({"role": "user", "content": "Hi"},), "Hello.", []))
    trained = [t for t in row["labels"] if t != -100]
    assert trained == tokenizer("Hello.", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("hello", "must be a non-empty list"),
        ([{"role": "user", "content": "Hi"}], "must end with an assistant turn"),
        ([{"role": "bot", "content": "Hi"}], "turn 1 has role 'bot'; roles are system, user, assistant"),
        ([{"role": "user"}], "turn 1 must be an object with a text 'content'"),
        ([{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hi"}], "needs a user turn"),
    ],
)
def test_bad_conversations_are_one_line_errors(tmp_path, messages, message):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DataError, match=message):
        load_data(str(path))


def test_chat_data_needs_a_chat_template():
    example = Example(tuple(CONVERSATION[:-1]), "Café Adriatic.", [])
    with pytest.raises(DataError, match="needs a tokenizer with a chat template"):
        encode_causal(tiny_tokenizer(), example)


def test_a_template_that_refuses_a_conversation_is_a_data_error():
    tokenizer = tiny_tokenizer(chat=True)
    tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(DataError, match="the chat template refused a conversation: Conversation roles must alternate"):
        encode_causal(tokenizer, Example(({"role": "user", "content": "Hi"},), "Hello.", []))
