"""Ready-made sweeps from ``prompts/sweeps.json``: a spec, the heads to show per model, a curve."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from headvis_core.data.prompt_library import PROMPTS_DIR
from headvis_core.errors import CorruptFileError, InputError
from headvis_core.heads import HeadRef, parse_heads
from headvis_core.sweeps.plan import SweepSpec

PRESETS_FILE = PROMPTS_DIR / "sweeps.json"


@dataclass(frozen=True)
class SweepPreset:
    """A ready-made sweep from ``prompts/sweeps.json`` (its description field documents the format)."""

    id: str
    name: str
    note: str
    spec: SweepSpec
    heads: dict[str, str]  # model short name (or "default") -> "L.H,L.H"
    curve: Optional[str]
    level: float

    def heads_for(self, model_name: str) -> str:
        return self.heads.get(model_name, self.heads.get(model_name.lower(), self.heads.get("default", "")))


def load_presets(path: Path = PRESETS_FILE) -> list[SweepPreset]:
    """Every preset of ``path``; :class:`CorruptFileError` if the file is malformed."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        presets = []
        for entry in raw["presets"]:
            spec = SweepSpec(template=entry["template"], slots=tuple(entry["slots"]),
                             query=entry.get("query", "last"), key=entry.get("key"),
                             answers=tuple(entry.get("answers", ())), greater_than=entry.get("greater_than"))
            presets.append(SweepPreset(id=entry["id"], name=entry.get("name", entry["id"]), note=entry.get("note", ""),
                                       spec=spec, heads=dict(entry.get("heads", {})), curve=entry.get("curve"),
                                       level=float(entry.get("level", 0.5))))
        return presets
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CorruptFileError(f"The sweep presets file {path.name} is malformed: {err}") from err


def preset(preset_id: str, path: Path = PRESETS_FILE) -> SweepPreset:
    """The preset called ``preset_id``; :class:`InputError` naming the others if there is none."""
    presets = load_presets(path)
    for candidate in presets:
        if candidate.id == preset_id:
            return candidate
    raise InputError(f"No sweep preset called {preset_id!r}; there are: {', '.join(p.id for p in presets)}.")


def usable_heads(spec: str, n_layers: int, n_heads: int) -> tuple[list[HeadRef], list[str]]:
    """The heads of ``spec`` (a preset's ``"5.1,6.9"``) that exist in the model, and those that do not."""
    kept, skipped = [], []
    for part in [p for p in (spec or "").replace(" ", ",").split(",") if p]:
        try:
            kept += parse_heads(part, n_layers, n_heads)
        except InputError:
            skipped.append(part)
    return list(dict.fromkeys(kept)), skipped
