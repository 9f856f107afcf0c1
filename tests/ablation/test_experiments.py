"""Saving and reopening ablation experiments; the ``ablate`` command writes one."""

import json

import numpy as np
import pytest

from headvis_core.ablation import experiments
from headvis_core.ablation.experiments import (
    AblationExperiment,
    experiment_from_json_bytes,
    list_experiments,
    load_experiment,
    save_experiment,
)
from headvis_core.ablation.ranking import rank_heads_by_ablation
from headvis_core.ablation.targeted import targeted_search
from headvis_core.cli.main import main
from headvis_core.data.prompt_pairs import prompts_from_texts
from headvis_core.errors import CorruptFileError, InputError

PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def ranking(tiny_gpt2):
    return rank_heads_by_ablation(tiny_gpt2.model, prompts_from_texts(tiny_gpt2.model, [PROMPT]), top_n=2)


def _experiment(result, mode="kl"):
    return AblationExperiment(model="tiny-gpt2", mode=mode, kind="zero", metric="kl", prompts=[PROMPT],
                              result=result, settings={"source": "prompt"})


def test_ranking_experiment_round_trips(tmp_path, ranking):
    path = save_experiment(_experiment(ranking), tmp_path / "kl.json")
    assert [p.name for p in tmp_path.iterdir()] == ["kl.json"]  # no temporary file left behind
    again = load_experiment(path)
    assert again.mode == "kl" and again.prompts == [PROMPT] and again.settings == {"source": "prompt"}
    np.testing.assert_allclose(again.result.importance, ranking.importance)
    assert again.result.table["label"].tolist() == ranking.table["label"].tolist()
    assert list(again.result.shifts) == list(ranking.shifts)
    assert again.to_dict() == json.loads(path.read_text())


def test_targeted_experiment_round_trips(tmp_path, tiny_gpt2):
    model = tiny_gpt2.model
    result = targeted_search(model, prompts_from_texts(model, [PROMPT]), "e", budget=2)
    again = load_experiment(save_experiment(_experiment(result, mode="targeted"), tmp_path / "t.json"))
    assert again.result.heads == result.heads and again.result.reason == result.reason
    assert again.result.trajectory["margin"].tolist() == pytest.approx(result.trajectory["margin"].tolist())


def test_default_location_and_listing(tmp_path, monkeypatch, ranking):
    monkeypatch.setattr(experiments, "experiments_dir", lambda: tmp_path / "experiments")
    assert list_experiments() == []
    path = save_experiment(_experiment(ranking))
    assert path.parent == tmp_path / "experiments" and path.suffix == ".json"
    assert list_experiments() == [path]


@pytest.mark.parametrize("content, message", [
    ('{"format": "headvis-ablation-experiment", "mode": "kl", "res', "corrupt"),
    ("[1, 2, 3]", "not a saved ablation experiment"),
    ('{"format": "headvis-ablation-experiment", "mode": "kl", "model": "x"}', "incomplete"),
    ('{"format": "headvis-ablation-experiment", "mode": "sweep", "model": "x", "kind": "zero", "metric": "kl", '
     '"prompts": [], "result": {}}', "incomplete"),
])
def test_damaged_files_raise_corrupt_file_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(CorruptFileError, match=message):
        load_experiment(path)
    with pytest.raises(CorruptFileError):
        experiment_from_json_bytes(content.encode())


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="No experiment file"):
        load_experiment(tmp_path / "nope.json")


def test_cli_kl_ranking_writes_a_reopenable_experiment(tmp_path, capsys):
    out = tmp_path / "result.json"
    assert main(["ablate", "--model", "tiny-gpt2", "--device", "cpu", "--prompt", PROMPT, "--mode", "kl",
                 "--top", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "8 heads ranked by kl" in printed and f"saved {out}" in printed
    experiment = load_experiment(out)
    assert experiment.mode == "kl" and experiment.model == "tiny-gpt2" and len(experiment.result.table) == 8


def test_cli_targeted_and_resample_from_a_prompts_file(tmp_path, capsys):
    prompts, corrupted = tmp_path / "p.txt", tmp_path / "c.txt"
    prompts.write_text("hello world, hello\njello world, jello\n")
    corrupted.write_text("abcde world, hello\njello wxrld, jello\n")
    out = tmp_path / "t.json"
    assert main(["ablate", "--model", "tiny-llama", "--device", "cpu", "--prompts", str(prompts),
                 "--corrupted-prompts", str(corrupted), "--kind", "resample", "--mode", "targeted",
                 "--target", "e", "--budget", "3", "--out", str(out)]) == 0
    experiment = load_experiment(out)
    assert experiment.mode == "targeted" and experiment.kind == "resample" and len(experiment.prompts) == 2
    assert experiment.result.summary in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--prompt", "", "--mode", "kl"], "empty"),
    (["--prompt", PROMPT, "--mode", "targeted", "--target", "ab"], "tokenizes into 2 tokens"),
    (["--prompt", PROMPT, "--mode", "targeted", "--target", "a", "--budget", "0"], "budget"),
    (["--prompt", PROMPT, "--kind", "resample"], "corrupted prompts"),
    (["--prompt", PROMPT, "--metric", "logit_diff"], "target and an alternative"),
    (["--preset", "ioi"], "single tokens"),
])
def test_cli_bad_input_prints_an_error_and_exits_2(tmp_path, capsys, args, message):
    out = tmp_path / "x.json"
    assert main(["ablate", "--model", "tiny-gpt2", "--device", "cpu", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last and "Traceback" not in err
    assert not out.exists()
