"""Streamlit glue shared by every page: the cached model, the sidebar, session and URL state.

This is the only module besides the pages that imports streamlit; all
analysis lives in :mod:`headvis_core`. A page typically does::

    loaded = ui.page_setup("Head atlas")
    recompute = ui.recompute_button("atlas_recompute")
    slot, progress = ui.lazy_progress("Head atlas")  # no bar for a stored result
    with ui.user_errors():
        stored = cached(ATLAS, loaded, atlas_inputs(...), compute, refresh=recompute, link=atlas_link(...))
    slot.empty()
    ui.show_stored(stored, "Head atlas")  # when it was computed; the store's notes as warnings
    st.plotly_chart(figure(stored.value)); ui.download_table(stored.value.table, "atlas.csv")

Results go through the persistent result store (:mod:`headvis_core.store`), so a reopened page,
URL or restarted app shows them at once; pages whose work runs on a button ``peek`` at the store
for the form as it stands.
"""

import contextlib
import gc
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import urlencode

import streamlit as st
from streamlit.errors import StreamlitAPIException

from headvis_core.data.roots import allowed_roots
from headvis_core.errors import HeadVisError, InputError
from headvis_core.heads import HeadRef
from headvis_core.models.loader import LoadedModel, load_model
from headvis_core.models.offline import fetch_offline_model, is_fetched, offline_spec, terms_notice
from headvis_core.models.registry import DEFAULT_MODEL, KNOWN_MODELS
from headvis_core.progress import ProgressCallback

OTHER_MODEL = "Other: HF id or local directory"
DEVICES = ["auto", "cpu", "cuda", "mps"]
DTYPES = ["float32", "bfloat16", "float16"]

# Results one page leaves for another, stored per model (see remember/recall).
ATLAS_METRICS = "atlas_metrics"  # DataFrame: layer, head, metrics..., behaviour, confidence
ABLATION_IMPORTANCE = "ablation_importance"  # DataFrame: layer, head, importance (e.g. KL)
GRAPH_HEADS = "graph_heads"  # list[HeadRef] sent to the circuit graph


def default_model_name() -> str:
    return os.environ.get("HEADVIS_MODEL") or DEFAULT_MODEL


@st.cache_resource(max_entries=1, show_spinner=False)
def _load_cached(name: str, device: str, dtype: str) -> LoadedModel:
    # max_entries=1: choosing another model evicts (and so frees) the previous one.
    gc.collect()
    return load_model(name, device=device, dtype=dtype)


def model_key(loaded: LoadedModel) -> str:
    """A hashable stand-in for the model in ``st.cache_data`` keys (pass the model as ``_model``)."""
    info = loaded.info
    return f"{info.name}|{info.source}|{info.device}|{info.dtype}"


def progress_bar(label: str) -> ProgressCallback:
    """A :data:`ProgressCallback` that draws an ``st.progress`` bar where it is called."""
    bar = st.progress(0.0, text=label)

    def update(fraction: float, message: str) -> None:
        bar.progress(fraction, text=f"{label}: {message}" if message else label)

    return update


def lazy_progress(label: str) -> tuple[Any, ProgressCallback]:
    """A slot and a progress callback whose bar is drawn on its first call only, so a result taken
    from a cache shows no bar; ``slot.empty()`` removes the bar when the work is done."""
    slot = st.empty()
    drawn: dict[str, ProgressCallback] = {}

    def update(fraction: float, message: str) -> None:
        if "bar" not in drawn:
            with slot.container():
                drawn["bar"] = progress_bar(label)
        drawn["bar"](fraction, message)

    return slot, update


