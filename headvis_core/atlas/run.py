"""The head atlas: every head's metrics over a probe set, classified, in one table.

Probe set: real text (a built-in sample from ``prompts/``, or a corpus folder
the user names) for the attention metrics, plus BOS + random tokens repeated
twice for the induction score (:mod:`headvis_core.atlas.metrics`), and the
OV-circuit copying score from the weights (:mod:`headvis_core.atlas.copying`).
The result is a table with one row per head (columns ``layer``, ``head``,
every metric, ``behaviour``, ``confidence``, ``behaviours``) plus what the
passport cards show: each head's pattern on two short examples and the tokens
it attends to most.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch

from headvis_core.atlas.classes import classify_heads
from headvis_core.atlas.copying import DEFAULT_MAX_VOCAB, copying_scores
from headvis_core.atlas.metrics import (
    DEFAULT_SHARD_SEQUENCES,
    AttentionMetrics,
    TextShardRunner,
    attention_metrics,
    layer_patterns,
)
from headvis_core.atlas.retrieval import RetrievalPrompt, load_retrieval_prompts, prompts_that_fit, retrieval_scores
from headvis_core.data.corpus import TEXT_SUFFIXES, encode, file_encoding, open_corpus
from headvis_core.data.probes import induction_probe
from headvis_core.data.prompt_library import load_all_prompt_sets
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef
from headvis_core.progress import ProgressCallback, report, scaled
from headvis_core.tokens import bos_token_id

BUILTIN = "built-in prompts"
MIN_SEQ_LEN = 8
EXAMPLE_TEXT_TOKENS = 32
EXAMPLE_INDUCTION_HALF = 10
CHARS_PER_TOKEN_BOUND = 8  # characters read per token wanted; English text is about 4 per token


@dataclass(frozen=True)
class MetricInfo:
    column: str
    label: str
    definition: str


METRICS: tuple[MetricInfo, ...] = (
    MetricInfo("previous_token", "previous-token", "mean attention from each token to the one before it"),
    MetricInfo("induction", "induction", "on BOS + random tokens repeated twice, mean attention from the second "
                                         "copy to the token after the first occurrence (Olsson et al. 2022)"),
    MetricInfo("duplicate_token", "duplicate-token", "attention to earlier occurrences of the same token, over "
                                                     "tokens that occurred before"),
    MetricInfo("attention_sink", "attention sink", "attention to position 0 / BOS"),
    MetricInfo("self_attention", "self", "attention to the current token"),
    MetricInfo("entropy", "entropy", "entropy of the attention over visible keys, / log(number of keys)"),
    MetricInfo("mean_distance", "mean distance", "attention-weighted query position minus key position, tokens"),
    MetricInfo("max_attention_no_bos", "max attention (no BOS)", "largest attention to one key, position 0 "
                                                                 "excluded"),
    MetricInfo("local_attention", "local", "attention to the current token and the three before it "
                                           "(position 0 excluded)"),
    MetricInfo("copying", "copying (OV)", "sum / sum of |eigenvalues| of the full OV circuit W_E W_V W_O W_U "
                                          "(Elhage et al. 2021), in [-1, 1]"),
    MetricInfo("direct_copying", "copying (direct, on text)",
               "on the probe text, how much the head's output (through the frozen final norm and W_U) raises the "
               "logit of the token it attends to over the other context tokens, attention-weighted, in logits"),
    MetricInfo("retrieval", "retrieval", "attention from the last token of a factual prompt to its entity span "
                                         "(prompts/retrieval.json), mean over prompts"),
    MetricInfo("logit_std", "logit std", "standard deviation of the pre-softmax scores over the keys a query may "
                                         "see, mean over queries (HeadVis)"),
    MetricInfo("top_logit_margin", "top logit margin", "largest minus second-largest pre-softmax score of a "
                                                       "query, mean over queries (HeadVis)"),
    MetricInfo("logit_z_score", "logit z-score", "(max - mean) / std of a query's pre-softmax scores, mean over "
                                                 "queries (HeadVis)"),
    MetricInfo("qk_distance", "q-k distance", "query position minus key position, mean weighted by attention "
                                              "mass, position 0 excluded (HeadVis)"),
    MetricInfo("qk_distance_variance", "q-k distance variance", "variance of q - k weighted by attention mass, "
                                                                "position 0 excluded (HeadVis)"),
    MetricInfo("query_token_entropy", "query-token entropy", "entropy (bits) of the query tokens of pairs with "
                                                             "attention >= 0.3 to a key past position 0 (HeadVis)"),
    MetricInfo("key_token_entropy", "key-token entropy", "entropy (bits) of the key tokens (past position 0) "
                                                         "receiving attention >= 0.3 (HeadVis)"),
)
METRIC_COLUMNS = tuple(m.column for m in METRICS)
# Metrics on a scale two models share (fractions of attention, normalised entropy, the OV ratio in [-1, 1]);
# the others count tokens, logits or bits, which depend on the tokenizer and the unembedding.
COMPARABLE_METRICS = ("previous_token", "induction", "duplicate_token", "attention_sink", "self_attention",
                      "entropy", "max_attention_no_bos", "local_attention", "retrieval", "copying")
ATLAS_METRIC_LABELS = {m.column: m.label for m in METRICS}
MAIN_METRICS = ("previous_token", "induction", "duplicate_token", "copying", "attention_sink", "entropy")


@dataclass
class ProbeSet:
    """Real-text probe sequences, each ``[1, pos]`` with BOS first (where the model uses one)."""

    sequences: list[torch.Tensor]
    source: str
    seq_len: int
    n_documents: int
    notes: list[str] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(int(s.shape[-1]) for s in self.sequences)

    def describe(self) -> str:
        return (f"{len(self.sequences)} sequences ({self.n_tokens:,} tokens, up to {self.seq_len} each) "
                f"from {self.source}")


def _with_bos(model: Any, ids: list[int]) -> torch.Tensor:
    bos = bos_token_id(model)
    return torch.tensor(([bos] if bos is not None else []) + ids, dtype=torch.long)[None]


def _check_sizes(model: Any, n_seqs: int, seq_len: int, notes: list[str]) -> int:
    if n_seqs < 1:
        raise InputError("The atlas needs at least one probe sequence.")
    if seq_len < MIN_SEQ_LEN:
        raise InputError(f"Probe sequences of {seq_len} tokens are too short: use at least {MIN_SEQ_LEN}.")
    n_ctx = int(model.cfg.n_ctx)
    if seq_len > n_ctx:
        notes.append(f"Sequences of {seq_len} tokens are longer than the model's context of {n_ctx} tokens: "
                     f"cut to {n_ctx}.")
        seq_len = n_ctx
    return seq_len


def builtin_probe_set(model: Any, n_seqs: int = 64, seq_len: int = 128) -> ProbeSet:
    """Every prompt of the prompt library as one sequence (BOS + prompt), longer ones cut to ``seq_len``."""
    notes: list[str] = []
    seq_len = _check_sizes(model, n_seqs, seq_len, notes)
    room = seq_len - (bos_token_id(model) is not None)
    texts = [p.text for prompt_set in load_all_prompt_sets() for p in prompt_set.prompts if p.text.strip()]
    sequences, cut = [], 0
    for text in texts[:n_seqs]:
        ids = encode(model.tokenizer, text)
        if len(ids) > room:
            ids, cut = ids[:room], cut + 1
        if ids:
            sequences.append(_with_bos(model, ids))
    if cut:
        notes.append(f"{cut} prompt{'s were' if cut > 1 else ' was'} longer than {seq_len} tokens and "
                     f"{'were' if cut > 1 else 'was'} cut to that length.")
    return ProbeSet(sequences=sequences, source=BUILTIN, seq_len=seq_len, n_documents=len(texts), notes=notes)


def corpus_files(folder: str | Path) -> list[tuple[Path, str]]:
    """``(file, encoding)`` of the readable text files of a corpus folder.

    Read through :func:`headvis_core.data.corpus.open_corpus`.

    Raises :class:`InputError` where the folder is missing, is a file, or holds no text.
    """
    raw = str(folder).strip()
    if not raw:
        raise InputError("No corpus folder given: type the path of a folder of text files.")
    path = Path(raw).expanduser()
    if not path.exists():
        raise InputError(f"The corpus folder {raw!r} does not exist.")
    if not path.is_dir():
        raise InputError(f"{raw!r} is a file, not a folder: give the folder that holds your text files.")
    corpus = open_corpus(raw)
    files = [f for f in corpus.files if f.suffix.lower() in TEXT_SUFFIXES]
    if not files:
        raise InputError(f"The folder {raw!r} holds no text files: the atlas reads .txt files.")
    return [(f, file_encoding(corpus, f)) for f in files]


def folder_probe_set(model: Any, folder: str | Path, n_seqs: int = 64, seq_len: int = 128) -> ProbeSet:
    """Windows of ``seq_len`` tokens (BOS + text) cut from the text files of ``folder``, spread over the files.

    Each file gives consecutive windows from its start; windows are taken from
    the files in turn until ``n_seqs`` are collected (so short files leave
    room for more windows of long ones). Raises :class:`InputError`
    where the folder is missing or holds no text.
    """
    raw = str(folder).strip()
    files = corpus_files(folder)
    notes: list[str] = []
    seq_len = _check_sizes(model, n_seqs, seq_len, notes)
    files = files[:n_seqs]  # each file gives at least one window
    room = seq_len - (bos_token_id(model) is not None)
    per_file = -(-n_seqs // len(files))
    windows_by_file, unread = [], []
    for file, encoding in files:
        # Read about twice what an even share needs, so short files leave room for the others' windows.
        budget = per_file * room * CHARS_PER_TOKEN_BOUND
        with open(file, encoding=encoding, errors="replace") as handle:
            text = handle.read(budget + 1)
        ids = encode(model.tokenizer, text[:budget])
        windows = [ids[i:i + room] for i in range(0, len(ids), room)]
        windows_by_file.append([w for w in windows if len(w) >= 2])
        unread.append(len(text) > budget)
    sequences, used = [], [0] * len(files)
    for round_ in range(max(len(w) for w in windows_by_file)):
        for index, windows in enumerate(windows_by_file):
            if round_ < len(windows) and len(sequences) < n_seqs:
                sequences.append(_with_bos(model, windows[round_]))
                used[index] += 1
    if not sequences:
        raise InputError(f"The text files in {raw!r} hold too little text to make a probe sequence.")
    longer = sum(1 for i in range(len(files)) if unread[i] or used[i] < len(windows_by_file[i]))
    if longer:
        notes.append(f"{longer} of {len(files)} files hold more text than the atlas reads: "
                     f"{len(sequences)} windows of up to {seq_len} tokens were taken from the files in turn.")
    return ProbeSet(sequences=sequences, source=f"folder {raw}", seq_len=seq_len, n_documents=len(files),
                    notes=notes)


def build_probe_set(model: Any, folder: Optional[str | Path] = None, n_seqs: int = 64,
                    seq_len: int = 128) -> ProbeSet:
    """The built-in prompt sample, or windows from the text files of ``folder``."""
    if folder is None:
        return builtin_probe_set(model, n_seqs, seq_len)
    return folder_probe_set(model, folder, n_seqs, seq_len)


@dataclass
class ExamplePatterns:
    """Every head's attention on one short example: ``patterns [layer, head, query, key]``."""

    label: str
    str_tokens: list[str]
    patterns: np.ndarray


