"""HeadVis Workbench core: analysis of attention heads on TransformerLens 4.

Plain functions and dataclasses on tensors and DataFrames; no Streamlit.
"""

from importlib.metadata import version

__version__ = version("headvis-workbench")  # one source of truth: pyproject.toml
