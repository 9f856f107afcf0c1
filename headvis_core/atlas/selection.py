"""Which head the Head atlas opens on when none is chosen."""

import pandas as pd

from headvis_core.atlas.classes import SINK, UNCLASSIFIED
from headvis_core.heads import HeadRef

# Behaviours that say least about a head: most heads of a model are sinks (Xiao et al. 2023).
UNINFORMATIVE = (UNCLASSIFIED, SINK)


def opening_head(table: pd.DataFrame) -> HeadRef:
    """The most confident head of a specific behaviour in an atlas table (``layer, head,
    behaviour, confidence``); ties go to the earlier row, and with no specific behaviour at all,
    the table's first head."""
    specific = table[~table["behaviour"].isin(UNINFORMATIVE)]
    ranked = specific.sort_values("confidence", ascending=False, kind="stable")
    row = (ranked if not ranked.empty else table).iloc[0]
    return HeadRef(int(row["layer"]), int(row["head"]))