@dataclass
class AtlasResult:
    table: pd.DataFrame  # one row per head: layer, head, metrics, behaviour, confidence, behaviours
    model_name: str
    n_layers: int
    n_heads: int
    probe: str  # what the probe set was
    notes: list[str]
    top_tokens: dict[str, list[tuple[str, float]]]  # "layer.head" -> [(token, share of attention)]
    examples: dict[str, ExamplePatterns]  # "text" and "induction"
    seconds: float

    def row(self, head: HeadRef) -> pd.Series:
        match = self.table[(self.table.layer == head.layer) & (self.table["head"] == head.head)]
        if match.empty:
            raise InputError(f"Head {head} is not in this atlas ({self.n_layers} layers x {self.n_heads} heads).")
        return match.iloc[0]


def _token_text(model: Any, token_id: int) -> str:
    try:
        text = model.tokenizer.decode([int(token_id)])
    except Exception:
        return f"<id {int(token_id)}>"
    # a token holding part of a multi-byte character decodes to U+FFFD alone: name it so it can be told apart
    return f"{text} (id {int(token_id)})" if "\ufffd" in text else text


def _top_tokens(model: Any, metrics: AttentionMetrics) -> dict[str, list[tuple[str, float]]]:
    out = {}
    n_layers, n_heads, _ = metrics.top_token_ids.shape
    for layer in range(n_layers):
        for head in range(n_heads):
            pairs = zip(metrics.top_token_ids[layer, head], metrics.top_token_shares[layer, head])
            out[str(HeadRef(layer, head))] = [(_token_text(model, i), round(float(s), 4)) for i, s in pairs if s > 0]
    return out


