"""Indirect-object-identification prompts (Wang et al. 2022, "Interpretability in the Wild").

Each clean prompt names the indirect object (IO) once and the subject (S)
twice and should be completed with IO. Its corrupted "ABC" counterpart
replaces the second S with a third name C, removing the repeated-name cue
while keeping every token position, which resample ablation and path
patching need. The metric is ``logit(IO) - logit(S)`` at the last position.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headvis_core.data.prompt_library import PROMPTS_DIR
from headvis_core.errors import InputError

TEMPLATES_FILE = PROMPTS_DIR / "ioi_templates.json"


@dataclass(frozen=True)
class IOIPrompt:
    clean: str
    corrupted: str
    io: str  # with leading space, as the answer token
    s: str
    c: str
    template: str


@dataclass(frozen=True)
class IOIDataset:
    prompts: list[IOIPrompt]
    skipped_names: list[str]  # names that are not one token for this model

    @property
    def clean_texts(self) -> list[str]:
        return [p.clean for p in self.prompts]

    @property
    def corrupted_texts(self) -> list[str]:
        return [p.corrupted for p in self.prompts]


def load_templates(path: Path = TEMPLATES_FILE) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def single_token_names(model: Any, names: list[str]) -> tuple[list[str], list[str]]:
    """Split names into those that are one token with a leading space, and the rest."""
    kept, skipped = [], []
    for name in names:
        (kept if model.to_tokens(" " + name, prepend_bos=False).shape[-1] == 1 else skipped).append(name)
    return kept, skipped


def _fill(template: str, io: str, s1: str, s2: str, place: str, obj: str) -> str:
    # The first {S} is the subject's first mention, the second its repeat (S2).
    first, rest = template.split("{S}", 1)
    return (first + s1 + rest.replace("{S}", s2)).format(IO=io, PLACE=place, OBJECT=obj)


def generate_ioi(model: Any, n_prompts: int, seed: int = 0, templates: list[str] | None = None) -> IOIDataset:
    """Sample ``n_prompts`` IOI prompts whose names are single tokens for ``model``.

    All clean and corrupted prompts of one template tokenize to the same
    length, so a batch of one template needs no padding.
    """
    if n_prompts < 1:
        raise InputError("Ask for at least one IOI prompt.")
    spec = load_templates()
    names, skipped = single_token_names(model, spec["names"])
    if len(names) < 3:
        raise InputError(f"Only {len(names)} of the IOI names are single tokens for this model "
                         f"(skipped: {', '.join(skipped)}); IOI needs at least three.")
    rng = random.Random(seed)
    chosen_templates = templates or spec["templates"]
    prompts = []
    for i in range(n_prompts):
        template = chosen_templates[i % len(chosen_templates)]
        io, s, c = rng.sample(names, 3)
        place, obj = rng.choice(spec["places"]), rng.choice(spec["objects"])
        prompts.append(IOIPrompt(clean=_fill(template, io, s, s, place, obj),
                                 corrupted=_fill(template, io, s, c, place, obj),
                                 io=" " + io, s=" " + s, c=" " + c, template=template))
    return IOIDataset(prompts=prompts, skipped_names=skipped)
