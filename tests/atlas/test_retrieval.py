import json

import numpy as np
import pytest

from headvis_core.atlas.retrieval import (
    RetrievalPrompt,
    load_retrieval_prompts,
    parse_marked_line,
    retrieval_scores,
    span_token_positions,
)
from headvis_core.errors import CorruptFileError, InputError


def test_marked_lines_give_the_text_and_its_span():
    prompt = parse_marked_line("The [Eiffel Tower] is located in the city of")
    assert prompt == RetrievalPrompt("The Eiffel Tower is located in the city of", "Eiffel Tower")
    for bad in ("no span here", "[two] and [spans]", "unclosed [span", "[]"):
        with pytest.raises(InputError, match="exactly one entity span"):
            parse_marked_line(bad)


def test_the_curated_set_loads_with_one_span_per_prompt(tiny_gpt2):
    prompts = load_retrieval_prompts()
    assert len(prompts) >= 20
    raw = json.loads(open("prompts/retrieval.json", encoding="utf-8").read())
    assert [p.span for p in prompts] == raw["entity_spans"]
    for prompt in prompts:
        span_token_positions(tiny_gpt2.model, prompt)  # every span falls on tokens before the last one


def test_user_files_json_and_marked_text(tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("The [Louvre] is in\n\n[Mozart] was born in the city of\n", encoding="utf-8")
    assert [p.span for p in load_retrieval_prompts(text)] == ["Louvre", "Mozart"]
    data = tmp_path / "mine.json"
    data.write_text(json.dumps({"prompts": [{"text": "Rome is the capital of"}], "entity_spans": ["Rome"]}))
    assert load_retrieval_prompts(data) == [RetrievalPrompt("Rome is the capital of", "Rome")]


@pytest.mark.parametrize("name, content, error, message", [
    ("missing.txt", None, InputError, "does not exist"),
    ("latin1.txt", "The [caf\xe9] is in".encode("latin-1"), InputError, "not UTF-8"),
    ("empty.txt", b"\n\n", InputError, "holds no prompts"),
    ("nospan.txt", b"no brackets at all", InputError, "exactly one entity span"),
    ("bad.json", b"{not json", CorruptFileError, "not valid JSON"),
    ("short.json", json.dumps({"prompts": [{"text": "a b"}], "entity_spans": []}).encode(), CorruptFileError,
     "one span per prompt"),
    ("absent.json", json.dumps({"prompts": [{"text": "a b"}], "entity_spans": ["zzz"]}).encode(), InputError,
     "does not occur"),
])
def test_bad_prompt_files_are_clear_errors(tmp_path, name, content, error, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=message):
        load_retrieval_prompts(path)


def test_span_positions_are_the_span_characters_tokens(tiny_gpt2):
    model = tiny_gpt2.model  # byte tokenizer: one token per character, BOS first
    tokens, positions = span_token_positions(model, RetrievalPrompt("The Big Ben is in", "Big Ben"))
    assert positions == list(range(5, 12))  # "Big Ben" at characters 4..10, +1 for BOS; the space before it is not
    assert "".join(model.to_str_tokens(tokens[0])[p] for p in positions) == "Big Ben"
    with pytest.raises(InputError, match="ends the prompt"):
        span_token_positions(model, RetrievalPrompt("Where is Big Ben", "Big Ben"))


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_retrieval_scores_equal_a_per_prompt_cache_reference(fixture, request):
    model = request.getfixturevalue(fixture).model
    # two pairs of equal length (one batch each on the byte tokenizer) and one odd length
    prompts = [RetrievalPrompt("The Eiffel Tower is in", "Eiffel Tower"),
               RetrievalPrompt("The Nimbus Tower is in", "Nimbus"),
               RetrievalPrompt("Mount Fuji stands in", "Fuji"), RetrievalPrompt("Mount Etna stands in", "Mount Etna"),
               RetrievalPrompt("The Colosseum is in", "Colosseum")]
    fast = retrieval_scores(model, prompts, batch_size=2)
    slow = np.zeros_like(fast)
    for prompt in prompts:
        tokens, positions = span_token_positions(model, prompt)
        _, cache = model.run_with_cache(tokens)
        n = tokens.shape[1]
        for layer in range(model.cfg.n_layers):
            last = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, -1].double()
            for head in range(model.cfg.n_heads):
                on_span = sum(float(last[head, k]) for k in positions)
                past_bos = sum(float(last[head, k]) for k in range(1, n))
                slow[layer, head] += (on_span - past_bos * len(positions) / (n - 1)) / len(prompts)
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-7)
    assert np.abs(slow).max() > 0


def test_smollm2_retrieval_head_is_found(smollm2):
    """23.4 attends from the answer position to the entity (found with the curated set: 0.40 beyond the even
    share; the shuffled-heads baseline's largest is 0.35)."""
    scores = retrieval_scores(smollm2.model, load_retrieval_prompts())
    assert np.unravel_index(scores.argmax(), scores.shape) == (23, 4)
    assert scores[23, 4] > 0.35 and scores[23, 4] > 10 * abs(np.median(scores))
