"""KL ranking: the batched ranking equals a one-forward-per-head loop."""

import numpy as np
import pandas as pd
import pytest

from headvis_core import hooks
from headvis_core.ablation.metrics import kl_divergence
from headvis_core.ablation.ranking import HeadRanking, rank_heads_by_ablation
from headvis_core.ablation.values import make_ablation
from headvis_core.data.prompt_pairs import induction_prompts, prompts_from_texts
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef
from headvis_core.viz.ablation import importance_heatmap
from tests.reference import ablated_logits

IOI = "When Mary and John went to the store, John gave a drink to"
PROMPTS = ["hello world, hello", "jello world, jello", "a prompt of another length"]


def _by_label(ranking, column):
    return ranking.table.set_index("label")[column].sort_index()


def _assert_same(fast, slow, columns=("importance", "kl")):
    for column in columns:
        np.testing.assert_allclose(_by_label(fast, column).values, _by_label(slow, column).values, atol=1e-4,
                                   rtol=1e-4, err_msg=column)


def _hand_loop_kl(model, tokens, head):
    """The plainest reference: one full forward per head, zeroing ``z[:, :, h]``."""
    clean = hooks.forward(model, tokens)[:, -1]
    ablated = ablated_logits(model, tokens, [head])[:, -1]
    return float(kl_divergence(clean, ablated).mean())


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_batched_ranking_equals_the_one_forward_per_head_loop(name, request):
    loaded = request.getfixturevalue(name.replace("-", "_"))
    model = loaded.model
    one = prompts_from_texts(model, [IOI], targets=["M"], alternatives=["J"])
    fast = rank_heads_by_ablation(model, one, metric="logit_diff")
    slow = rank_heads_by_ablation(model, one, metric="logit_diff", engine="loop")
    assert fast.engine == "replay" and slow.engine == "loop"
    _assert_same(fast, slow, ("importance", "kl", "logit_diff", "target_prob", "alternative_prob"))
    for head in (HeadRef(0, 1), HeadRef(1, 3)):
        assert _by_label(fast, "kl")[str(head)] == pytest.approx(_hand_loop_kl(model, one.tokens[0][None], head),
                                                                 rel=1e-4, abs=1e-7)
    # A prompt batch, two lengths: averaged over the prompts.
    batch = prompts_from_texts(model, PROMPTS)
    fast = rank_heads_by_ablation(model, batch, max_batch_tokens=64)
    slow = rank_heads_by_ablation(model, batch, engine="loop")
    _assert_same(fast, slow)
    per_prompt = [rank_heads_by_ablation(model, batch.subset([i]), engine="loop") for i in range(3)]
    np.testing.assert_allclose(_by_label(fast, "kl").values,
                               np.mean([_by_label(r, "kl").values for r in per_prompt], axis=0), rtol=1e-4, atol=1e-7)


def test_batched_ranking_equals_the_loop_for_mean_and_resample(tiny_llama):
    model = tiny_llama.model
    prompts = prompts_from_texts(model, PROMPTS[:2], corrupted=["abcde world, hello", "jello wxrld, jello"])
    for kind in ("mean", "resample"):
        ablation = make_ablation(model, kind, prompts)
        _assert_same(rank_heads_by_ablation(model, prompts, ablation),
                     rank_heads_by_ablation(model, prompts, ablation, engine="loop"))


def test_loss_metric_on_the_induction_preset(tiny_gpt2):
    model = tiny_gpt2.model
    prompts = induction_prompts(model, n_seqs=2, half_len=6)
    fast = rank_heads_by_ablation(model, prompts, metric="loss")
    slow = rank_heads_by_ablation(model, prompts, metric="loss", engine="loop")
    _assert_same(fast, slow, ("importance", "loss", "kl"))
    np.testing.assert_allclose(fast.table["importance"], fast.table["loss"] - fast.clean["loss"], atol=1e-6)


def test_ranking_result_shape_and_round_trip(tiny_llama):
    model = tiny_llama.model
    ranking = rank_heads_by_ablation(model, prompts_from_texts(model, [IOI]), top_n=3, k=5)
    assert ranking.importance.shape == (2, 4) and not np.isnan(ranking.importance).any()
    assert list(ranking.table["rank"]) == list(range(1, 9))
    assert ranking.table["importance"].is_monotonic_decreasing
    assert list(ranking.importance_table().columns) == ["layer", "head", "importance"]
    top = ranking.top_heads(3)
    assert list(ranking.shifts) == [str(h) for h in top]
    shift = ranking.shifts[str(top[0])]
    assert {"token", "prob_before", "prob_after", "rank_before", "rank_after"} <= set(shift.columns)
    assert len(ranking.clean_top) == 5
    again = HeadRanking.from_dict(ranking.to_dict())
    np.testing.assert_allclose(again.importance, ranking.importance)
    pd.testing.assert_frame_equal(again.table, ranking.table, check_dtype=False)
    fig = importance_heatmap(ranking)
    assert fig.data[0].z.shape == (2, 4)


def test_subset_of_heads_leaves_the_rest_blank(tiny_gpt2):
    model = tiny_gpt2.model
    ranking = rank_heads_by_ablation(model, prompts_from_texts(model, [IOI]), heads=[HeadRef(1, 2)], top_n=0)
    assert np.isnan(ranking.importance).sum() == 7 and len(ranking.table) == 1 and not ranking.shifts


def test_metric_needs_its_tokens(tiny_gpt2):
    model = tiny_gpt2.model
    prompts = prompts_from_texts(model, [IOI])
    with pytest.raises(InputError, match="target and an alternative"):
        rank_heads_by_ablation(model, prompts, metric="logit_diff")
    with pytest.raises(InputError, match="induction"):
        rank_heads_by_ablation(model, prompts, metric="loss")
    with pytest.raises(InputError, match="Unknown metric"):
        rank_heads_by_ablation(model, prompts, metric="accuracy")


def test_progress_is_reported(tiny_gpt2):
    seen = []
    prompts = prompts_from_texts(tiny_gpt2.model, [IOI])
    rank_heads_by_ablation(tiny_gpt2.model, prompts, progress=lambda f, m: seen.append(f))
    assert seen[-1] == 1.0 and seen == sorted(seen)


def test_smollm2_batched_ranking_equals_the_loop_and_finds_the_ioi_heads(smollm2):
    model = smollm2.model
    prompts = prompts_from_texts(model, [IOI], targets=[" Mary"], alternatives=[" John"])
    # Heads the targeted search and the full ranking single out on this prompt (see bench/ablation.py),
    # mixed with others, in layers low and high so replay starts at many layers.
    heads = [HeadRef(*h) for h in [(1, 4), (2, 4), (11, 8), (23, 3), (29, 1), (0, 0), (15, 5), (27, 8)]]
    fast = rank_heads_by_ablation(model, prompts, heads=heads, metric="logit_diff", top_n=0)
    slow = rank_heads_by_ablation(model, prompts, heads=heads, metric="logit_diff", engine="loop", top_n=0)
    _assert_same(fast, slow, ("importance", "kl", "logit_diff"))
    assert fast.clean_top["token"].iloc[0] == " Mary"
    # Ablating 23.3 (a name-mover-like head) lowers logit(Mary) - logit(John) more than the unrelated heads.
    drop = _by_label(fast, "importance")
    assert drop["23.3"] > max(drop["0.0"], drop["15.5"], drop["27.8"])
