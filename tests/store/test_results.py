import os
import sqlite3
import threading
from pathlib import Path

import pytest
import torch

from headvis_core.store.fingerprint import inputs_digest, model_fingerprint
from headvis_core.store.results import ResultStore, cached, load_entry, peek


@pytest.fixture
def store(tmp_path):
    store = ResultStore(tmp_path / "store", size_limit=50 * 2**20)
    yield store
    store.close()


class Counter:
    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return self.value


def test_second_call_comes_from_the_store_with_the_time_it_was_computed(tiny_gpt2, store):
    compute = Counter({"table": torch.arange(6.0).reshape(2, 3)})
    first = cached("atlas", tiny_gpt2, {"n": 4}, compute, store=store)
    second = cached("atlas", tiny_gpt2, {"n": 4}, compute, store=store)
    assert compute.calls == 1
    assert (first.from_store, second.from_store) == (False, True)
    assert second.computed_at == first.computed_at
    assert torch.equal(second.value["table"], first.value["table"])
    assert "from the store" in second.describe()


def test_other_inputs_kind_or_refresh_compute_again(tiny_gpt2, store):
    compute = Counter(1)
    cached("atlas", tiny_gpt2, {"n": 4}, compute, store=store)
    cached("atlas", tiny_gpt2, {"n": 5}, compute, store=store)
    cached("sweep", tiny_gpt2, {"n": 4}, compute, store=store)
    refreshed = cached("atlas", tiny_gpt2, {"n": 4}, compute, store=store, refresh=True)
    assert compute.calls == 4 and not refreshed.from_store


def test_a_result_of_other_weights_is_never_returned(tiny_gpt2, tiny_llama, store):
    cached("atlas", tiny_gpt2, {"n": 4}, lambda: "gpt2", store=store)
    assert cached("atlas", tiny_llama, {"n": 4}, lambda: "llama", store=store).value == "llama"


def test_one_changed_weight_changes_the_fingerprint():
    from headvis_core.models.loader import load_model

    loaded = load_model("tiny-gpt2", device="cpu")  # a private copy: the fixture's model is shared
    before = model_fingerprint(loaded)
    loaded2 = load_model("tiny-gpt2", device="cpu")
    assert model_fingerprint(loaded2).digest == before.digest  # same weights, new object: same fingerprint
    weight = next(iter(loaded2.model.original_model.parameters()))
    with torch.no_grad():
        weight.view(-1)[weight.numel() // 2] += 1e-3  # one element of one tensor
    from headvis_core.store import fingerprint as fp

    fp._fingerprints.pop(loaded2.model, None)  # a new load is a new object; here the same one is edited
    assert model_fingerprint(loaded2).digest != before.digest


def test_inputs_digest_tells_apart_tensors_floats_and_nan():
    assert inputs_digest({"t": torch.tensor([1, 2])}) == inputs_digest({"t": torch.tensor([1, 2])})
    assert inputs_digest({"t": torch.tensor([1, 2])}) != inputs_digest({"t": torch.tensor([1, 3])})
    assert inputs_digest({"x": 0.1}) != inputs_digest({"x": 0.1 + 1e-16 * 2})
    assert inputs_digest({"x": float("nan")}) == inputs_digest({"x": float("nan")})
    assert inputs_digest({"a": 1, "b": 2}) == inputs_digest({"b": 2, "a": 1})


def _value_files(store: ResultStore) -> list[Path]:
    return [p for p in (store.directory / "results").rglob("*.val")]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_entry_is_recomputed_and_said_so(tiny_gpt2, store, damage):
    big = torch.arange(100_000, dtype=torch.float32)  # large enough to be a file of its own
    cached("atlas", tiny_gpt2, {"n": 1}, lambda: big, store=store)
    (path,) = _value_files(store)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) - 1000] ^= 0x01  # one bit of one float
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        path.unlink()
    again = cached("atlas", tiny_gpt2, {"n": 1}, lambda: big + 1, store=store)
    assert not again.from_store
    assert torch.equal(again.value, big + 1)
    if damage != "delete":
        assert any("damaged" in note for note in again.notes)
    assert cached("atlas", tiny_gpt2, {"n": 1}, lambda: None, store=store).from_store  # stored again


def test_an_entry_written_under_another_key_is_not_returned(tiny_gpt2, store):
    a = cached("atlas", tiny_gpt2, {"n": 1}, lambda: "a", store=store)
    b = cached("atlas", tiny_gpt2, {"n": 2}, lambda: "b", store=store)
    results, _ = store._open()
    results.set(b.key, results.get(a.key))  # a value swapped into the wrong slot
    again = cached("atlas", tiny_gpt2, {"n": 2}, lambda: "b2", store=store)
    assert again.value == "b2" and any("another result" in note for note in again.notes)


