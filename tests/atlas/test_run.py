import json
import re

import numpy as np
import pandas as pd
import pytest
from plotly.offline import get_plotlyjs

from headvis_core.atlas.run import (
    METRIC_COLUMNS,
    ExamplePatterns,
    build_probe_set,
    builtin_probe_set,
    folder_probe_set,
    passport,
    percentiles,
    run_atlas,
    top_heads,
)
from headvis_core.cli.main import main as cli_main
from headvis_core.errors import InputError
from headvis_core.heads import HeadRef
from headvis_core.models.loader import load_random_model
from headvis_core.models.random_models import RandomModelSpec
from headvis_core.viz.atlas import (
    AXES,
    behaviour_counts,
    head_scatter,
    layer_heatmap,
    passport_metrics_figure,
    passport_pattern_figure,
    top_tokens_table,
)
from headvis_core.viz.atlas_report import atlas_report_html

EVIL = "<script>alert('pwned')</script>"


@pytest.fixture(scope="module")
def tiny_atlas(tiny_llama):
    probe = builtin_probe_set(tiny_llama.model, n_seqs=6, seq_len=32)
    return run_atlas(tiny_llama.model, probe, model_name="tiny-llama")


def test_builtin_probe_set_is_bos_plus_each_prompt_cut_to_length(tiny_gpt2):
    model = tiny_gpt2.model
    probe = builtin_probe_set(model, n_seqs=5, seq_len=16)
    assert len(probe.sequences) == 5 and probe.seq_len == 16
    assert all(s[0, 0] == 256 and s.shape[1] <= 16 for s in probe.sequences)
    assert any(s.shape[1] == 16 for s in probe.sequences)
    assert any("cut to that length" in note for note in probe.notes)
    full = builtin_probe_set(model, n_seqs=5, seq_len=256)
    assert not full.notes
    assert full.sequences[0][0, :16].tolist() == probe.sequences[0][0].tolist()


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_folder_probe_set_cuts_windows_across_files(tiny_gpt2, tmp_path):
    model = tiny_gpt2.model
    write(tmp_path / "a.txt", "A" * 100)
    write(tmp_path / "sub" / "b.txt", "b" * 10)
    write(tmp_path / ".hidden.txt", "hidden")
    (tmp_path / "image.bin").write_bytes(b"\x89PNG\x00\x00binary")
    probe = folder_probe_set(model, tmp_path, n_seqs=4, seq_len=21)
    texts = [model.tokenizer.decode(s[0, 1:]) for s in probe.sequences]
    # files taken in turn: a's first window, b (short), then a's next windows
    assert texts == ["A" * 20, "b" * 10, "A" * 20, "A" * 20]
    assert probe.n_documents == 2 and all(s[0, 0] == 256 for s in probe.sequences)
    assert any("hold more text than the atlas reads" in note for note in probe.notes)
    assert build_probe_set(model, tmp_path, n_seqs=4, seq_len=21).describe() == probe.describe()


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: write(p / "file.txt", "text"), "is a file, not a folder"),
    (lambda p: p, "holds no readable"),
    (lambda p: (p / "only.txt").write_bytes(b"\x00\x01") and p, "binary"),
])
def test_bad_corpus_folders_are_clear_errors(tiny_gpt2, tmp_path, make, message):
    with pytest.raises(InputError, match=message):
        folder_probe_set(tiny_gpt2.model, make(tmp_path))


def test_bad_sizes_are_clear_errors(tiny_gpt2):
    with pytest.raises(InputError, match="at least one"):
        builtin_probe_set(tiny_gpt2.model, n_seqs=0)
    with pytest.raises(InputError, match="too short"):
        builtin_probe_set(tiny_gpt2.model, seq_len=3)


