"""Head roles published in papers, for a teaching overlay next to the roles the atlas finds.

Data lives in ``prompts/published_roles/*.json``: a source, the model names the roles belong to,
and ``roles: {role: {heads: ["layer.head", ...], description}}``. Today: the IOI circuit of GPT-2
small (Wang et al. 2022). A head listed under two roles keeps the first.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from headvis_core.data.prompt_library import PROMPTS_DIR
from headvis_core.errors import CorruptFileError, InputError
from headvis_core.heads import HeadRef, parse_head

PUBLISHED_ROLES_DIR = PROMPTS_DIR / "published_roles"


@dataclass(frozen=True)
class PublishedRoles:
    name: str
    source: str
    models: tuple[str, ...]
    roles: dict[HeadRef, str]  # head -> role
    descriptions: dict[str, str]  # role -> what heads of that role do

    def role_of(self, head: HeadRef) -> Optional[str]:
        return self.roles.get(head)

    def heads_with(self, role: str) -> list[HeadRef]:
        return sorted(h for h, r in self.roles.items() if r == role)


def load_published_roles(path: Path) -> PublishedRoles:
    """Read one roles file; a malformed one raises :class:`CorruptFileError`."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        roles: dict[HeadRef, str] = {}
        descriptions = {}
        for role, entry in raw["roles"].items():
            descriptions[role] = entry.get("description", "")
            for text in entry["heads"]:
                roles.setdefault(parse_head(text, 10_000, 10_000), role)
        return PublishedRoles(name=raw.get("name", path.stem), source=raw.get("source", ""),
                              models=tuple(m.lower() for m in raw.get("models", [])), roles=roles,
                              descriptions=descriptions)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError, InputError) as err:
        raise CorruptFileError(f"The published roles file {path.name} is malformed: {err}") from err


def published_roles_for(model_name: str, source: str = "",
                        folder: Path = PUBLISHED_ROLES_DIR) -> Optional[PublishedRoles]:
    """The published roles for a model, matched by its short name or hub id, or ``None``."""
    names = {(model_name or "").strip().lower(), (source or "").strip().lower()} - {""}
    for path in sorted(folder.glob("*.json")):
        roles = load_published_roles(path)
        if names & set(roles.models):
            return roles
    return None
