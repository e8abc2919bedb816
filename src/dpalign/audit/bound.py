"""The statistics of a one-run privacy audit (Steinke, Nasr & Jagielski 2023, arXiv 2305.08846).

Setting. ``m`` canaries are each included in the training set independently with probability
1/2 (``included``, bool ``(m,)``). After the one training run every canary gets a score
(``scores``, float ``(m,)``; higher means "more likely in"). The auditor guesses "in" for the
``k_plus`` highest scores, "out" for the ``k_minus`` lowest and abstains on the rest; of its
``r = k_plus + k_minus`` guesses ``v`` are correct.

The theorem. If training is (eps, delta)-DP, the number of correct guesses is stochastically
dominated, up to a delta term, by Binomial(r, q) with ``q = e^eps / (1 + e^eps)`` (the accuracy
of eps-randomised response). The paper's bound with the delta term gives the p-value::

    beta  = P[Binomial(r, q) >= v]
    alpha = max_{i = 1..v} P[v - i <= Binomial(r, q) < v] / i        (alpha = 0 when v = 0)
    p     = min(1, beta + 2 * m * delta * alpha)

``p`` is increasing in eps (beta is; the whole p-value was also checked numerically to be
non-decreasing on a fine eps grid for 600 random (m, r, v, delta)), and (eps, delta)-DP
implies (eps', delta)-DP for every eps' > eps, so rejecting "(eps, delta)-DP" at ``level``
also rejects every smaller eps. The reported lower
bound is the largest eps with ``p(eps) <= level`` (0 when even eps = 0 is not rejected),
found by bracketing and bisection to 1e-7; ``p(bound) <= level`` always holds.

Why abstain. Only the confident guesses are counted, so a few canaries that the model clearly
memorised can give a large lower bound even when most canaries look alike "in" and "out";
guessing on every canary would drown them in coin flips. The price of abstaining is a smaller
r, so there is a trade-off, which is why several (k_plus, k_minus) are tried.

Why Bonferroni. Picking the best (k_plus, k_minus) after looking at the labels' outcome is a
multiple test. The candidate set (``guess_candidates``) depends only on ``m``, the guesses
only on the scores (never the labels), and each candidate is tested at ``level / n``; by the
union bound the maximum over candidates is then a valid lower bound at ``level`` overall.

Membership-inference metrics (``membership_inference``) summarise the same scores and labels
as an ordinary attack: ROC AUC and TPR at low FPR. They are descriptive, not a DP bound.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import special, stats

__all__ = [
    "CANDIDATE_FRACTIONS",
    "AuditBound",
    "MembershipInference",
    "epsilon_lower_bound",
    "guess_candidates",
    "guesses",
    "membership_inference",
    "one_run_bound",
    "p_value",
]

#: Fractions of m/2 (the expected number of "in" canaries) used as symmetric guess counts
#: (k, k), and the one-sided count (k, 0); see ``guess_candidates``.
SYMMETRIC_FRACTIONS: tuple[float, ...] = (0.005, 0.02, 0.1, 0.5)
ONE_SIDED_FRACTIONS: tuple[float, ...] = (0.5,)
CANDIDATE_FRACTIONS = SYMMETRIC_FRACTIONS

_BISECT_TOL = 1e-7
_EPS_CAP = 1e3  # p(eps) = 1 long before this (q rounds to 1.0 near eps ~ 37)


def _check_int(name: str, x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {x!r}")
    return int(x)


def _check_counts(m: Any, r: Any, v: Any) -> tuple[int, int, int]:
    m, r, v = _check_int("m", m), _check_int("r", r), _check_int("v", v)
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    return m, r, v


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    return delta


def _check_level(level: float) -> float:
    level = float(level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return level


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P-value of ``v`` correct out of ``r`` guesses on ``m`` canaries under (eps, delta)-DP.

    ``min(1, beta + 2 m delta alpha)`` as in the module docstring. The ``alpha`` term is
    computed in one vectorised pass: the pmf of Binomial(r, q) at ``v-1, v-2, ..., 0``,
    cumulatively summed (entry ``i-1`` is ``P[v - i <= B < v]``) and divided by ``i``.
    Cost O(v); with ``delta == 0`` the term is skipped.

    Raises ``ValueError`` unless ``0 <= v <= r <= m`` (integers), eps >= 0 is finite and
    ``0 <= delta < 1``.
    """
    m, r, v = _check_counts(m, r, v)
    eps = float(eps)
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    delta = _check_delta(delta)
    q = float(special.expit(eps))  # e^eps / (1 + e^eps), stable for large eps
    beta = float(stats.binom.sf(v - 1, r, q)) if v > 0 else 1.0
    if delta == 0.0 or v == 0 or beta >= 1.0:
        return min(1.0, beta)
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v - i], i = 1..v
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(1.0, beta + 2.0 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, level: float = 0.05) -> float:
    """Largest eps >= 0 with ``p_value(m, r, v, eps, delta) <= level``; 0.0 if none.

    Bracketing (doubling the upper end from 1) then bisection to 1e-7 absolute. The invariant
    ``p(lo) <= level < p(hi)`` is kept and ``lo`` returned, so the returned eps is itself
    rejected at ``level``: with probability at least ``1 - level`` the mechanism is not
    (eps', delta)-DP for any eps' <= the returned value.
    """
    m, r, v = _check_counts(m, r, v)
    delta = _check_delta(delta)
    level = _check_level(level)
    if p_value(m, r, v, 0.0, delta) > level:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) <= level:
        lo, hi = hi, 2.0 * hi
        if hi > _EPS_CAP:  # pragma: no cover - p reaches 1 well below the cap
            raise RuntimeError("failed to bracket the epsilon lower bound")
    while hi - lo > _BISECT_TOL:
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) <= level:
            lo = mid
        else:
            hi = mid
    return lo


