"""The settings of an audit (``dpalign audit``, a study's ``audit:`` section)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dpalign.config import Section

DEFAULT_CANARIES = {"gradient": 10_000, "input": 256}


class AuditConfig(Section):
    """One-run audit settings.

    ``kind``: ``gradient`` (white box: Dirac units in an audit vector, cheap, so 10^4 by
    default; tight on clipping, noise and accounting) or ``input`` (black box: preference
    pairs no real example resembles, trained like any pair; each costs a pair's forward and
    backward when sampled, so 256 by default). ``canaries``: m (default by kind).
    ``canary_norm``: a gradient canary's norm before clipping, in units of C (> 1, so
    that skipped clipping shows). ``level``: the audit's significance (0.05: the bound holds
    with 95 % confidence)."""

    kind: Literal["gradient", "input"] = Field(
        "gradient", description="gradient (white box, Dirac units) | input (black box, "
                                "unique pairs)")
    canaries: int | None = Field(None, ge=2, description="m (default: 10000 gradient, "
                                                         "256 input)")
    seed: int = Field(0, ge=0, description="which canaries are in, and their batches")
    canary_norm: float = Field(10.0, gt=0, description="gradient canary norm / C")
    level: float = Field(0.05, gt=0, lt=1, description="significance of the bound")

    @property
    def m(self) -> int:
        """The number of canaries (``canaries`` or the kind's default)."""
        return self.canaries if self.canaries is not None else DEFAULT_CANARIES[self.kind]
