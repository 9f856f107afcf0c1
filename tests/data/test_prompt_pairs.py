"""Prompt sets: typed prompts, the induction and IOI presets, their corruptions, bad input."""

import pytest
import torch

from headvis_core.ablation.metrics import AnswerMetrics
from headvis_core.ablation.runner import AblationRunner
from headvis_core.ablation.values import zero_ablation
from headvis_core.data.prompt_pairs import (
    induction_prompt_pairs,
    induction_prompts,
    ioi_prompts,
    pairs_from_tokens,
    prompts_from_texts,
)
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef

TEXTS = ["hello world, hello", "jello world, jello"]  # same byte length


def test_bad_prompts_give_clear_errors(tiny_llama):
    model = tiny_llama.model
    with pytest.raises(InputError, match="empty"):
        prompts_from_texts(model, ["   "])
    with pytest.raises(InputError, match="Prompt 2"):
        prompts_from_texts(model, ["fine", ""])
    with pytest.raises(InputError, match="No prompts"):
        prompts_from_texts(model, [])
    with pytest.raises(InputError, match="tokenizes into 2 tokens"):
        prompts_from_texts(model, ["fine"], targets=["ab"])
    with pytest.raises(InputError, match="every prompt"):
        prompts_from_texts(model, TEXTS, targets=["a", None])
    runner = AblationRunner(model, prompts_from_texts(model, ["fine"]), zero_ablation(model))
    with pytest.raises(InputError, match="out of range"):
        runner.evaluate([(HeadRef(5, 0),)], AnswerMetrics())


def test_induction_prompts_score_the_second_copy(tiny_gpt2):
    model = tiny_gpt2.model
    prompts = induction_prompts(model, n_seqs=3, half_len=5, seed=1)
    assert len(prompts) == 3 and prompts.label_ids is not None
    for tokens, positions, labels in zip(prompts.tokens, prompts.answer_positions, prompts.label_ids):
        assert tokens.shape[-1] == 11 and tokens[0] == 256  # BOS, then 5 + 5 tokens
        assert torch.equal(tokens[1:6], tokens[6:])
        assert positions == (6, 7, 8, 9)
        assert list(labels) == tokens[7:11].tolist()  # the next token at each answer position
        assert 256 not in tokens[1:].tolist()


def test_ioi_prompts_skip_multi_token_names_and_align_with_their_corruptions(smollm2):
    template = "When {IO} and {S} went to the {PLACE}, {S} gave a {OBJECT} to"
    prompts = ioi_prompts(smollm2.model, 6, seed=3, template=template)
    assert len(prompts) == 6 and len(set(prompts.lengths)) == 1
    assert [t.shape for t in prompts.corrupted_tokens] == [t.shape for t in prompts.tokens]
    assert isinstance(prompts.skipped_names, tuple)
    for text, target, alternative in zip(prompts.texts, prompts.target_ids, prompts.alternative_ids):
        io, s = smollm2.model.to_single_str_token(target), smollm2.model.to_single_str_token(alternative)
        assert text.count(s.strip()) == 2 and text.count(io.strip()) == 1


def test_ioi_preset_on_a_byte_level_model_explains_the_names(tiny_llama):
    with pytest.raises(InputError, match="single tokens"):
        ioi_prompts(tiny_llama.model, 4)


def test_induction_pairs_contrast_a_fresh_first_half(tiny_gpt2):
    model = tiny_gpt2.model
    pairs = induction_prompt_pairs(model, 3, half_len=5, seed=1)
    plain = induction_prompts(model, 3, half_len=5, seed=1)
    padded = pairs.padded()
    assert torch.equal(padded.clean, torch.stack(plain.tokens))  # the same sequences, scored the same way
    assert pairs.answer_positions == plain.answer_positions and pairs.label_ids == plain.label_ids
    for clean, corrupted, answer, alternative in zip(pairs.tokens, pairs.corrupted_tokens, pairs.target_ids,
                                                     pairs.alternative_ids):
        assert corrupted[0] == clean[0] == 256 and torch.equal(corrupted[6:], clean[6:])  # BOS and second copy
        assert not torch.equal(corrupted[1:6], clean[1:6])  # a fresh first half: nothing to copy
        assert (answer, alternative) == (int(clean[5]), int(corrupted[5]))  # r_n against s_n
    assert padded.last.tolist() == [9, 9, 9]  # the last answer position predicts r_n


def test_padded_pairs_pad_on_the_right_and_need_corrupted_twins(tiny_gpt2):
    short, long = torch.tensor([5, 6, 7]), torch.tensor([1, 2, 3, 4, 8])
    pairs = pairs_from_tokens([short, long], [short + 1, long + 1], answer=[9, 10], alternative=[11, 12])
    padded = pairs.padded()
    assert padded.clean.tolist() == [[5, 6, 7, 7, 7], [1, 2, 3, 4, 8]]  # padded with the first prompt's last token
    assert padded.corrupted.tolist() == [[6, 7, 8, 7, 7], [2, 3, 4, 5, 9]]
    assert padded.last.tolist() == [2, 4] and padded.answer.tolist() == [9, 10]
    assert padded.alternative.tolist() == [11, 12]
    with pytest.raises(InputError, match="corrupted prompt, an answer and an alternative"):
        prompts_from_texts(tiny_gpt2.model, ["hello"]).padded()