def session_memo(store: str, key: str, compute: Callable[[], Any], max_entries: int = 6) -> Any:
    """``compute()`` once per ``key`` in this browser session, the oldest of ``max_entries`` dropped.

    Unlike ``st.cache_data``, a hit replays nothing: a progress bar drawn while computing (see
    :func:`lazy_progress`) stays away.
    """
    results = st.session_state.setdefault(store, {})
    if key not in results:
        if len(results) >= max_entries:
            results.pop(next(iter(results)))
        results[key] = compute()
    return results[key]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Show a :class:`HeadVisError` as an error box and stop this run (widgets keep their values)."""
    try:
        yield
    except HeadVisError as err:
        st.error(str(err))
        st.stop()


def _query_param(key: str) -> Optional[str]:
    value = st.query_params.get(key)
    return value if value not in (None, "") else None


def _model_picker() -> tuple[str, str, str]:
    state = st.session_state
    # A page's widgets start afresh on each visit (their old values linger in session state
    # but the new page's widgets ignore them); copying the choice from these plain keys at the
    # start of each visit keeps it across pages.
    if "model_name" not in state:
        state.model_name = _query_param("model") or default_model_name()
        state.model_device = _query_param("device") or "auto"
        state.model_dtype = _query_param("dtype") or "float32"
    known = list(KNOWN_MODELS)
    is_known = state.model_name in KNOWN_MODELS
    defaults = {"model_choice": state.model_name if is_known else OTHER_MODEL,
                "model_typed": "" if is_known else state.model_name,
                "model_device_choice": state.model_device if state.model_device in DEVICES else "auto",
                "model_dtype_choice": state.model_dtype if state.model_dtype in DTYPES else "float32"}
    if state.get("model_picker_visit") != state.get("visit_number") or "model_choice" not in state:
        state.model_picker_visit = state.get("visit_number")
        for key, value in defaults.items():
            state[key] = value
    choice = st.sidebar.selectbox(
        "Model", known + [OTHER_MODEL], key="model_choice",
        format_func=lambda n: n if n == OTHER_MODEL else f"{n} ({KNOWN_MODELS[n].kind})",
        help="smollm2-135m works offline; gpt2 and the other hub models need the network.")
    name = choice
    if choice == OTHER_MODEL:
        typed = st.sidebar.text_input("HF id or local directory", key="model_typed",
                                      placeholder="EleutherAI/pythia-70m or /path/to/model")
        name = typed.strip() or default_model_name()
    with st.sidebar.expander("Device and dtype"):
        device = st.selectbox("Device", DEVICES, key="model_device_choice")
        dtype = st.selectbox("dtype", DTYPES, key="model_dtype_choice")
    state.model_name, state.model_device, state.model_dtype = name, device, dtype
    return name, device, dtype


def _accept_licence_terms(key: str) -> Optional[bool]:
    """Before the first fetch of a model under licence terms (Gemma), the user reads and accepts them.

    ``True`` once accepted, ``False`` where the model has no terms, ``None`` (after showing the terms
    and a checkbox) while they are not accepted.
    """
    if not offline_spec(key).needs_acceptance:
        return False
    st.info(terms_notice(key))
    if st.checkbox("I have read and accept these terms", key=f"accept_terms_{key}"):
        return True
    st.warning("The model is fetched once you accept its terms.")
    return None


def load_sidebar_model() -> Optional[LoadedModel]:
    """Draw the model picker and return the loaded model, or ``None`` after showing why not."""
    name, device, dtype = _model_picker()
    known = KNOWN_MODELS.get(name.lower())
    try:
        if known is not None and known.kind == "offline" and not is_fetched(known.target):
            accepted = _accept_licence_terms(known.target)
            if accepted is None:
                return None
            with st.status(f"First start: fetching {name} (about 30 s, once)", expanded=True):
                fetch_offline_model(known.target, progress=progress_bar("Fetching the offline model"),
                                    accept_terms=accepted)
        with st.spinner(f"Loading {name}..."):
            loaded = _load_cached(name, device, dtype)
    except HeadVisError as err:
        st.sidebar.error(f"Could not load {name}")
        st.error(str(err))
        return None
    info = loaded.info
    gqa = f", {info.n_kv_heads} KV heads" if info.is_gqa else ""
    st.sidebar.caption(f"**{info.name}** on {info.device} ({info.dtype}): {info.n_params / 1e6:.0f}M parameters, "
                       f"{info.n_layers} layers x {info.n_heads} heads{gqa}, context {info.n_ctx}")
    set_query_params(model=name)
    return loaded


def page_setup(title: str, icon: str = ":material/visibility:") -> LoadedModel:
    """Configure the page, draw the shared sidebar and return the model (or stop the run)."""
    st.set_page_config(page_title=f"{title} - HeadVis Workbench", page_icon=icon, layout="wide")
    _note_visit(title)
    st.title(title)
    loaded = load_sidebar_model()
    if loaded is None:
        st.stop()
    return loaded


def set_query_params(**params: Any) -> None:
    """Write view state into the URL so that it reopens the same view; ``None`` removes a key.

    For state that is not one widget's value (the model, the head shared between pages, a stored
    scan). A widget's own value goes into the URL by ``bind="query-params"`` with the parameter's
    name as its key; a parameter bound so is left to its widget here.
    """
    for key, value in params.items():
        try:
            if value is None:
                if key in st.query_params:
                    del st.query_params[key]
            elif st.query_params.get(key) != str(value):
                st.query_params[key] = str(value)
        except StreamlitAPIException:
            continue  # a widget on this page is bound to the parameter (?layer= on Edge attribution): it owns it


def repair_url(lists: tuple[str, ...] = (), flags: tuple[str, ...] = (), integers: tuple[str, ...] = (),
               rewrites: Optional[dict[str, Optional[str]]] = None) -> None:
    """Put URL parameters into the form that widgets bound with ``bind="query-params"`` read.

    ``lists``: an old link's comma list (``?heads=1.2,0.3``) becomes repeated parameters
    (``?heads=1.2&heads=0.3``) for a multiselect. ``flags``: an old link's ``1``/``0`` becomes
    ``true``/``false`` for a checkbox. ``integers``: a value that is not a finite number
    (``?n=inf``, ``?n=1e400``) is dropped, because Streamlit 1.67 raises OverflowError, not a
    clean fallback to the default, when it seeds an integer widget with one. ``rewrites``: parameters
    the page has read and rewrites as given (``None`` removes one), such as a HeadVis link's tab
    name translated into the page's.

    Call it before the page draws its bound widgets: a widget seeds itself from the URL the run
    started with, so after a repair the page reruns once with the new URL.
    """
    repaired = {}
    for key in lists:
        values = st.query_params.get_all(key)
        if len(values) == 1 and "," in values[0]:
            repaired[key] = [part.strip() for part in values[0].split(",") if part.strip()]
    for key in flags:
        if st.query_params.get(key) in ("0", "1"):
            repaired[key] = "true" if st.query_params[key] == "1" else "false"
    for key in integers:
        if key in st.query_params and not _finite_number(st.query_params[key]):
            repaired[key] = None
    for key, value in (rewrites or {}).items():
        if st.query_params.get(key) != value:
            repaired[key] = value
    changed = False
    for key, value in repaired.items():
        try:  # a parameter bound earlier in this session cannot be changed here: leave it to the widget
            if value is None:
                if key in st.query_params:
                    del st.query_params[key]
                    changed = True
            else:
                st.query_params[key] = value
                changed = True
        except StreamlitAPIException:
            continue
    if changed:
        st.rerun()


def claim_shared_keys(defaults: dict[str, Any]) -> None:
    """Take back widget keys that several pages bind to the same URL parameter.

    ``?heads=`` is a list of heads on the Prompt lab and a text on the Circuit graph and Prompt
    sweeps; a value one page set in code stays in the session and would reach another page's
    widget of the same key. Call this before drawing the widgets: on the first run of each visit
    to the page, every key gets back the value this page left (see :func:`mark_shared_keys`),
    or ``defaults[key]`` on a first visit. A URL's own value still wins on a page's first run.
    """
    state = st.session_state
    page, visit = state.get("visit_page"), state.get("visit_number")
    claimed = state.setdefault(f"shared_keys_visit@{page}", {})
    left = state.get(f"shared_keys@{page}", {})
    for key, default in defaults.items():
        if claimed.get(key) != visit:
            claimed[key] = visit
            state[key] = left.get(key, default)


def mark_shared_keys(keys: tuple[str, ...]) -> None:
    """Record what this page's widgets hold under shared keys (call it after drawing them)."""
    state = st.session_state
    left = state.setdefault(f"shared_keys@{state.get('visit_page')}", {})
    left.update({key: state.get(key) for key in keys})