def test_least_recently_used_results_are_evicted_past_the_cap(tiny_gpt2, tmp_path):
    store = ResultStore(tmp_path / "small", size_limit=3 * 2**20)  # room for two results of 1 MiB
    mib = torch.zeros(2**18)
    cached("atlas", tiny_gpt2, {"n": 0}, lambda: mib, store=store)
    cached("atlas", tiny_gpt2, {"n": 1}, lambda: mib, store=store)
    assert cached("atlas", tiny_gpt2, {"n": 0}, lambda: mib, store=store).from_store  # 1 is now the LRU
    cached("atlas", tiny_gpt2, {"n": 2}, lambda: mib, store=store)
    assert {e.inputs["n"] for e in store.entries()} == {0, 2}
    assert store.volume() <= 3 * 2**20
    assert not cached("atlas", tiny_gpt2, {"n": 1}, lambda: mib, store=store).from_store
    store.close()


def test_listing_and_clearing_by_model(tiny_gpt2, tiny_llama, store):
    cached("atlas", tiny_gpt2, {"n": 1}, lambda: 1, store=store)
    cached("sweep", tiny_gpt2, {"n": 1}, lambda: 1, store=store)
    cached("atlas", tiny_llama, {"n": 1}, lambda: 1, store=store)
    gpt2 = model_fingerprint(tiny_gpt2).digest
    assert {e.kind for e in store.entries(fingerprint=gpt2)} == {"atlas", "sweep"}
    assert [e.model for e in store.entries(kind="atlas", model="tiny-llama")] == ["tiny-llama"]
    assert store.clear(model="tiny-gpt2") == 2
    assert [e.model for e in store.entries()] == ["tiny-llama"]
    assert store.clear() == 1 and store.entries() == []


def test_load_entry_opens_a_listed_result(tiny_gpt2, store):
    stored = cached("atlas", tiny_gpt2, {"n": 1}, lambda: {"a": 1}, store=store)
    (entry,) = store.entries()
    assert load_entry(entry.key, store=store).value == {"a": 1} == stored.value
    assert load_entry("atlas:missing", store=store) is None


def test_an_unwritable_store_still_computes(tiny_gpt2, tmp_path):
    if os.geteuid() == 0:
        blocked = tmp_path / "file"
        blocked.write_text("not a folder")  # root ignores permissions; a file in the way cannot be ignored
        store = ResultStore(blocked / "store")
    else:
        blocked = tmp_path / "ro"
        blocked.mkdir(mode=0o500)
        store = ResultStore(blocked / "store")
    result = cached("atlas", tiny_gpt2, {"n": 1}, lambda: 42, store=store)
    assert result.value == 42 and not result.from_store
    assert any("could not" in note for note in result.notes)


def test_a_damaged_database_is_set_aside(tiny_gpt2, tmp_path):
    directory = tmp_path / "store"
    (directory / "results").mkdir(parents=True)
    (directory / "results" / "cache.db").write_bytes(b"this is not sqlite" * 100)
    store = ResultStore(directory)
    result = cached("atlas", tiny_gpt2, {"n": 1}, lambda: 7, store=store)
    assert result.value == 7 and any("damaged" in note for note in result.notes)
    assert cached("atlas", tiny_gpt2, {"n": 1}, lambda: 8, store=store).value == 7
    assert list(tmp_path.glob("store.damaged-*"))
    store.close()
    assert sqlite3  # the module the store's database errors come from


def test_threads_sharing_a_store_all_get_the_value(tiny_gpt2, store):
    got = []

    def work():
        got.append(cached("atlas", tiny_gpt2, {"n": 9}, lambda: "v", store=store).value)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == ["v"] * 4


def test_a_link_is_kept_for_listings_and_updated_by_a_hit(tiny_gpt2, store):
    page = {"page": "pages/1_Head_atlas.py", "query": {"n": 4}}
    cached("atlas", tiny_gpt2, {"n": 4}, lambda: 1, store=store, link=page)
    assert store.entries()[0].link == page
    moved = {"page": "pages/1_Head_atlas.py", "query": {"n": 4, "len": 128}}
    assert cached("atlas", tiny_gpt2, {"n": 4}, lambda: 2, store=store, link=moved).from_store
    assert store.entries()[0].link == moved


def test_bfloat16_weights_are_fingerprinted_and_differ_from_float32(tiny_gpt2):
    from headvis_core.models.loader import load_model

    half = load_model("tiny-gpt2", device="cpu", dtype="bfloat16")
    assert model_fingerprint(half).digest != model_fingerprint(tiny_gpt2).digest


def test_peek_finds_a_stored_result_without_computing(tiny_gpt2, store):
    assert peek("atlas", tiny_gpt2, {"n": 3}, store=store) is None
    cached("atlas", tiny_gpt2, {"n": 3}, lambda: "value", store=store)
    found = peek("atlas", tiny_gpt2, {"n": 3}, store=store)
    assert found.value == "value" and found.from_store


def test_tokenizing_with_padding_does_not_change_the_fingerprint():
    from headvis_core.models.loader import load_model
    from headvis_core.store import fingerprint as fp

    loaded = load_model("tiny-llama", device="cpu")
    before = model_fingerprint(loaded).digest
    tokenizer = loaded.model.tokenizer
    tokenizer(["a b c", "a"], padding=True, truncation=True, max_length=8)  # sets the backend's call state
    assert "padding" in tokenizer.backend_tokenizer.to_str()
    fp._fingerprints.pop(loaded.model, None)  # hash again, now that the tokenizer has been used
    assert model_fingerprint(loaded).digest == before
