"""Targeted search: greedy choices checked against brute force, pruning checked for minimality."""

import pytest
import torch

from headvis_core import hooks
from headvis_core.ablation.metrics import margin_over_rest
from headvis_core.ablation.targeted import TargetedResult, targeted_search
from headvis_core.data.prompt_pairs import prompts_from_texts
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef, all_heads
from headvis_core.models.loader import load_random_model
from headvis_core.models.random_models import RandomModelSpec
from headvis_core.viz.ablation import trajectory_figure
from tests.reference import ablated_logits

IOI = "When Mary and John went to the store, John gave a drink to"


def _zero_heads_logits(model, tokens, heads):
    """The slow reference: one forward with ``heads`` zeroed at hook_z, logits at the last position."""
    return ablated_logits(model, tokens, heads)[0, -1]


@pytest.fixture(scope="module")
def wide_model():
    # Enough heads (3 x 6) for non-trivial sets, still milliseconds per pass.
    return load_random_model(RandomModelSpec(arch="llama", n_layers=3, n_heads=6, n_kv_heads=2, d_model=96,
                                             n_ctx=128, d_vocab=257, seed=7))


def _second_choice(model, tokens):
    logits = hooks.forward(model, tokens)[0, -1]
    return int(logits.topk(2).indices[1]), logits


def test_search_result_checked_against_independent_forward_passes(wide_model):
    model = wide_model.model
    prompts = prompts_from_texts(model, ["the cat sat on the"])
    tokens = prompts.tokens[0][None]
    alternative, clean = _second_choice(model, tokens)
    result = targeted_search(model, prompts, alternative, budget=18)
    heads = all_heads(3, 6)
    # Step 1 is the brute-force best single head.
    margins = {h: float(margin_over_rest(_zero_heads_logits(model, tokens, [h]), torch.tensor(alternative)))
               for h in heads}
    assert result.greedy_heads[0] == max(margins, key=margins.get)
    assert result.trajectory["step"].tolist() == list(range(len(result.trajectory)))
    assert result.trajectory["margin"].iloc[0] == pytest.approx(
        float(margin_over_rest(clean, torch.tensor(alternative))), abs=1e-4)
    # This model and prompt need several heads (4 of the 18) to flip to the second choice.
    assert result.found, result.summary
    assert len(result.heads) > 1
    final = _zero_heads_logits(model, tokens, result.heads)
    assert int(final.argmax()) == alternative
    # Pruned: removing any one head loses the flip.
    for drop in result.heads:
        rest = [h for h in result.heads if h != drop]
        assert int(_zero_heads_logits(model, tokens, rest).argmax()) != alternative
    assert set(result.heads) <= set(result.greedy_heads)
    assert result.final_shift["token"].iloc[0] == model.to_single_str_token(alternative)
    # Each greedy step raised the margin.
    added = result.trajectory[result.trajectory["action"] != "prune"]["margin"].tolist()
    assert added == sorted(added)


def test_pruning_drops_a_head_the_later_ones_made_unneeded(wide_model):
    model = wide_model.model
    prompts = prompts_from_texts(model, ["to be or not to"])
    tokens = prompts.tokens[0][None]
    alternative = int(hooks.forward(model, tokens)[0, -1].topk(5).indices[4])  # a case found by searching
    result = targeted_search(model, prompts, alternative, budget=18)
    assert result.found and len(result.heads) < len(result.greedy_heads)
    pruned = result.trajectory[result.trajectory["action"] == "prune"]
    assert set(pruned["head"]) == {str(h) for h in set(result.greedy_heads) - set(result.heads)}
    assert int(_zero_heads_logits(model, tokens, result.heads).argmax()) == alternative
    for drop in result.heads:
        rest = [h for h in result.heads if h != drop]
        assert int(_zero_heads_logits(model, tokens, rest).argmax()) != alternative
    unpruned = targeted_search(model, prompts, alternative, budget=18, prune=False)
    assert unpruned.heads == result.greedy_heads


def test_the_greedy_trajectory_matches_brute_force_margins(wide_model):
    model = wide_model.model
    prompts = prompts_from_texts(model, ["hello there, general"])
    tokens = prompts.tokens[0][None]
    alternative, _ = _second_choice(model, tokens)
    result = targeted_search(model, prompts, alternative, budget=3, prune=False)
    rows = result.trajectory[result.trajectory["action"] == "add"]
    for n, row in enumerate(rows.itertuples(), start=1):
        logits = _zero_heads_logits(model, tokens, result.greedy_heads[:n])
        assert row.margin == pytest.approx(float(margin_over_rest(logits, torch.tensor(alternative))), abs=1e-4)
        assert row.alternative_prob == pytest.approx(float(logits.softmax(-1)[alternative]), abs=1e-5)


def test_no_set_within_the_budget_is_a_valid_answer(wide_model):
    model = wide_model.model
    prompts = prompts_from_texts(model, ["the cat sat on the"])
    logits = hooks.forward(model, prompts.tokens[0][None])[0, -1]
    unlikely = int(logits.argmin())
    result = targeted_search(model, prompts, unlikely, budget=1)
    assert not result.found and len(result.heads) <= 1
    assert "budget" in result.reason or "no remaining head" in result.reason
    assert "No set of at most 1 heads" in result.summary


def test_an_alternative_already_on_top_needs_no_heads(tiny_gpt2):
    model = tiny_gpt2.model
    prompts = prompts_from_texts(model, [IOI])
    top = int(hooks.forward(model, prompts.tokens[0][None])[0, -1].argmax())
    result = targeted_search(model, prompts, top, budget=2)
    assert result.found and result.heads == [] and result.passes == 0


def test_bad_budget_and_alternative(tiny_llama):
    model = tiny_llama.model
    prompts = prompts_from_texts(model, [IOI])
    with pytest.raises(InputError, match="budget"):
        targeted_search(model, prompts, "a", budget=0)
    with pytest.raises(InputError, match=r"tokenizes into 2 tokens"):
        targeted_search(model, prompts, "ab")
    with pytest.raises(InputError, match="alternative token"):
        targeted_search(model, prompts, None)
    with pytest.raises(InputError, match="out of range"):
        targeted_search(model, prompts, "a", candidates="9.9")


def test_prompt_set_search_uses_each_prompts_alternative_and_round_trips(tiny_llama):
    model = tiny_llama.model
    prompts = prompts_from_texts(model, ["abc abc ab", "xyz xyz xy"], targets=["c", "z"], alternatives=["a", "x"])
    result = targeted_search(model, prompts, None, budget=8)
    assert result.alternative_ids == prompts.alternative_ids and result.n_prompts == 2
    again = TargetedResult.from_dict(result.to_dict())
    assert again.heads == result.heads and again.found == result.found
    assert again.trajectory.equals(result.trajectory)
    assert len(trajectory_figure(result).data) == 2


def test_smollm2_flips_mary_to_john(smollm2):
    model = smollm2.model
    prompts = prompts_from_texts(model, [IOI])
    # The full search (bench/ablation.py) picks 23.3, 11.8 and 2.4 out of all 270 heads; here it chooses
    # among the heads of those three layers, to keep the test short.
    candidates = [HeadRef(l, h) for l in (2, 11, 23) for h in range(9)]
    result = targeted_search(model, prompts, " John", budget=6, candidates=candidates)
    assert result.clean_top["token"].iloc[0] == " Mary"
    assert result.found, result.summary
    logits = _zero_heads_logits(model, prompts.tokens[0][None], result.heads)
    assert model.to_single_str_token(int(logits.argmax())) == " John"
    assert HeadRef(23, 3) in result.heads
