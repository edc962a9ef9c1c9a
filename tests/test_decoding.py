"""Decoding options of `generate_texts` (and so of scoring and `lorakit generate`): width 1 is greedy decoding,
checked against a step-by-step argmax loop; beam search reaches transformers' `generate` as its own arguments
do; the no-repeat n-gram ban looks at the generated tokens only (checked on hand-written ids and on outputs);
beam search works with the methods that change the attention or the input."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.generate import Decoding, OutputNoRepeatNGram, generate_texts
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
    decoding = Decoding(num_beams=4, length_penalty=0.9)
    texts = generate_texts(model, tokenizer, PROMPTS, NEW_TOKENS, batch_size=1, decoding=decoding)
    options = dict(num_beams=4, length_penalty=0.9, do_sample=False)
    expected = [
        tokenizer.decode(direct_generate(model, tokenizer, p, **options), skip_special_tokens=True) for p in PROMPTS
    ]
    assert texts == [e.strip() for e in expected]
    assert texts != generate_texts(model, tokenizer, PROMPTS, NEW_TOKENS, batch_size=1)  # not greedy's


def repeated_ngrams(ids: list[int], n: int) -> int:
    ngrams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(ngrams) - len(set(ngrams))


def banned(prompt: list[int], generated: list[int], n: int, vocab: int = 10) -> set[int]:
    """The tokens `OutputNoRepeatNGram` bans after one row of `prompt` + `generated`."""
    ids = torch.tensor([prompt + generated])
    scores = OutputNoRepeatNGram(n, len(prompt))(ids, torch.zeros(1, vocab))
    return set(torch.nonzero(scores[0] == float("-inf")).flatten().tolist())


def test_the_ngram_ban_looks_at_the_output_only():
    # "5 out of 5": the output may copy a 4-gram of the prompt (transformers' own ban would refuse 5 here) ...
    assert banned([5, 1, 2, 5, 9], [7, 5, 1, 2], 4) == set()
    # ... but never repeat one of its own (1 2 3 4 seen, 1 2 3 again: 4 banned), or trigrams with n = 3.
    assert banned([9, 9], [1, 2, 3, 4, 7, 1, 2, 3], 4) == {4}
    assert banned([9, 9], [1, 2, 3, 1, 2, 6, 1, 2], 3) == {3, 6}
    assert banned([1, 2, 3], [1, 2], 3) == set()  # too few generated tokens for a complete 3-gram


def test_no_repeat_ngram_size_is_honoured_in_the_output(tiny):
    model, tokenizer = tiny
    prompt = PROMPTS[1]
    length = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    plain = direct_generate(model, tokenizer, prompt, 24, **Decoding().generate_options(length)).tolist()
    assert repeated_ngrams(plain, 2) > 0  # a random model repeats itself
    for decoding in (Decoding(no_repeat_ngram_size=2), Decoding(num_beams=3, no_repeat_ngram_size=2)):
        output = direct_generate(model, tokenizer, prompt, 24, **decoding.generate_options(length)).tolist()
        assert len(output) == 24 and repeated_ngrams(output, 2) == 0


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
