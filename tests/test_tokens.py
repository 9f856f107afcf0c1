import pytest

from headvis_core.errors import InputError
from headvis_core.tokens import single_token_id, token_labels, tokenize_prompt, visible


def test_empty_prompt_is_refused(tiny_gpt2):
    for text in ["", "   \n"]:
        with pytest.raises(InputError, match="empty"):
            tokenize_prompt(tiny_gpt2.model, text)


def test_too_long_prompt_is_refused_or_truncated(tiny_gpt2):
    text = "x" * 300  # one token per byte, context 256
    with pytest.raises(InputError, match="301 tokens"):
        tokenize_prompt(tiny_gpt2.model, text)
    cut = tokenize_prompt(tiny_gpt2.model, text, truncate=True)
    assert cut.n_tokens == 256 and cut.truncated_from == 301


def test_prompt_with_bos(tiny_gpt2):
    prompt = tokenize_prompt(tiny_gpt2.model, "ab")
    assert prompt.tokens.shape == (1, 3) and prompt.tokens[0, 0].item() == 256
    assert prompt.str_tokens == ["<|endoftext|>", "a", "b"] and prompt.truncated_from is None


def test_single_token_names_how_it_tokenizes(smollm2):
    model = smollm2.model
    assert single_token_id(model, " Mary") == model.to_single_token(" Mary")
    with pytest.raises(InputError) as err:
        single_token_id(model, " Maryland Bridge")
    assert "tokens" in str(err.value) and "Bridge" in str(err.value)
    with pytest.raises(InputError, match="leading space"):
        single_token_id(model, "Marylandish")


def test_labels_make_whitespace_visible_and_repeats_distinct():
    labels = token_labels([" the", "\n", " the"])
    assert labels == ["0:\u00b7the", "1:\u21b5", "2:\u00b7the"]
    assert len(set(labels)) == 3
    assert visible("a\tb") == "a\u21e5b"
