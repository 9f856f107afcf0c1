import pandas as pd

from headvis_core.atlas.selection import opening_head
from headvis_core.heads import HeadRef


def test_opening_head_is_the_most_confident_specific_behaviour():
    table = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1],
                          "behaviour": ["attention-sink", "induction", "previous-token", "unclassified"],
                          "confidence": [0.99, 0.6, 0.6, 0.95]})
    assert opening_head(table) == HeadRef(0, 1)  # 0.6 tie: the earlier row
    only_vague = table[table.behaviour.isin(["attention-sink", "unclassified"])]
    assert opening_head(only_vague) == HeadRef(0, 0)
