"""Dataset scans: each head's behaviour across a corpus (see :mod:`headvis_core.scan.run`).

``scans_root`` is read from :mod:`headvis_core.scan.store` at call time (tests point it elsewhere).
"""

from headvis_core.scan.params import ScanParams
from headvis_core.scan.result import DecileBucket, ScanExample, ScanResult, load_scan
from headvis_core.scan.run import run_scan
from headvis_core.scan.store import StoredScan, list_scans

__all__ = ["ScanParams", "ScanResult", "ScanExample", "DecileBucket", "StoredScan", "run_scan", "load_scan",
           "list_scans"]
