"""QK and OV attribution of one attention edge (issue #12): see README.md."""

from headvis_core.attribution.edge import EdgeAttribution, EdgeSpec, attribute_edge, attribute_edges

__all__ = ["EdgeAttribution", "EdgeSpec", "attribute_edge", "attribute_edges"]
