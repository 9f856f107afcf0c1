"""Naming attention heads: ``layer.head`` (``9.6`` is head 6 of layer 9)."""

import re
from dataclasses import dataclass

from headvis_core.errors import InputError

_HEAD_PATTERN = re.compile(r"^\s*(?:L)?(\d+)\s*(?:[.:]|H)\s*(\d+)\s*$", re.IGNORECASE)


@dataclass(frozen=True, order=True)
class HeadRef:
    layer: int
    head: int

    def __str__(self) -> str:
        return f"{self.layer}.{self.head}"

    @classmethod
    def from_label(cls, label: str) -> "HeadRef":
        """The inverse of ``str``: ``"9.6"`` -> ``HeadRef(9, 6)`` (for labels the workbench made itself)."""
        layer, head = str(label).split(".")
        return cls(int(layer), int(head))

    def check(self, n_layers: int, n_heads: int) -> "HeadRef":
        if not (0 <= self.layer < n_layers and 0 <= self.head < n_heads):
            raise InputError(f"Head {self} is out of range: this model has layers 0-{n_layers - 1} "
                             f"and heads 0-{n_heads - 1} in each layer.")
        return self


def parse_head(text: str, n_layers: int, n_heads: int) -> HeadRef:
    """Parse ``"5.1"``, ``"5:1"`` or ``"L5H1"`` and check it exists in the model."""
    match = _HEAD_PATTERN.match(text or "")
    if not match:
        raise InputError(f"{text!r} is not a head: write layer.head, for example 5.1.")
    return HeadRef(int(match.group(1)), int(match.group(2))).check(n_layers, n_heads)


def parse_heads(spec: str, n_layers: int, n_heads: int) -> list[HeadRef]:
    """Parse a comma-separated list of heads, keeping order and dropping repeats."""
    parts = [p for p in re.split(r"[,\s]+", spec or "") if p]
    if not parts:
        raise InputError("No heads given: write them as layer.head, for example 5.1,6.9.")
    return list(dict.fromkeys(parse_head(p, n_layers, n_heads) for p in parts))


def all_heads(n_layers: int, n_heads: int) -> list[HeadRef]:
    return [HeadRef(layer, head) for layer in range(n_layers) for head in range(n_heads)]