def test_table_has_one_row_per_head_with_every_metric(tiny_atlas):
    table = tiny_atlas.table
    assert list(table.columns) == ["layer", "head", *METRIC_COLUMNS, "behaviour", "confidence", "behaviours"]
    assert len(table) == 8 and table[["layer", "head"]].drop_duplicates().shape[0] == 8
    assert table.confidence.between(0, 1).all()
    assert table[list(METRIC_COLUMNS)].notna().all().all()
    assert (table.entropy <= 1 + 1e-6).all() and (table.copying.abs() <= 1).all()
    assert set(tiny_atlas.top_tokens) == {str(HeadRef(l, h)) for l in range(2) for h in range(4)}
    assert tiny_atlas.examples["text"].patterns.shape[:2] == (2, 4)
    n = len(tiny_atlas.examples["induction"].str_tokens)
    assert tiny_atlas.examples["induction"].patterns.shape == (2, 4, n, n) and n == 21
    assert "induction: 4 sequences of BOS + 2 x 15 random tokens" in tiny_atlas.probe


def test_passport_percentiles_and_example(tiny_atlas):
    card = passport(tiny_atlas, HeadRef(1, 2))
    ranks = tiny_atlas.table[list(METRIC_COLUMNS)].rank(pct=True) * 100
    row = tiny_atlas.table[(tiny_atlas.table.layer == 1) & (tiny_atlas.table["head"] == 2)].index[0]
    np.testing.assert_allclose(card.metrics.percentile, ranks.loc[row].to_numpy())
    np.testing.assert_allclose(card.metrics.value, tiny_atlas.table.loc[row, list(METRIC_COLUMNS)].to_numpy(float))
    assert card.example.label == "probe text"  # not an induction head
    np.testing.assert_array_equal(card.pattern, tiny_atlas.examples["text"].patterns[1, 2])
    assert percentiles(tiny_atlas.table).shape == (8, len(METRIC_COLUMNS))
    with pytest.raises(InputError, match="out of range"):
        passport(tiny_atlas, HeadRef(2, 0))
    assert len(top_tokens_table(card)) == len(card.top_tokens) > 0
    assert top_heads(tiny_atlas.table, "induction", 3).shape == (3, 3)


def test_figures_take_any_axis_and_mark_the_selected_head(tiny_atlas):
    table = tiny_atlas.table
    fig = head_scatter(table, "layer", "copying", "entropy", selected=HeadRef(1, 3))
    assert fig.data[0].customdata.tolist() == table[["layer", "head"]].to_numpy().tolist()
    assert fig.data[-1].name == "selected 1.3" and list(fig.data[-1].x) == [1]
    by_behaviour = head_scatter(table)
    assert sum(len(trace.x) for trace in by_behaviour.data) == 8
    assert "head 0.0" in by_behaviour.data[0].hovertext[0] or "head" in by_behaviour.data[0].hovertext[0]
    with pytest.raises(ValueError):
        head_scatter(table, "nonsense")
    heat = layer_heatmap(table, "previous_token")
    assert np.asarray(heat.data[0].z).shape == (2, 4)
    assert heat.data[0].z[1][2] == pytest.approx(table.previous_token[6])
    assert behaviour_counts(table).data
    card = passport(tiny_atlas, HeadRef(0, 1))
    assert list(passport_metrics_figure(card).data[0].x) == list(card.metrics.percentile[::-1])
    assert passport_pattern_figure(card).data[0].z.shape == card.pattern.shape
    assert set(AXES) >= {"layer", "head", "induction"}


@pytest.mark.parametrize("spec, note", [
    (RandomModelSpec(arch="gpt2", n_layers=1, n_heads=2, d_model=32, n_ctx=48), "single layer"),
    (RandomModelSpec(arch="llama", n_layers=2, n_heads=1, d_model=32, n_ctx=48), "one head per layer"),
    (RandomModelSpec(arch="gpt2", n_layers=1, n_heads=1, d_model=32, n_ctx=48), "single attention head"),
])
def test_one_layer_and_one_head_models(spec, note):
    model = load_random_model(spec).model
    probe = builtin_probe_set(model, n_seqs=3, seq_len=128)
    assert any("context of 48 tokens" in n for n in probe.notes)  # 128 > n_ctx: cut and said
    result = run_atlas(model, probe, n_induction_seqs=2)
    assert len(result.table) == spec.n_layers * spec.n_heads
    assert any(note in n for n in result.notes)
    assert all(s.shape[1] <= 48 for s in probe.sequences)
    card = passport(result, HeadRef(spec.n_layers - 1, spec.n_heads - 1))
    assert card.metrics.percentile.between(0, 100).all()
    html = atlas_report_html(result)
    assert html.count("<details class='card'") == spec.n_layers * spec.n_heads