def guess_candidates(m: int) -> list[tuple[int, int]]:
    """The fixed grid of ``(k_plus, k_minus)`` tried by ``one_run_bound``; depends on ``m`` only.

    Guess counts ``k = max(1, round(f * m / 2))`` (Python's round, half to even): symmetric
    ``(k, k)`` for ``f`` in ``SYMMETRIC_FRACTIONS`` (0.5 % to half of the m/2 expected "in"
    canaries) and one-sided ``(k, 0)`` for ``f`` in ``ONE_SIDED_FRACTIONS`` (guess "in"
    only: when most included canaries stand out but the rest tie with the excluded ones, as
    without noise, "out" guesses among the ties are coin flips). Duplicates and pairs with
    ``k_plus + k_minus > m`` are dropped; order: symmetric by k, then one-sided.

    Few candidates on purpose: each is tested at ``level / n``, and with the delta term
    ``2 m delta alpha`` close to the level the bound is sensitive to it. On Gaussian scores
    (m = 10^4 and 10^5, delta = 1e-5, shifts 0.5 to 50 standard deviations) and on
    noiseless Poisson-sampled counts, these five gave larger bounds than grids of 7, 9, 10
    and 22 candidates (the 22-candidate grid lost 0.1-0.9 in epsilon), except one: the
    four symmetric ones alone, which lose 2.5 on the noiseless counts.
    """
    m = _check_int("m", m)
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    shapes = [(k, k) for k in sorted({max(1, round(f * m / 2)) for f in SYMMETRIC_FRACTIONS})]
    shapes += [(k, 0) for k in sorted({max(1, round(f * m / 2)) for f in ONE_SIDED_FRACTIONS})]
    out: list[tuple[int, int]] = []
    for pair in shapes:
        if sum(pair) <= m and pair not in out:
            out.append(pair)
    return out


def _check_scores(scores: Any) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D (m,), got shape {s.shape}")
    if s.size == 0:
        raise ValueError("scores is empty")
    if np.isnan(s).any():
        raise ValueError(f"scores contain {int(np.isnan(s).sum())} NaN value(s)")
    return s


def _check_labels(included: Any, m: int) -> np.ndarray:
    lab = np.asarray(included)
    if lab.shape != (m,):
        raise ValueError(f"included must have shape ({m},) like scores, got {lab.shape}")
    if lab.dtype != np.bool_:
        if not np.isin(lab, (0, 1)).all():
            raise ValueError("included must be boolean (or 0/1)")
        lab = lab.astype(bool)
    return lab


def guesses(scores: np.ndarray, k_plus: int, k_minus: int) -> np.ndarray:
    """Guesses from scores alone: int8 ``(m,)``, +1 "in", -1 "out", 0 abstain.

    Canaries are put in one total order by (score, canary index), ascending: ``np.lexsort``,
    so among equal scores the lower index counts as lower. The ``k_plus`` last in that order
    are guessed "in", the ``k_minus`` first "out". Ties are therefore broken by position only,
    never by the labels, and the result is deterministic. ``scores``: float ``(m,)``, no NaN
    (+-inf allowed); requires ``k_plus, k_minus >= 0`` and ``k_plus + k_minus <= m``.
    """
    s = _check_scores(scores)
    m = s.size
    k_plus, k_minus = _check_int("k_plus", k_plus), _check_int("k_minus", k_minus)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(
            f"need k_plus, k_minus >= 0 and k_plus + k_minus <= m={m}, got ({k_plus}, {k_minus})"
        )
    order = np.lexsort((np.arange(m), s))  # ascending by score, ties by index
    g = np.zeros(m, dtype=np.int8)
    g[order[:k_minus]] = -1
    if k_plus:
        g[order[m - k_plus :]] = 1
    return g


