"""The atlas's store key pins the shard plan: the page and the CLI share a result only for the same plan."""

from headvis_core.cli.main import main
from headvis_core.store.kinds import ATLAS, atlas_inputs
from headvis_core.store.results import cached

ATLAS_ARGS = ["atlas", "--model", "tiny-gpt2", "--n-seqs", "2", "--seq-len", "16"]


def test_the_batch_size_and_the_shard_size_are_always_in_the_atlas_key():
    default = atlas_inputs(None, 2, 16, None, 0)
    assert default["batch_size"] == 16 and default["shard_sequences"] == 64
    assert atlas_inputs(None, 2, 16, None, 0, batch_size=16, shard_sequences=64) == default
    assert atlas_inputs(None, 2, 16, None, 0, batch_size=1) != default
    assert atlas_inputs(None, 2, 16, None, 0, shard_sequences=1) != default


def test_the_page_reads_the_cli_atlas_only_for_the_same_plan(tmp_path, tiny_gpt2, capsys):
    def never():
        raise AssertionError("computed again")

    assert main(ATLAS_ARGS + ["--out", str(tmp_path / "a.csv")]) == 0
    # what pages/1_Head_atlas.py asks the store for the same sequences
    page_inputs = atlas_inputs(None, 2, 16, None, 0)
    assert cached(ATLAS, tiny_gpt2, page_inputs, never).from_store
    assert main(ATLAS_ARGS + ["--out", str(tmp_path / "b.csv"), "--batch-size", "1"]) == 0
    assert "from the result store" not in capsys.readouterr().out  # another plan: computed
    assert main(ATLAS_ARGS + ["--out", str(tmp_path / "c.csv"), "--shard-seqs", "1"]) == 0
    assert "from the result store" not in capsys.readouterr().out
