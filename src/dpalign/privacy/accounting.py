"""Privacy accounting: a frozen ledger of DP-SGD steps, turned into epsilon by `dp_accounting`.

A ``LedgerEntry`` describes ``steps`` identical steps of the subsampled Gaussian mechanism:
each step samples a batch of units (rate ``sample_rate``), clips every unit's gradient to C,
sums, and adds N(0, sigma^2 C^2) per coordinate. The ``Ledger`` is the tuple of entries in the
order they happened; consecutive identical entries merge, so 1,000 steps are one entry. It is
a value (frozen), it round-trips through JSON, and it lives in the checkpoint so a resumed run
continues it exactly.

Two ways of drawing a batch are accounted, each with its own neighbouring relation:

- ``"poisson"``: each unit joins independently with probability q (``privacy.sampling.
  poisson_batch``). Event: ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``, relation
  add-or-remove-one. Both accountants (PLD, RDP) support it.
- ``"shuffle"``: a fixed-size batch of B units drawn uniformly without replacement, afresh
  at every step (``privacy.sampling.shuffled_batch``; NOT one pass over a shuffled epoch,
  whose steps are not independent and which no `dp_accounting` event describes). Event:
  ``SampledWithoutReplacementDpEvent(n, B, GaussianDpEvent(sigma / 2))``, relation
  replace-one: replacing a unit moves the clipped sum by up to 2C, so the noise multiplier
  relative to that sensitivity is sigma / 2. Only the RDP accountant supports this event
  (Wang, Balle, Kasiviswanathan 2019); asking PLD for such a ledger falls back to RDP and
  the ``EpsilonResult`` says so in ``note``.

A ledger mixing both kinds is refused: the two relations cannot be composed in one accountant.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, get_args

import dp_accounting
from dp_accounting import NeighboringRelation, PrivacyAccountant
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

Sampling = Literal["poisson", "shuffle"]
SAMPLINGS: tuple[str, ...] = get_args(Sampling)

PLD_DISCRETIZATION = 1e-4
"""PLD value discretization: ~0.4 s for T=2250 steps at q=0.04 (1e-3 is 8x faster, and its
epsilon there is 7e-4 larger)."""

ACCOUNTANTS: dict[str, Callable[[NeighboringRelation], PrivacyAccountant]] = {
    "pld": lambda relation: PLDAccountant(relation, PLD_DISCRETIZATION),
    "rdp": lambda relation: RdpAccountant(neighboring_relation=relation),
}
FALLBACK_ACCOUNTANT = "rdp"

NEIGHBORING: dict[str, NeighboringRelation] = {
    "poisson": NeighboringRelation.ADD_OR_REMOVE_ONE,
    "shuffle": NeighboringRelation.REPLACE_ONE,
}


@dataclass(frozen=True)
class LedgerEntry:
    """``steps`` identical steps of the subsampled Gaussian mechanism.

    ``batch_size`` and ``n`` (the number of units) are required for ``"shuffle"``, where
    ``sample_rate`` must equal ``batch_size / n``; for ``"poisson"`` they are informational.
    ``sigma`` is the noise multiplier: the noise std is ``sigma * C``; sigma = 0 is a
    non-private step (epsilon becomes infinite).
    """

    sigma: float
    sample_rate: float
    steps: int = 1
    sampling: Sampling = "poisson"
    batch_size: int | None = None
    n: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"sigma (noise multiplier) must be finite and >= 0, got {self.sigma}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample rate must lie in (0, 1], got {self.sample_rate}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {list(SAMPLINGS)}, got {self.sampling!r}")
        if self.n is not None and self.n < 1:
            raise ValueError(f"n (number of units) must be >= 1, got {self.n}")
        if self.batch_size is not None and self.batch_size < 0:
            raise ValueError(f"batch size must be >= 0, got {self.batch_size}")
        if self.sampling == "shuffle":
            self._check_fixed_size()

    def _check_fixed_size(self) -> None:
        if self.batch_size is None or self.n is None:
            raise ValueError("shuffle sampling needs batch_size and n")
        if not 1 <= self.batch_size <= self.n:
            raise ValueError(f"batch size must lie in [1, n={self.n}], got {self.batch_size}")
        if not math.isclose(self.sample_rate, self.batch_size / self.n, rel_tol=1e-9):
            raise ValueError(f"shuffle sample rate {self.sample_rate} != batch_size / n = "
                             f"{self.batch_size}/{self.n}")

    def same_mechanism(self, other: LedgerEntry) -> bool:
        """True when ``other`` differs from this entry at most in ``steps``."""
        return dataclasses.replace(other, steps=self.steps) == self


@dataclass(frozen=True)
class Ledger:
    """What has been spent: entries in the order they happened (a value; record returns anew)."""

    entries: tuple[LedgerEntry, ...] = ()

    @property
    def steps(self) -> int:
        return sum(entry.steps for entry in self.entries)

    def append(self, entry: LedgerEntry) -> Ledger:
        """This ledger followed by ``entry``, merged into the last entry when identical."""
        if self.entries and self.entries[-1].same_mechanism(entry):
            last = self.entries[-1]
            merged = dataclasses.replace(last, steps=last.steps + entry.steps)
            return Ledger((*self.entries[:-1], merged))
        return Ledger((*self.entries, entry))

    def record(self, sigma: float, sample_rate: float, steps: int = 1, *,
               sampling: Sampling = "poisson", batch_size: int | None = None,
               n: int | None = None) -> Ledger:
        """This ledger plus ``steps`` steps of (sigma, sample_rate, ...)."""
        return self.append(LedgerEntry(sigma, sample_rate, steps, sampling, batch_size, n))

    def to_json(self) -> str:
        return json.dumps({"entries": [dataclasses.asdict(e) for e in self.entries]})

    @classmethod
    def from_json(cls, text: str) -> Ledger:
        return cls(tuple(LedgerEntry(**entry) for entry in json.loads(text)["entries"]))


def _poisson_event(entry: LedgerEntry) -> dp_accounting.DpEvent:
    return dp_accounting.PoissonSampledDpEvent(
        entry.sample_rate, dp_accounting.GaussianDpEvent(entry.sigma))


def _shuffle_event(entry: LedgerEntry) -> dp_accounting.DpEvent:
    # Replace-one sensitivity of the clipped sum is 2C: noise multiplier sigma*C / 2C.
    assert entry.n is not None and entry.batch_size is not None
    return dp_accounting.SampledWithoutReplacementDpEvent(
        entry.n, entry.batch_size, dp_accounting.GaussianDpEvent(entry.sigma / 2.0))


_SAMPLED_EVENTS: dict[str, Callable[[LedgerEntry], dp_accounting.DpEvent]] = {
    "poisson": _poisson_event,
    "shuffle": _shuffle_event,
}


def _entry_event(entry: LedgerEntry) -> dp_accounting.DpEvent:
    if entry.sigma == 0:
        step: dp_accounting.DpEvent = dp_accounting.NonPrivateDpEvent()
    else:
        step = _SAMPLED_EVENTS[entry.sampling](entry)
    return dp_accounting.SelfComposedDpEvent(step, entry.steps)


def to_dp_event(ledger: Ledger) -> dp_accounting.DpEvent:
    """The ``dp_accounting`` event describing everything in ``ledger`` (NoOp when empty)."""
    if not ledger.entries:
        return dp_accounting.NoOpDpEvent()
    events = [_entry_event(entry) for entry in ledger.entries]
    return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)


def neighboring_relation(ledger: Ledger) -> NeighboringRelation:
    """The neighbouring relation the ledger's guarantee is stated under."""
    relations = {NEIGHBORING[entry.sampling] for entry in ledger.entries}
    if len(relations) > 1:
        raise ValueError("the ledger mixes poisson and shuffle steps; their guarantees use "
                         "different neighbouring relations and cannot be composed")
    return relations.pop() if relations else NeighboringRelation.ADD_OR_REMOVE_ONE