def _examples(model: Any, probe: ProbeSet, seed: int) -> dict[str, ExamplePatterns]:
    examples = {}
    text = probe.sequences[0][:, :EXAMPLE_TEXT_TOKENS]
    examples["text"] = ExamplePatterns("probe text", model.to_str_tokens(text[0]),
                                       layer_patterns(model, text).numpy())
    half = max(2, min(EXAMPLE_INDUCTION_HALF, (int(model.cfg.n_ctx) - 1) // 2))
    repeated = induction_probe(model, 1, half, seed=seed + 1).tokens
    examples["induction"] = ExamplePatterns("random tokens, repeated", model.to_str_tokens(repeated[0]),
                                            layer_patterns(model, repeated).numpy())
    return examples


def run_atlas(model: Any, probe: ProbeSet, n_induction_seqs: Optional[int] = None, batch_size: int = 16,
              max_vocab: Optional[int] = DEFAULT_MAX_VOCAB, seed: int = 0, model_name: str = "",
              retrieval_prompts: Optional[list[RetrievalPrompt]] = None,
              progress: Optional[ProgressCallback] = None, shard_sequences: int = DEFAULT_SHARD_SEQUENCES,
              text_shards: Optional[TextShardRunner] = None) -> AtlasResult:
    """Metrics, behaviours and passport material for every head of ``model`` on ``probe``.

    Args:
        n_induction_seqs: repeated-random-token sequences for the induction score
            (default a quarter of the text sequences, at least 4); each is BOS + 2 x
            ``(seq_len - 1) // 2`` tokens.
        batch_size: sequences per forward pass.
        max_vocab: vocabulary sample size for the copying score (exact below it).
        retrieval_prompts: factual prompts with entity spans for the retrieval score (default the curated
            ``prompts/retrieval.json``).
        shard_sequences: real-text sequences per shard, the unit of parallel work
            (:func:`headvis_core.atlas.metrics.plan_text_shards`); it fixes the order in which sums are
            added, so two atlases agree bit for bit when this agrees.
        text_shards: where the real-text shards run (default here; e.g.
            :class:`headvis_core.atlas.distributed.RayTextShards`), with the same result. The induction
            probe, retrieval, copying scores and passport examples run here.
    """
    started = time.time()
    if not probe.sequences:
        raise InputError("The probe set is empty: there is no text to measure the heads on.")
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    n_induction = n_induction_seqs or max(4, len(probe.sequences) // 4)
    bos = bos_token_id(model) is not None
    half = max(2, (probe.seq_len - bos) // 2)
    induction = induction_probe(model, n_induction, half, seed=seed)
    retrieval_prompts, too_long = prompts_that_fit(model, retrieval_prompts or load_retrieval_prompts())
    metrics = attention_metrics(model, probe.sequences, induction, batch_size=batch_size,
                                progress=scaled(progress, 0.0, 0.8), shard_sequences=shard_sequences,
                                text_shards=text_shards)
    if retrieval_prompts:
        metrics.values["retrieval"] = retrieval_scores(model, retrieval_prompts, batch_size=batch_size,
                                                       progress=scaled(progress, 0.8, 0.85))
    else:
        metrics.values["retrieval"] = np.full((n_layers, n_heads), np.nan)
    if too_long:
        metrics.notes.append(f"{too_long} retrieval prompt{'s were' if too_long > 1 else ' was'} longer than the "
                             f"model's context of {int(model.cfg.n_ctx)} tokens and left out"
                             + ("; retrieval scores are undefined (NaN)." if not retrieval_prompts else "."))
    copying = copying_scores(model, max_vocab=max_vocab, seed=seed, progress=scaled(progress, 0.85, 0.93))
    report(progress, 0.94, "examples for the passport cards")
    examples = _examples(model, probe, seed)
    layer_index, head_index = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    columns = {"layer": layer_index.ravel(), "head": head_index.ravel()}
    for name in METRIC_COLUMNS:
        columns[name] = (copying if name == "copying" else metrics.values[name]).ravel().astype(float)
    table = classify_heads(pd.DataFrame(columns), model_name)
    notes = list(probe.notes) + list(metrics.notes)
    if n_heads * n_layers == 1:
        notes.append("This model has a single attention head: there is nothing to rank it against, so percentiles "
                     "are 100 and behaviours rest on the absolute thresholds alone.")
    elif n_heads == 1:
        notes.append("This model has one head per layer: heads are compared across layers only.")
    if n_layers == 1:
        notes.append("This model has a single layer: induction needs a previous-token head in an earlier layer to "
                     "compose with, so no real induction heads are expected (the score still measures the stripe).")
    if max_vocab is not None and int(model.W_E.shape[0]) > max_vocab:
        notes.append(f"Copying scores use a random sample of {max_vocab:,} of the {int(model.W_E.shape[0]):,} "
                     "vocabulary tokens.")
    report(progress, 1.0, "done")
    probe_text = (f"{probe.describe()}; induction: {n_induction} sequences of BOS + 2 x {half} random tokens"
                  if bos else f"{probe.describe()}; induction: {n_induction} sequences of 2 x {half} random tokens")
    probe_text += f"; retrieval: {len(retrieval_prompts)} factual prompts with entity spans"
    return AtlasResult(table=table, model_name=model_name, n_layers=n_layers, n_heads=n_heads, probe=probe_text,
                       notes=notes, top_tokens=_top_tokens(model, metrics), examples=examples,
                       seconds=round(time.time() - started, 2))


def compute_atlas(model: Any, folder: Optional[str | Path] = None, n_seqs: int = 64, seq_len: int = 128,
                  model_name: str = "", progress: Optional[ProgressCallback] = None, **kwargs: Any) -> AtlasResult:
    """:func:`build_probe_set` then :func:`run_atlas`."""
    report(progress, 0.0, "reading the probe text")
    probe = build_probe_set(model, folder, n_seqs=n_seqs, seq_len=seq_len)
    return run_atlas(model, probe, model_name=model_name, progress=scaled(progress, 0.02, 1.0), **kwargs)


@dataclass
class Passport:
    """What a head's passport card shows."""

    head: HeadRef
    behaviour: str
    confidence: float
    behaviours: str
    metrics: pd.DataFrame  # metric, label, value, percentile (0-100 among all heads)
    top_tokens: list[tuple[str, float]]
    example: ExamplePatterns
    pattern: np.ndarray  # [query, key] on the example


def percentiles(table: pd.DataFrame) -> pd.DataFrame:
    """Each metric's percentile rank (0-100, ties averaged) among all heads, same index as ``table``."""
    return table[list(METRIC_COLUMNS)].rank(pct=True).mul(100)


def passport(result: AtlasResult, head: HeadRef) -> Passport:
    """The passport card data of ``head``: metrics with percentiles, behaviours, example pattern, top tokens."""
    head.check(result.n_layers, result.n_heads)
    row = result.row(head)
    ranks = percentiles(result.table).loc[row.name]
    metrics = pd.DataFrame({"metric": list(METRIC_COLUMNS), "label": [ATLAS_METRIC_LABELS[c] for c in METRIC_COLUMNS],
                            "value": [float(row[c]) for c in METRIC_COLUMNS],
                            "percentile": [float(ranks[c]) for c in METRIC_COLUMNS]})
    example = result.examples["induction" if row.behaviour == "induction" else "text"]
    return Passport(head=head, behaviour=str(row.behaviour), confidence=float(row.confidence),
                    behaviours=str(row.behaviours), metrics=metrics,
                    top_tokens=result.top_tokens.get(str(head), []), example=example,
                    pattern=example.patterns[head.layer, head.head])


def top_heads(table: pd.DataFrame, metric: str, n: int = 5) -> pd.DataFrame:
    """The ``n`` heads with the highest ``metric`` (layer, head, value)."""
    if metric not in table.columns:
        raise InputError(f"No metric called {metric!r}; there are: {', '.join(METRIC_COLUMNS)}.")
    return table.nlargest(n, metric)[["layer", "head", metric]].reset_index(drop=True)
