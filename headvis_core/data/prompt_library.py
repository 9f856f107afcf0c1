"""The curated prompt sets in ``prompts/`` (see ``prompts/README.md``)."""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from headvis_core.errors import CorruptFileError, InputError

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "prompts"
NOT_PROMPT_SETS = {"ioi_templates"}


@dataclass(frozen=True)
class Prompt:
    text: str
    answer: Optional[str] = None
    alternative: Optional[str] = None
    note: Optional[str] = None


@dataclass(frozen=True)
class PromptSet:
    key: str  # file stem
    name: str
    description: str
    prompts: list[Prompt] = field(default_factory=list)

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]


def prompt_set_keys(folder: Path = PROMPTS_DIR) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.json") if p.stem not in NOT_PROMPT_SETS)


def load_prompt_set(key: str, folder: Path = PROMPTS_DIR) -> PromptSet:
    path = folder / f"{key}.json"
    if not path.is_file():
        raise InputError(f"No prompt set called {key!r}; there are: {', '.join(prompt_set_keys(folder))}.")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        prompts = [Prompt(**p) for p in raw["prompts"]]
        return PromptSet(key=key, name=raw.get("name", key), description=raw.get("description", ""),
                         prompts=prompts)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CorruptFileError(f"The prompt set file {path.name} is malformed: {err}") from err


def load_all_prompt_sets(folder: Path = PROMPTS_DIR) -> list[PromptSet]:
    return [load_prompt_set(key, folder) for key in prompt_set_keys(folder)]
