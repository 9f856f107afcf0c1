"""The induction tour's last step: one induction edge's attention score split by what wrote its key.

An induction head at a token of the second copy attends to the token after that token's first
occurrence. Its pre-softmax score there is an exact sum of (query component, key component) terms
(:mod:`headvis_core.attribution`, the QK half of HeadVis's edge attribution, Anthropic 2025). If the
head works by K-composition with a previous-token head (Elhage et al. 2021), that head's write at
the key position should be among the largest key-side terms.
"""

from typing import Any

from headvis_core.attribution import attribute_edge
from headvis_core.data.prompt_pairs import induction_prompts
from headvis_core.heads import HeadRef
from headvis_core.tours.base import StepResult, page_link
from headvis_core.viz.tours import bar_figure

TOP_COMPONENTS = 10


def _component_label(name: str) -> str:
    """``L3H1`` -> ``3.1`` (the workbench's head label); other components unchanged."""
    if name.startswith("L") and "H" in name and not name.endswith("MLP"):
        layer, head = name[1:].split("H")
        return f"{layer}.{head}"
    return name


def induction_score_attribution(model: Any, found: dict, model_name: str = "", half_len: int = 10,
                                seed: int = 0) -> StepResult:
    heads = found.get("induction_heads", [])
    if not heads:
        return StepResult(sentence="No induction head was found to attribute.", convincing=False)
    head = HeadRef.from_label(heads[0])
    prompts = induction_prompts(model, n_seqs=1, half_len=half_len, seed=seed)
    tokens = prompts.tokens[0][None].to(model.cfg.device)
    query = prompts.answer_positions[0][len(prompts.answer_positions[0]) // 2]
    key = query - half_len + 1  # the token after the query token's first occurrence
    result = attribute_edge(model, tokens, head, query, key)
    key_side = result.key_side().head(TOP_COMPONENTS).copy()
    key_side.insert(0, "head_or_component", [_component_label(n) for n in key_side.component])
    previous = set(found.get("previous_token_heads", []))
    top_heads = [c for c in key_side.head_or_component if "." in c][:3]
    carried = [c for c in top_heads if c in previous]
    best = key_side.iloc[0]
    sentence = (f"Head {head} at position {query} attends {result.pattern:.2f} to position {key}, the token after "
                f"the first occurrence (score {result.score:.2f}). The largest key-side contribution is "
                f"{best.head_or_component} ({best.value:+.2f}); the heads among the top key-side terms are "
                f"{', '.join(top_heads) or 'none'}.")
    convincing = bool(carried)
    sentence += (f" {', '.join(carried)} is a previous-token head found in step 2: K-composition on one token."
                 if convincing else " None of them is a previous-token head from step 2, so on this token the "
                                    "key is not mainly built by K-composition with them.")
    figure = bar_figure(list(key_side.head_or_component), list(key_side.value),
                        f"Key-side contributions to head {head}'s score, q{query} -> k{key}", "score contribution")
    link = page_link("Prompt_lab", model_name, heads=str(head), q=query, k=key)
    return StepResult(sentence=sentence, figure=figure, table=key_side[["head_or_component", "label", "value"]],
                      convincing=convincing, link=link, found={"attributed_edge": [str(head), query, key]})
