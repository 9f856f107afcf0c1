"""The persistent result store (see README.md): ``cached(kind, model, inputs, compute)``."""

from headvis_core.store.fingerprint import ModelFingerprint, model_fingerprint
from headvis_core.store.results import ResultStore, Stored, StoredEntry, cached, default_store, load_entry, peek

__all__ = ["ModelFingerprint", "ResultStore", "Stored", "StoredEntry", "cached", "default_store", "load_entry",
           "model_fingerprint", "peek"]