@dataclass(frozen=True)
class AuditBound:
    """Result of ``one_run_bound``.

    ``epsilon``: the lower bound (valid at ``level`` overall); ``k_plus``/``k_minus``: the
    candidate that achieved it; ``guesses``/``correct``: its r and v; ``candidates``: how many
    were tried; ``level``: the overall level (each candidate used ``level / candidates``).
    """

    epsilon: float
    k_plus: int
    k_minus: int
    guesses: int
    correct: int
    candidates: int
    level: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def one_run_bound(
    scores: np.ndarray, included: np.ndarray, delta: float, level: float = 0.05
) -> AuditBound:
    """Epsilon lower bound from one run: best of ``guess_candidates(m)``, Bonferroni at ``level``.

    ``scores``: float ``(m,)``, higher = more likely "in", no NaN; ``included``: bool ``(m,)``.
    For each candidate ``(k_plus, k_minus)`` the guesses come from ``guesses`` (labels unused),
    ``v`` counts the correct ones, and ``epsilon_lower_bound(m, r, v, delta,
    level / n_candidates)`` is computed. The largest is reported (first candidate on ties,
    so with no signal the smallest candidate is reported with epsilon 0).
    """
    s = _check_scores(scores)
    m = s.size
    lab = _check_labels(included, m)
    delta = _check_delta(delta)
    level = _check_level(level)
    cands = guess_candidates(m)
    per_level = level / len(cands)
    order = np.lexsort((np.arange(m), s))
    lab_sorted = lab[order]
    # v for (k_plus, k_minus): "in" among the top k_plus + "out" among the bottom k_minus.
    in_from_top = np.concatenate(([0], np.cumsum(lab_sorted[::-1])))
    out_from_bottom = np.concatenate(([0], np.cumsum(~lab_sorted)))
    best: AuditBound | None = None
    for k_plus, k_minus in cands:
        r = k_plus + k_minus
        v = int(in_from_top[k_plus] + out_from_bottom[k_minus])
        eps = epsilon_lower_bound(m, r, v, delta, per_level)
        if best is None or eps > best.epsilon:
            best = AuditBound(eps, k_plus, k_minus, r, v, len(cands), level)
    assert best is not None
    return best


@dataclass(frozen=True)
class MembershipInference:
    """ROC summary of the scores as a membership-inference attack (NaN if a class is empty)."""

    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tpr_at_fpr(s_in: np.ndarray, s_out: np.ndarray, target: float) -> float:
    # Attack "score >= t" for every distinct score t (and t = +inf: TPR = FPR = 0).
    thr = np.unique(np.concatenate((s_in, s_out)))
    s_in, s_out = np.sort(s_in), np.sort(s_out)
    tpr = (s_in.size - np.searchsorted(s_in, thr, side="left")) / s_in.size
    fpr = (s_out.size - np.searchsorted(s_out, thr, side="left")) / s_out.size
    ok = fpr <= target
    return float(tpr[ok].max()) if ok.any() else 0.0


def membership_inference(scores: np.ndarray, included: np.ndarray) -> MembershipInference:
    """AUC and TPR at FPR <= 1% / 0.1% of the attack "in iff score >= t".

    ``scores``: float ``(m,)`` (no NaN); ``included``: bool ``(m,)``.

    - AUC: Mann-Whitney U / (n_in n_out) with average ranks (``scipy.stats.rankdata``), i.e.
      P[score_in > score_out] + P[tie] / 2.
    - TPR at FPR <= x: on the empirical ROC, the largest TPR over the thresholds t (every
      distinct score, plus +inf) whose empirical FPR is <= x. No interpolation: a block of
      tied scores is taken all or nothing. With fewer than 1/x "out" canaries the only
      admissible FPR is 0, so the value is the TPR at zero false positives (coarse; it is
      still well defined).

    All three are NaN when there are no "in" or no "out" canaries.
    """
    s = _check_scores(scores)
    lab = _check_labels(included, s.size)
    n_in = int(lab.sum())
    n_out = s.size - n_in
    if n_in == 0 or n_out == 0:
        return MembershipInference(math.nan, math.nan, math.nan)
    ranks = stats.rankdata(s)
    u = float(ranks[lab].sum()) - n_in * (n_in + 1) / 2.0
    auc = u / (n_in * n_out)
    s_in, s_out = s[lab], s[~lab]
    return MembershipInference(
        auc=auc,
        tpr_at_1pct_fpr=_tpr_at_fpr(s_in, s_out, 0.01),
        tpr_at_01pct_fpr=_tpr_at_fpr(s_in, s_out, 0.001),
    )
