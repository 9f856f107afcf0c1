"""HeadVis `data/` trees: export a scan, validate, import, custom sequences and deep links (see README.md)."""
