"""Helpers for the page tests."""

WIDGET_TYPES = ("selectbox", "multiselect", "radio", "text_input", "text_area", "number_input", "slider", "checkbox")


def bound_params(at) -> set[str]:
    """The URL parameters the page's widgets are bound to (``bind="query-params"``)."""
    return {w.proto.query_param_key for kind in WIDGET_TYPES for w in at.get(kind) if w.proto.query_param_key}
