"""A sweep's result: one row per value with the measured columns, and which of them are curves."""

from dataclasses import dataclass
from typing import Optional

import pandas as pd

from headvis_core.heads import HeadRef
from headvis_core.sweeps.plan import SweepPlan


def attention_column(head: HeadRef) -> str:
    return f"attn {head}"


def prob_column(label: str) -> str:
    return f"p[{label}]"


def logit_column(label: str) -> str:
    return f"logit[{label}]"


@dataclass
class SweepResult:
    """The sweep's table (one row per value) and what its curves are."""

    table: pd.DataFrame  # slot values, prompt, n_tokens, query/key tokens, then the measured columns
    plan: SweepPlan
    heads: list[HeadRef]
    curves: list[str]  # numeric measured columns, in display order
    greater_than_method: Optional[str] = None  # "whole" (one token per number) or "digits"

    @property
    def swept(self) -> list[str]:
        return self.plan.swept
