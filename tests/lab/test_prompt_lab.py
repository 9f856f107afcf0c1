import pytest
import torch

from headvis_core.errors import InputError
from headvis_core.heads import HeadRef
from headvis_core.hooks import capture, pattern_hook
from headvis_core.lab.prompt_lab import _pair_hooks, analyse_prompt, rank_heads_by_attention, top_predictions
from headvis_core.tokens import tokenize_prompt


def full_patterns(loaded, tokens):
    n_layers = loaded.info.n_layers
    logits, cache = capture(loaded.model, tokens, [pattern_hook(l) for l in range(n_layers)])
    return logits, torch.stack([cache[pattern_hook(l)][0] for l in range(n_layers)]).float()  # [layer, head, q, k]


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_ranking_matches_a_loop_over_full_patterns(request, fixture):
    loaded = request.getfixturevalue(fixture)
    prompt = tokenize_prompt(loaded.model, "abcab cab xyz")
    _, patterns = full_patterns(loaded, prompt.tokens)
    for query, key in [(7, 2), (5, 5), (12, 0)]:
        table = rank_heads_by_attention(loaded.model, prompt.tokens, query, key)
        expected = sorted(((float(patterns[l, h, query, key]), l, h) for l in range(patterns.shape[0])
                           for h in range(patterns.shape[1])), key=lambda e: (-e[0], e[1], e[2]))
        assert list(zip(table.layer, table["head"])) == [(l, h) for _, l, h in expected]
        assert table.attention.tolist() == pytest.approx([v for v, _, _ in expected], abs=1e-6)
        assert table["rank"].tolist() == list(range(1, len(expected) + 1))
        assert table.name.tolist()[0] == f"{expected[0][1]}.{expected[0][2]}"


def test_pair_hook_keeps_one_value_per_head():
    store = {}
    hooks = _pair_hooks(3, 1, 2, store)
    big = torch.rand(1, 4, 50, 50)
    for _, fn in hooks:
        fn(big, None)
    assert [n for n, _ in hooks] == [pattern_hook(0), pattern_hook(1)]
    assert all(v.shape == (4,) for v in store.values())
    assert torch.equal(store[1], big[0, :, 3, 1])


def test_analysis_in_one_pass_matches_separate_references(tiny_llama):
    model = tiny_llama.model
    prompt = tokenize_prompt(model, "the cat sat on the mat")
    heads = [HeadRef(1, 3), HeadRef(0, 1)]
    logits, patterns = full_patterns(tiny_llama, prompt.tokens)
    result = analyse_prompt(model, prompt.tokens, heads, query_pos=10, key_pos=4, n_predictions=5, top_k=3,
                            window=(2, 9))
    assert result.window_start == 2 and result.window_stop == 9
    for i, head in enumerate(heads):
        full = patterns[head.layer, head.head]
        assert torch.allclose(result.windows[i], full[2:9, 2:9], atol=1e-6)
        sparse = result.sparse[i]
        assert sparse.first == pytest.approx(full[:, 0].numpy(), abs=1e-6)
        for q in range(3, full.shape[0]):
            assert set(sparse.keys[q].tolist()) == set((torch.topk(full[q, 1:q + 1], 3).indices + 1).tolist())
    assert result.pair_ranking.equals(rank_heads_by_attention(model, prompt.tokens, 10, 4))
    probs = torch.softmax(logits[0, -1], -1)
    assert result.predictions.token_id.tolist() == torch.topk(probs, 5).indices.tolist()
    assert result.predictions.probability.tolist() == pytest.approx(torch.topk(probs, 5).values.tolist(), abs=1e-6)
    assert result.predictions.equals(top_predictions(model, prompt.tokens, 5))
    assert analyse_prompt(model, prompt.tokens, heads).pair_ranking is None


def test_bad_pairs_are_refused(tiny_gpt2):
    tokens = tokenize_prompt(tiny_gpt2.model, "abcdef").tokens  # 7 positions with BOS
    with pytest.raises(InputError, match="earlier tokens"):
        rank_heads_by_attention(tiny_gpt2.model, tokens, 2, 5)
    with pytest.raises(InputError, match="outside the prompt"):
        rank_heads_by_attention(tiny_gpt2.model, tokens, 7, 1)
    with pytest.raises(InputError, match="holds no tokens"):
        analyse_prompt(tiny_gpt2.model, tokens, [HeadRef(0, 0)], window=(5, 5))


def test_smollm2_induction_pair_and_prediction(smollm2):
    model = smollm2.model
    text = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy"
    prompt = tokenize_prompt(model, text)
    brown = [i for i, t in enumerate(prompt.str_tokens) if t == " brown"]
    fox = [i for i, t in enumerate(prompt.str_tokens) if t == " fox"]
    result = analyse_prompt(model, prompt.tokens, [HeadRef(18, 6)], query_pos=brown[1], key_pos=fox[0])
    # From the second " brown", induction heads look at what followed the first one.
    assert {"18.6", "17.4"} & set(result.pair_ranking.name[:3])
    assert result.pair_ranking.attention.iloc[0] > 0.4
    assert result.predictions.token.iloc[0] == " dog" and result.predictions.probability.iloc[0] > 0.9
