"""AT-EDM at run time: each bucket's graph as built, nothing carried between steps."""

from __future__ import annotations

from runtime.policies import StepPolicy


class ATEDMPolicy(StepPolicy):
    rows_independent = True  # importance, top-k and refill are computed per row


POLICY = ATEDMPolicy
