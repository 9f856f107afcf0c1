import pytest

from headvis_core.data.ioi import generate_ioi
from headvis_core.data.prompt_pairs import ioi_prompts
from headvis_core.errors import InputError


def test_ioi_prompts_align_and_corrupt_only_the_second_subject(smollm2):
    model = smollm2.model
    dataset = generate_ioi(model, 12, seed=1)
    assert len(dataset.prompts) == 12
    for prompt in dataset.prompts:
        assert len({prompt.io, prompt.s, prompt.c}) == 3
        assert prompt.clean.count(prompt.s.strip()) == 2 and prompt.clean.count(prompt.io.strip()) == 1
        assert prompt.corrupted.count(prompt.s.strip()) == 1 and prompt.corrupted.count(prompt.c.strip()) == 1
        assert model.to_tokens(prompt.clean).shape == model.to_tokens(prompt.corrupted).shape
    prompts = ioi_prompts(model, 12, seed=1)  # the same prompts, tokenized with their answer ids
    assert prompts.texts == dataset.clean_texts
    assert [model.to_single_str_token(i) for i in prompts.target_ids] == [p.io for p in dataset.prompts]
    assert [model.to_single_str_token(i) for i in prompts.alternative_ids] == [p.s for p in dataset.prompts]


def test_ioi_is_reproducible(smollm2):
    assert generate_ioi(smollm2.model, 5, seed=3) == generate_ioi(smollm2.model, 5, seed=3)


def test_names_that_are_not_single_tokens_are_skipped(tiny_gpt2):
    with pytest.raises(InputError, match="single tokens"):
        generate_ioi(tiny_gpt2.model, 4)  # the byte tokenizer splits every name