def _note_visit(page: str) -> None:
    """Count visits to pages: a run of another page than the last one starts a new visit."""
    state = st.session_state
    if state.get("visit_page") != page:
        state["visit_page"] = page
        state["visit_number"] = state.get("visit_number", 0) + 1


def _finite_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return True  # not a number at all: the widget itself falls back to its default


def query_param(key: str, default: Optional[str] = None) -> Optional[str]:
    return _query_param(key) or default


def query_choice(key: str, options, default: str) -> str:
    """A URL parameter that must be one of ``options`` (anything else gives ``default``)."""
    value = _query_param(key)
    return value if value in options else default


def query_float(key: str, default: Optional[float] = None) -> Optional[float]:
    """A URL parameter read as a float (missing or unreadable gives ``default``)."""
    try:
        return float(query_param(key, ""))
    except ValueError:
        return default


def query_int(key: str, default: int, low: int, high: int) -> int:
    """A URL parameter read as an int and clamped to [low, high] (unreadable gives ``default``)."""
    try:
        return min(max(int(query_param(key, str(default))), low), high)
    except ValueError:
        return default


def selected_head(loaded: LoadedModel) -> Optional[HeadRef]:
    """The head chosen on any page: session state first, then ``?layer=&head=`` in the URL."""
    head = st.session_state.get("selected_head")
    if head is None and _query_param("layer") is not None and _query_param("head") is not None:
        try:
            head = HeadRef(int(_query_param("layer")), int(_query_param("head")))
        except ValueError:
            head = None
    if head is not None:
        try:
            head.check(loaded.info.n_layers, loaded.info.n_heads)
        except InputError as err:
            st.warning(f"{err} Ignoring the selected head from the URL.")
            set_selected_head(None)  # warn once, and drop it from the URL
            return None
    return head


