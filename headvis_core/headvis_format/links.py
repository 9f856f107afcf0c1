"""HeadVis deep links: ``?layer=L&head=H&tab=T&interval=N`` (``interval=-1``: the custom sequences).

:func:`parse_deep_link` reads the parameters a user may have typed or
mangled: a value that is missing, not a whole number or out of range falls
back to its default, and a note says which, so the page can show it. A link
copied from the HeadVis frontend names its tabs ``sequences``, ``metrics`` and
``umap`` (no ``tab`` for sequences); they open this page's examples, tokens
and PCA tabs. Its other parameters (``reduction``, ``transpose``, ``attr``,
``seq``, ``qpos``, ``kpos``) are ignored.
"""

from dataclasses import dataclass, field
from typing import Mapping, Optional

from headvis_core.headvis_format.contract import CUSTOM_INTERVAL

TABS = ("examples", "tokens", "pca", "custom")
DEFAULT_TAB = "examples"
# the HeadVis frontend's own tab names (App.svelte: sequences, metrics, umap) -> this page's tabs
HEADVIS_TABS = {"sequences": "examples", "metrics": "tokens", "umap": "pca"}


@dataclass(frozen=True)
class DeepLink:
    layer: int
    head: int
    tab: str
    interval: int  # 1..n_intervals, or -1 for the custom sequences
    notes: tuple[str, ...] = field(default=())

    @property
    def custom(self) -> bool:
        return self.interval == CUSTOM_INTERVAL

    def params(self) -> dict[str, str]:
        """The URL parameters that reopen this view."""
        return {"layer": str(self.layer), "head": str(self.head), "tab": self.tab, "interval": str(self.interval)}


def _whole(value: Optional[str]) -> Optional[int]:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def parse_deep_link(params: Mapping[str, str], n_layers: int, n_heads: int, n_intervals: int = 10) -> DeepLink:
    """The view a HeadVis URL names; defaults (head 0.0, tab ``examples``, the top interval) where it names none."""
    notes = []

    def read(name: str, low: int, high: int, default: int, also: tuple[int, ...] = ()) -> int:
        raw = params.get(name)
        if raw is None or raw == "":
            return default
        value = _whole(raw)
        if value is None or not (low <= value <= high or value in also):
            notes.append(f"?{name}={raw} is not {low}-{high}" + (f" or {also[0]}" if also else "")
                         + f"; showing {default}.")
            return default
        return value

    layer = read("layer", 0, n_layers - 1, 0)
    head = read("head", 0, n_heads - 1, 0)
    interval = read("interval", 1, n_intervals, n_intervals, also=(CUSTOM_INTERVAL,))
    tab = params.get("tab") or (TABS[3] if interval == CUSTOM_INTERVAL else DEFAULT_TAB)
    tab = HEADVIS_TABS.get(tab, tab)
    if tab not in TABS:
        notes.append(f"?tab={tab} is not one of {', '.join(TABS)}; showing {DEFAULT_TAB}.")
        tab = DEFAULT_TAB
    return DeepLink(layer, head, tab, interval, tuple(notes))
