import json

import pytest

from headvis_core.data.prompt_library import load_all_prompt_sets, load_prompt_set, prompt_set_keys
from headvis_core.errors import CorruptFileError, InputError


def test_curated_sets_are_present_and_well_formed():
    keys = prompt_set_keys()
    for expected in ["ioi", "induction", "years", "lists", "multilingual", "code"]:
        assert expected in keys
    for prompt_set in load_all_prompt_sets():
        assert prompt_set.prompts and all(p.text.strip() for p in prompt_set.prompts)
        assert prompt_set.description


def test_ioi_set_answers_are_single_tokens_for_smollm2(smollm2):
    for prompt in load_prompt_set("ioi").prompts:
        for token in (prompt.answer, prompt.alternative):
            assert smollm2.model.to_tokens(token, prepend_bos=False).shape[-1] == 1


def test_unknown_and_corrupt_sets(tmp_path):
    with pytest.raises(InputError, match="No prompt set"):
        load_prompt_set("nope")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="malformed"):
        load_prompt_set("bad", folder=tmp_path)
    (tmp_path / "nokey.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(CorruptFileError):
        load_prompt_set("nokey", folder=tmp_path)