def set_selected_head(head: Optional[HeadRef]) -> None:
    st.session_state["selected_head"] = head
    set_query_params(layer=None if head is None else head.layer, head=None if head is None else head.head)


def remember(key: str, loaded: LoadedModel, value: Any) -> None:
    """Leave a result for other pages, tied to the model that produced it."""
    st.session_state[f"{key}@{model_key(loaded)}"] = value


def recall(key: str, loaded: LoadedModel, default: Any = None) -> Any:
    return st.session_state.get(f"{key}@{model_key(loaded)}", default)


def download_table(df, filename: str, label: str = "Download CSV") -> None:
    st.download_button(label, df.to_csv(index=False).encode("utf-8"), file_name=filename, mime="text/csv",
                       key=f"download-{filename}")


def download_figure(fig, filename: str, label: str = "Download figure (HTML)") -> None:
    """The plotly figure as standalone HTML (plotly.js inlined, so it opens offline)."""
    html = fig.to_html(include_plotlyjs=True, full_html=True)
    st.download_button(label, html.encode("utf-8"), file_name=filename, mime="text/html",
                       key=f"download-{filename}")


def corpus_roots() -> list[Path]:
    """The folders the app may read corpora from: ``$HEADVIS_CORPUS_ROOTS``, else the operator's setting
    ``corpus_roots = ["/data/texts", ...]`` in ``.streamlit/secrets.toml``, else the defaults of
    :func:`headvis_core.data.roots.allowed_roots`."""
    try:
        configured = st.secrets.get("corpus_roots")
    except Exception:  # no secrets file, or one Streamlit cannot parse: the defaults
        configured = None
    if isinstance(configured, str):
        configured = [configured]
    return allowed_roots([str(c) for c in configured] if configured else None)


def corpus_roots_help() -> str:
    """The help text of a corpus box: which folders the app may read, and who sets them."""
    return ("The app reads corpora only under the allowed corpus roots: "
            + ", ".join(str(root) for root in corpus_roots())
            + ". A name like gutenberg is looked up under each root; the operator sets the roots with "
              "HEADVIS_CORPUS_ROOTS or corpus_roots in .streamlit/secrets.toml.")


def page_url(page_file: str, query: dict[str, Any]) -> str:
    """The relative URL of a page of this app (``pages/7_Edge_attribution.py`` -> ``Edge_attribution?...``).

    A relative link, not ``st.page_link``: it also works where the page runs alone (AppTest), and the
    query string is URL-encoded, so a prompt with any characters survives the trip.
    """
    name = re.sub(r"^\d+_", "", Path(page_file).stem)
    query = {key: value for key, value in query.items() if value is not None}
    return f"{name}?{urlencode(query, doseq=True)}" if query else name


def link_to_page(page_file: str, label: str, query: dict[str, Any]) -> None:
    """A markdown link to another page with its URL parameters (the label's markdown is escaped)."""
    st.markdown(f"[{escape_markdown(label)}]({page_url(page_file, query)})")


def recompute_button(key: str) -> bool:
    """A "Recompute" button: True on the run it was pressed (pass it as ``refresh=`` to ``cached``)."""
    return st.button("Recompute", key=key, icon=":material/refresh:",
                     help="Compute this result again and replace the stored one.")


def show_stored(stored: Any, what: str = "") -> None:
    """When a result from the result store was computed, and what the store repaired (as warnings).

    ``stored`` is a :class:`headvis_core.store.Stored`; a damaged stored value is recomputed by the
    store, and its note says so here.
    """
    for note in stored.notes:
        st.warning(note)
    label = f"{what}: " if what else ""
    st.caption(f"{label}{stored.describe()}")


def show_html(html: str, height: int | str = "content") -> None:
    """Show a self-contained HTML document (its text already escaped by the core) in an iframe."""
    st.iframe(html, height=height)


def escape_markdown(text: str) -> str:
    """``text`` shown literally by ``st.markdown``/``st.caption``/``st.error``: a value from the URL or a
    user's input can hold markdown (a link, emphasis) that would otherwise render."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!<>|~$:])", r"\\\1", text)
