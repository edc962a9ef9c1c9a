"""Decoding options of `generate_texts` (and so of scoring and `lorakit generate`): width 1 is greedy decoding,
checked against a step-by-step argmax loop; beam search and no-repeat n-grams reach transformers' `generate`
as its own arguments do; beam search works with the methods that change the attention or the input."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.generate import Decoding, generate_texts
from lorakit.methods import MethodOptions, get_method

PROMPTS = ["name[The Vaults], eatType[pub]", "Describe this restaurant"]
NEW_TOKENS = 8


@pytest.fixture
def tiny(chat_llama_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(chat_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(chat_llama_dir)
    tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


@torch.no_grad()
def greedy_by_hand(model, tokenizer, prompt: str) -> str:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    new: list[int] = []
    for _ in range(NEW_TOKENS):
        token = int(model(torch.cat([ids, torch.tensor([new], dtype=torch.long)], dim=1)).logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_beam_width_one_is_greedy_decoding(tiny):
    model, tokenizer = tiny
    texts = generate_texts(model, tokenizer, PROMPTS, NEW_TOKENS, batch_size=1, decoding=Decoding(num_beams=1))
    assert texts == [greedy_by_hand(model, tokenizer, p) for p in PROMPTS]


def direct_generate(model, tokenizer, prompt: str, new_tokens: int = NEW_TOKENS, **options) -> torch.Tensor:
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(
        **enc,
        max_new_tokens=new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **options,
    )
    return out[0, enc.input_ids.shape[1] :]


def test_beam_search_is_transformers_beam_search_with_the_same_options(tiny):
    model, tokenizer = tiny
    decoding = Decoding(num_beams=4, length_penalty=0.9, no_repeat_ngram_size=3)
    texts = generate_texts(model, tokenizer, PROMPTS, NEW_TOKENS, batch_size=1, decoding=decoding)
    options = dict(num_beams=4, length_penalty=0.9, no_repeat_ngram_size=3, do_sample=False)
    expected = [
        tokenizer.decode(direct_generate(model, tokenizer, p, **options), skip_special_tokens=True) for p in PROMPTS
    ]
    assert texts == [e.strip() for e in expected]
    assert texts != generate_texts(model, tokenizer, PROMPTS, NEW_TOKENS, batch_size=1)  # not greedy's


def repeated_bigrams(ids: list[int]) -> int:
    bigrams = list(zip(ids, ids[1:]))
    return len(bigrams) - len(set(bigrams))


def test_no_repeat_ngram_size_is_honoured(tiny):
    model, tokenizer = tiny
    prompt = PROMPTS[1]
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    plain = direct_generate(model, tokenizer, prompt, 24, **Decoding().generate_options()).tolist()
    assert repeated_bigrams(prompt_ids + plain) > 0  # a random model repeats itself
    for decoding in (Decoding(no_repeat_ngram_size=2), Decoding(num_beams=3, no_repeat_ngram_size=2)):
        assert (
            repeated_bigrams(
                prompt_ids + direct_generate(model, tokenizer, prompt, 24, **decoding.generate_options()).tolist()
            )
            == 0
        )


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_beam_search_through_a_method_gives_each_row_what_it_gives_alone(tiny, method):
    model, tokenizer = tiny
    get_method(method).apply(model, MethodOptions(prefix_length=3, prompt_length=3))
    decoding = Decoding(num_beams=3, no_repeat_ngram_size=4)
    batched = generate_texts(model, tokenizer, PROMPTS, NEW_TOKENS, batch_size=2, decoding=decoding)
    assert batched == [generate_texts(model, tokenizer, [p], NEW_TOKENS, decoding=decoding)[0] for p in PROMPTS]
    assert all(batched)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"num_beams": 0}, "num_beams must be at least 1"), ({"no_repeat_ngram_size": -1}, "0 \\(off\\) or more")],
)
def test_bad_decoding_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        Decoding(**options)
