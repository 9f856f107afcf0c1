"""HeadVis deep links: ``?layer=L&head=H&tab=T&interval=N`` (``interval=-1``: the custom sequences).

:func:`parse_deep_link` reads the parameters a user may have typed or
mangled: a value that is missing, not a whole number or out of range falls
back to its default, and a note says which, so the page can show it. A link
copied from the HeadVis frontend names its tabs ``sequences``, ``metrics`` and
``umap`` (no ``tab`` for sequences); they open this page's examples, tokens
and PCA tabs. Its other parameters (``reduction``, ``transpose``, ``attr``,
``seq``, ``qpos``, ``kpos``) are ignored.

:func:`page_view` is the Dataset examples page's reading of the same URL: its view
and interval controls are bound to ``?tab=`` and ``?interval=``, so it says what
to write there before they are drawn (HeadVis's tab names translated, a value the
page cannot show dropped) and notes that name what the page then shows; its
default interval is ``top``, the exact highest-scoring windows, not HeadVis's
``n_intervals``.
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


def _read_whole(params: Mapping[str, str], name: str, low: int, high: int,
                also: tuple[int, ...] = ()) -> tuple[Optional[int], Optional[str]]:
    """``(value, None)`` for a valid value, ``(None, None)`` where absent, ``(None, why)`` where invalid."""
    raw = params.get(name)
    if raw is None or raw == "":
        return None, None
    value = _whole(raw)
    if value is None or not (low <= value <= high or value in also):
        return None, f"?{name}={_shown(raw)} is not {low}-{high}" + (f" or {also[0]}" if also else "")
    return value, None


def _shown(raw: object) -> str:
    text = str(raw)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_deep_link(params: Mapping[str, str], n_layers: int, n_heads: int, n_intervals: int = 10) -> DeepLink:
    """The view a HeadVis URL names; defaults (head 0.0, tab ``examples``, the top interval) where it names none."""
    notes = []

    def read(name: str, low: int, high: int, default: int, also: tuple[int, ...] = ()) -> int:
        value, why = _read_whole(params, name, low, high, also)
        if why is not None:
            notes.append(f"{why}; showing {default}.")
        return default if value is None else value

    layer = read("layer", 0, n_layers - 1, 0)
    head = read("head", 0, n_heads - 1, 0)
    interval = read("interval", 1, n_intervals, n_intervals, also=(CUSTOM_INTERVAL,))
    tab = params.get("tab") or (TABS[3] if interval == CUSTOM_INTERVAL else DEFAULT_TAB)
    tab = HEADVIS_TABS.get(tab, tab)
    if tab not in TABS:
        notes.append(f"?tab={_shown(tab)} is not one of {', '.join(TABS)}; showing {DEFAULT_TAB}.")
        tab = DEFAULT_TAB
    return DeepLink(layer, head, tab, interval, tuple(notes))


TOP_INTERVAL = "top"  # the page's default interval: the exact highest-scoring windows (not one of HeadVis's)


@dataclass(frozen=True)
class PageView:
    """What the Dataset examples page shows for a URL: its tab and interval as its controls name them."""

    tab: str
    interval: str  # TOP_INTERVAL, "1".."n_intervals", or "-1"
    notes: tuple[str, ...] = field(default=())

    def url(self) -> dict[str, Optional[str]]:
        """``?tab=`` and ``?interval=`` as the page's bound controls read them (``None``: the default, absent)."""
        return {"tab": None if self.tab == DEFAULT_TAB else self.tab,
                "interval": None if self.interval == TOP_INTERVAL else self.interval}

    def repairs(self, params: Mapping[str, str]) -> dict[str, Optional[str]]:
        """The URL parameters to rewrite so that ``params`` reads as this view (``{}``: it does already)."""
        return {key: value for key, value in self.url().items() if params.get(key) != value}


def page_view(params: Mapping[str, str], n_layers: int, n_heads: int, n_intervals: int) -> PageView:
    """The page's view of a HeadVis URL; a note for each value it does not show as given, naming what it shows.

    ``?tab=`` in HeadVis's names opens the matching tab; ``?interval=`` outside 1..``n_intervals`` and -1
    opens the top windows (``?interval=top`` names them too). ``?layer=``/``?head=`` out of range get the
    notes of :func:`parse_deep_link`.
    """
    notes = [note for note in parse_deep_link(params, n_layers, n_heads, n_intervals).notes
             if note.startswith(("?layer=", "?head="))]
    raw_tab = params.get("tab") or DEFAULT_TAB
    tab = HEADVIS_TABS.get(raw_tab, raw_tab)
    if raw_tab in HEADVIS_TABS and tab != DEFAULT_TAB:
        notes.append(f"?tab={raw_tab} (HeadVis's name) opens this page's {tab} tab.")
    if tab not in TABS:
        notes.append(f"?tab={_shown(raw_tab)} is not one of {', '.join(TABS)}; showing {DEFAULT_TAB}.")
        tab = DEFAULT_TAB
    interval = TOP_INTERVAL
    if params.get("interval") not in (None, "", TOP_INTERVAL):
        value, why = _read_whole(params, "interval", 1, n_intervals, also=(CUSTOM_INTERVAL,))
        if why is not None:
            notes.append(f"{why}; showing {TOP_INTERVAL} (the exact highest-scoring windows).")
        else:
            interval = str(value)
    return PageView(tab, interval, tuple(notes))
