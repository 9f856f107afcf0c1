"""The inputs that define each kind of stored result, built one way for the pages and the CLI.

A page and the CLI that compute the same result must produce the same key,
so both build their ``inputs`` here. Each function lists exactly what the
result depends on (besides the model, which the key adds): settings that
only change speed (batch sizes, engines) are left out, and a folder of text
is named by the corpus fingerprint of its files (paths, sizes, modification
times), so an edited corpus is not taken for the old one.
"""

import inspect
from pathlib import Path
from typing import Any, Optional, Sequence

from headvis_core.atlas.metrics import DEFAULT_SHARD_SEQUENCES
from headvis_core.atlas.run import METRIC_COLUMNS, run_atlas
from headvis_core.data.corpus import open_corpus
from headvis_core.data.prompt_library import load_all_prompt_sets
from headvis_core.heads import HeadRef

ATLAS = "atlas"
COMPOSITION = "composition"
IO_SCORES = "io_scores"
PATH_PATCHING = "path_patching"
KL_RANKING = "kl_ranking"
TARGETED = "targeted_search"
SWEEP = "sweep"
ATTRIBUTION = "attribution"
ESTIMATE = "ablation_estimate"
TOUR_STEP = "tour_step"

KINDS = (ATLAS, COMPOSITION, IO_SCORES, PATH_PATCHING, KL_RANKING, TARGETED, SWEEP, ATTRIBUTION, ESTIMATE,
         TOUR_STEP)


# the atlas's own default, so a caller that leaves the batch size alone (the page) gets the CLI's key
ATLAS_BATCH_SIZE = inspect.signature(run_atlas).parameters["batch_size"].default


def atlas_inputs(folder: Optional[str | Path], n_seqs: int, seq_len: int, n_induction_seqs: Optional[int],
                 seed: int, batch_size: int = ATLAS_BATCH_SIZE,
                 shard_sequences: int = DEFAULT_SHARD_SEQUENCES) -> dict[str, Any]:
    """The head atlas (:func:`headvis_core.atlas.run.compute_atlas`) on the built-in prompts or a folder.

    The metric columns are part of the key, so an atlas stored before a metric was added is not
    shown as current. The batch size and the sequences per shard are too: together they fix the
    shard plan, so the order of the sums and the table's last bits (one process or Ray alike).
    """
    if folder is None:
        probe, content = "built-in prompts", [p.text for s in load_all_prompt_sets() for p in s.prompts]
    else:
        probe, content = str(Path(str(folder)).expanduser().resolve()), open_corpus(str(folder)).fingerprint
    return {"probe": probe, "probe_content": content, "n_seqs": n_seqs, "seq_len": seq_len,
            "n_induction_seqs": n_induction_seqs, "seed": seed, "metrics": list(METRIC_COLUMNS),
            "batch_size": batch_size, "shard_sequences": shard_sequences}


def atlas_link(folder: Optional[str | Path], n_seqs: int, seq_len: int) -> dict[str, Any]:
    """The Head atlas page's URL for this atlas (its widgets are bound to ``?corpus=&n=&len=``)."""
    return {"page": "pages/1_Head_atlas.py", "query": {"corpus": str(folder or ""), "n": int(n_seqs),
                                                       "len": int(seq_len)}}


def composition_inputs(kinds: Sequence[str], fold_ln: bool) -> dict[str, Any]:
    """Composition scores between all heads (:func:`headvis_core.circuits.composition.compute_composition`)."""
    return {"kinds": list(kinds), "fold_ln": fold_ln}


def io_inputs(kinds: Sequence[str], fold_ln: bool, seed: int = 0) -> dict[str, Any]:
    """Embedding and unembedding scores (:func:`headvis_core.circuits.composition.io_scores`)."""
    return {"kinds": list(kinds), "fold_ln": fold_ln, "seed": seed}


def prompts_inputs(prompts: Any) -> dict[str, Any]:
    """What an :class:`~headvis_core.data.prompt_pairs.PromptPairs` contributes: tokens and what is scored."""
    return {"tokens": list(prompts.tokens), "answer_positions": list(prompts.answer_positions),
            "target_ids": prompts.target_ids, "alternative_ids": prompts.alternative_ids,
            "label_ids": prompts.label_ids,
            "corrupted_tokens": list(prompts.corrupted_tokens) if prompts.corrupted_tokens is not None else None,
            "texts": list(prompts.texts)}


def ranking_inputs(prompts: Any, ablation_kind: str, metric: str, top_n: int) -> dict[str, Any]:
    """A KL (or logit-difference, loss) ranking of every head (:func:`headvis_core.ablation.ranking.rank_heads`)."""
    return {"prompts": prompts_inputs(prompts), "ablation": ablation_kind, "metric": metric, "top_n": top_n}


def targeted_inputs(prompts: Any, ablation_kind: str, target: Optional[str], budget: int,
                    prune: bool) -> dict[str, Any]:
    """A targeted search (:func:`headvis_core.ablation.targeted.targeted_search`)."""
    return {"prompts": prompts_inputs(prompts), "ablation": ablation_kind, "target": target, "budget": budget,
            "prune": prune}


def estimate_inputs(prompts: Any, ablation_kind: str, metric: str, refine: int) -> dict[str, Any]:
    """An attribution-patching estimate of every head's ablation effect, the top ``refine`` refined exactly."""
    return {"prompts": prompts_inputs(prompts), "ablation": ablation_kind, "metric": metric, "refine": refine}


def sweep_inputs(plan: Any, heads: Sequence[HeadRef], predictions: bool) -> dict[str, Any]:
    """A prompt sweep (:func:`headvis_core.sweeps.run.run_sweep`): the tokenized plan, the heads read."""
    return {"spec": plan.spec, "token_ids": plan.token_ids, "query_pos": plan.query_pos, "key_pos": plan.key_pos,
            "answer_pos": plan.answer_pos, "answer_ids": plan.answer_ids, "answer_labels": plan.answer_labels,
            "greater_than_refs": plan.greater_than_refs, "values": plan.values,
            "heads": [str(h) for h in heads], "predictions": predictions}


def path_patching_inputs(pairs: Any, edges: Sequence[Any], direction: str) -> dict[str, Any]:
    """Path patching of ``edges`` on clean/corrupted prompt pairs."""
    return {"pairs": pairs, "edges": list(edges), "direction": direction}