def test_report_is_standalone_and_escapes_tokens(tiny_atlas):
    result = tiny_atlas
    result = type(result)(**{**result.__dict__})
    result.top_tokens = dict(result.top_tokens)
    result.top_tokens["0.0"] = [(EVIL, 0.5)] + result.top_tokens["0.0"]
    text = result.examples["text"]
    result.examples = {**result.examples, "text": ExamplePatterns(text.label, [EVIL] + text.str_tokens[1:],
                                                                  text.patterns)}
    result.notes = result.notes + [f"a note with {EVIL}"]
    html = atlas_report_html(result)
    assert EVIL not in html and "alert('pwned')</script>" not in html
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in html
    assert html.count(get_plotlyjs()) == 1  # plotly.js inlined once
    ours = html.replace(get_plotlyjs(), "")
    assert "cdn.plot.ly" not in ours and "<script src=" not in ours  # nothing fetched: opens offline
    assert html.count("<details class='card'") == 8
    data = json.loads(re.search(r'id="atlas-patterns">(.*?)</script>', html, re.S).group(1))
    assert data["examples"]["text"][0] == "0:" + EVIL  # the token survives, escaped only in transit
    assert len(data["heads"]) == 8 and np.asarray(data["heads"]["1.2"]["z"]).shape[0] == len(text.str_tokens)


def test_cli_writes_csv_and_report(tmp_path, capsys):
    out, report = tmp_path / "metrics.csv", tmp_path / "report.html"
    status = cli_main(["atlas", "--model", "tiny-gpt2", "--out", str(out), "--report", str(report),
                       "--n-seqs", "4", "--seq-len", "24"])
    assert status == 0
    table = pd.read_csv(out)
    assert len(table) == 8 and {"layer", "head", "induction", "copying", "behaviour", "confidence"} <= set(table)
    assert report.read_text(encoding="utf-8").count("<details class='card'") == 8
    printed = capsys.readouterr().out
    assert "top induction:" in printed and "top previous_token:" in printed


def test_cli_reports_a_missing_corpus_as_an_error(tmp_path, capsys):
    status = cli_main(["atlas", "--model", "tiny-gpt2", "--out", str(tmp_path / "x.csv"),
                       "--corpus", str(tmp_path / "nope")])
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "x.csv").exists()


def test_folder_probe_set_reads_latin1_files_as_the_corpus_reader_does(tiny_gpt2, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café résumé naïve".encode("cp1252"))
    probe = folder_probe_set(tiny_gpt2.model, tmp_path, n_seqs=1, seq_len=64)
    assert tiny_gpt2.model.tokenizer.decode(probe.sequences[0][0, 1:]) == "café résumé naïve"


def test_cli_takes_retrieval_prompts_with_marked_spans(tmp_path, capsys):
    prompts = tmp_path / "facts.txt"
    prompts.write_text("The [Louvre] is a museum in\n[Mozart] was born in the city of\n", encoding="utf-8")
    out = tmp_path / "metrics.csv"
    status = cli_main(["atlas", "--model", "tiny-gpt2", "--out", str(out), "--n-seqs", "2", "--seq-len", "24",
                       "--retrieval-prompts", str(prompts), "--no-cache"])
    assert status == 0
    table = pd.read_csv(out)
    assert {"retrieval", "direct_copying", "logit_std", "key_token_entropy", "qk_distance"} <= set(table)
    assert table.retrieval.notna().all()
    assert "top retrieval:" in capsys.readouterr().out


def test_cli_refuses_a_bad_retrieval_prompt_file_before_loading(tmp_path, capsys):
    prompts = tmp_path / "facts.txt"
    prompts.write_text("no span marked here\n", encoding="utf-8")
    status = cli_main(["atlas", "--model", "tiny-gpt2", "--out", str(tmp_path / "x.csv"),
                       "--retrieval-prompts", str(prompts)])
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "square brackets" in err and "Traceback" not in err
    assert not (tmp_path / "x.csv").exists()
