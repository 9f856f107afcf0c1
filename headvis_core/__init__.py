"""HeadVis Workbench core: analysis of attention heads on TransformerLens 4.

Plain functions and dataclasses on tensors and DataFrames; no Streamlit.
"""

__version__ = "0.1.0"