@dataclass(frozen=True)
class EpsilonResult:
    """Epsilon at ``delta``, with the accountant that produced it and why, if not the asked."""

    epsilon: float
    delta: float
    accountant: str
    requested: str
    neighboring: str
    note: str | None = None


Spend = Ledger | tuple[float, float, int]


def _as_ledger(spend: Spend) -> Ledger:
    if isinstance(spend, Ledger):
        return spend
    sigma, sample_rate, steps = spend
    return Ledger().record(sigma, sample_rate, steps)


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")


def _resolve(accountant: str, ledger: Ledger) -> tuple[str, str | None]:
    """The accountant to use for ``ledger``: the asked one, or the fallback with a note."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {sorted(ACCOUNTANTS)}")
    relation = neighboring_relation(ledger)
    event = to_dp_event(ledger)
    if ACCOUNTANTS[accountant](relation).supports(event):
        return accountant, None
    if not ACCOUNTANTS[FALLBACK_ACCOUNTANT](relation).supports(event):
        raise ValueError(f"no accountant supports this ledger: {event}")
    kinds = sorted({entry.sampling for entry in ledger.entries})
    return FALLBACK_ACCOUNTANT, (f"{accountant} does not support {'/'.join(kinds)} sampling; "
                                 f"used {FALLBACK_ACCOUNTANT}")


def account(spend: Spend, delta: float, accountant: str = "pld") -> EpsilonResult:
    """Epsilon of ``spend`` (a ledger, or (sigma, q, steps) of Poisson DP-SGD) at ``delta``."""
    _check_delta(delta)
    ledger = _as_ledger(spend)
    used, note = _resolve(accountant, ledger)
    relation = neighboring_relation(ledger)
    engine = ACCOUNTANTS[used](relation)
    engine.compose(to_dp_event(ledger))
    return EpsilonResult(float(engine.get_epsilon(delta)), delta, used, accountant,
                         relation.name.lower(), note)


def epsilon(spend: Spend, delta: float, accountant: str = "pld") -> float:
    """``account(...).epsilon``: the number alone (see ``account`` for fallbacks)."""
    return account(spend, delta, accountant).epsilon


CALIBRATION_TOL = 1e-5
MIN_SIGMA = 1e-2


def _sigma_bracket(gap: Callable[[float], float], guess: float) -> tuple[float, float]:
    """(lo, hi) with gap(lo) > 0 >= gap(hi); gap falls as sigma grows. Steps down gently
    (x0.8): PLD gets slow at small sigma, and the tight sigma is close below the RDP one.
    """
    hi = guess
    while gap(hi) > 0:
        hi *= 2.0
    lo = hi * 0.8
    while gap(lo) <= 0:
        if lo < MIN_SIGMA:
            raise ValueError(f"the target epsilon is met even with sigma < {MIN_SIGMA}: "
                             "the target is too loose to calibrate")
        lo, hi = lo * 0.8, lo
    return lo, hi


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silence absl's WARNINGs (dp_accounting's RDP convergence notes) for a while."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@functools.lru_cache(maxsize=256)
def calibrate_sigma(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "pld", *, sampling: Sampling = "poisson",
                    n: int | None = None) -> float:
    """The smallest sigma (within 1e-5) whose epsilon after ``steps`` steps is <= target.

    For ``"shuffle"`` give ``n``; the batch size is ``sample_rate * n`` (an integer). The
    search is bracketed with the fast RDP accountant (an upper bound on epsilon), then
    refined by ``dp_accounting.calibrate_dp_mechanism`` with the requested accountant.
    A pure function of its arguments, cached per process (a PLD calibration at epsilon 8
    takes ~20 s on 2 cores; a run's checks, an audit and a study's seeds ask for the same).
    """
    _check_delta(delta)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target epsilon must be finite and > 0, got {target_epsilon}")
    batch_size = None if n is None else round(sample_rate * n)

    def ledger_for(sigma: float) -> Ledger:
        return Ledger().record(sigma, sample_rate, steps, sampling=sampling,
                               batch_size=batch_size, n=n)

    template = ledger_for(1.0)
    used, _ = _resolve(accountant, template)
    relation = neighboring_relation(template)

    def gap(sigma: float, name: str) -> float:
        return account(ledger_for(sigma), delta, name).epsilon - target_epsilon

    with _quiet_absl():  # RDP at small sigma warns per dropped order; the bracket is all we need
        rdp_lo, rdp_hi = _sigma_bracket(lambda s: gap(s, "rdp"), guess=1.0)
        rdp_sigma = dp_accounting.calibrate_dp_mechanism(
            lambda: ACCOUNTANTS["rdp"](relation), lambda s: to_dp_event(ledger_for(s)),
            target_epsilon, delta, dp_accounting.ExplicitBracketInterval(rdp_lo, rdp_hi),
            tol=CALIBRATION_TOL)
    if used == "rdp":
        return float(rdp_sigma)
    lo, hi = _sigma_bracket(lambda s: gap(s, used), guess=rdp_sigma)
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: ACCOUNTANTS[used](relation), lambda s: to_dp_event(ledger_for(s)),
        target_epsilon, delta, dp_accounting.ExplicitBracketInterval(lo, hi),
        tol=CALIBRATION_TOL))


def steps_within_budget(ledger: Ledger, step: LedgerEntry, target_epsilon: float,
                        delta: float, accountant: str = "pld", *, limit: int) -> int:
    """The most further steps like ``step`` (its ``steps`` ignored), up to ``limit``, that
    keep epsilon <= target. Binary search: O(log limit) accountant runs, so call it once
    before training rather than every step.
    """
    def fits(k: int) -> bool:
        more = ledger.append(dataclasses.replace(step, steps=k)) if k else ledger
        return account(more, delta, accountant).epsilon <= target_epsilon

    if not fits(0):
        return 0
    lo, hi = 0, limit  # fits(lo) holds; the answer lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def next_step_exceeds(ledger: Ledger, step: LedgerEntry, target_epsilon: float,
                      delta: float, accountant: str = "pld") -> bool:
    """Whether one more step like ``step`` would take epsilon above ``target_epsilon``."""
    return steps_within_budget(ledger, step, target_epsilon, delta, accountant, limit=1) == 0
