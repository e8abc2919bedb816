"""The study's answer, read in a minute: at most six sentences generated from the numbers and
a recommendation table (per mechanism, epsilon, K and loss: the tuned configuration, its test
figures with 95% CIs, its stable learning-rate window and whether it beats the base model).
The measures themselves are :mod:`dpalign.study.analysis`; trends use the rule of
:func:`dpalign.diagnostics.trends.trend`.

The sentences (each left out when the study lacks what it needs):

1. down to which epsilon the tuned DP runs come within :data:`CLOSE_TO_NO_DP` of the no-DP
   test held-out reward accuracy, per K;
2. down to which epsilon they beat the base (test held-out reward accuracy CI above chance,
   0.5; the base model's own is 0: every pair a tie), per K, and how often seeds beat the
   base's POPE-adversarial accuracy and CHAIR_s;
3. how wide the stable lr window is and whether it narrows as epsilon falls (only when the
   trend rule calls it);
4. how often runs collapse on held-out;
5. which settings (clipping, optimizer, lr, C) the tuned DP configurations use;
6. how the settings were chosen (private or public validation split);

and, when fewer than six of those apply, how many runs diverge (and at which epsilon).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from dpalign.diagnostics.trends import Estimate, VerdictThresholds, trend
from dpalign.report.fmt import format_epsilon, format_number
from dpalign.report.series import MECHANISM_NAMES
from dpalign.report.tables import Table, TableCell, cell
from dpalign.study.analysis import (
    CHANCE,
    COLLAPSE_DROP,
    OFFLINE,
    RECALL_COLLAPSE_RATIO,
    LrWindow,
    Recommendation,
    TuneSettings,
    collapse_fraction,
    collapsed,
    method_order,
    ok_runs,
)

__all__ = ["CLOSE_TO_NO_DP", "MAX_SENTENCES", "answer_rules", "answer_sentences",
           "recommendation_table", "window_text"]

CLOSE_TO_NO_DP = 0.05
"""A tuned DP configuration is "within reach of no DP" when its mean test held-out reward
accuracy is at most this much below the tuned no-DP configuration's (same K and loss)."""
MAX_SENTENCES = 6
DEFAULT_TUNE = TuneSettings()
DEFAULT_THRESHOLDS = VerdictThresholds()
HELDOUT = "final_heldout_reward_accuracy"
POPE = "final_pope_adversarial_accuracy"
CHAIR = "final_chair_s"


def _mech(name: str) -> str:
    return MECHANISM_NAMES.get(name, name)


def _eps(rec: Recommendation) -> float:
    return float(rec.tuned.group["epsilon_target"])


def _k(rec: Recommendation) -> int:
    return int(rec.tuned.group["k"])


def _method(rec: Recommendation) -> str:
    return str(rec.tuned.group.get("method", OFFLINE))


def _methods(recs: Sequence[Recommendation]) -> list[str]:
    """The study's alignment methods, offline first (:func:`method_order`)."""
    return sorted({_method(r) for r in recs}, key=method_order)


def _group_words(recs: Sequence[Recommendation]) -> str:
    """What a configuration is tuned per, as the sentences and rules name it."""
    return "mechanism, ε, K, loss" + (", method" if len(_methods(recs)) > 1 else "")


def _primary(recs: Sequence[Recommendation]) -> tuple[str, str] | None:
    """(mechanism, loss) the sentences speak about: DP-SGD when the study has it, else its
    first DP mechanism; the first loss."""
    private = [r for r in recs if r.tuned.private]
    if not private:
        return None
    mechanisms = {str(r.tuned.group["mechanism"]) for r in private}
    mechanism = "dp_sgd" if "dp_sgd" in mechanisms else sorted(mechanisms)[0]
    loss = str(private[0].tuned.group["loss"])
    return mechanism, loss


def _name(mechanism: str, loss: str, recs: Sequence[Recommendation]) -> str:
    several = len({str(r.tuned.group["loss"]) for r in recs}) > 1
    return f"{_mech(mechanism)} ({loss})" if several else _mech(mechanism)


def _by_k(recs: Sequence[Recommendation], mechanism: str, loss: str
          ) -> list[tuple[int, Recommendation | None, list[Recommendation]]]:
    """Per K: the tuned no-DP recommendation and the DP ones from large to small epsilon."""
    out = []
    for k in sorted({_k(r) for r in recs}):
        same = [r for r in recs if _k(r) == k and str(r.tuned.group["loss"]) == loss]
        nodp = next((r for r in same if not r.tuned.private), None)
        dp = sorted((r for r in same if r.tuned.private
                     and str(r.tuned.group["mechanism"]) == mechanism), key=lambda r: -_eps(r))
        if dp:
            out.append((k, nodp, dp))
    return out


def _down_to(dp: Sequence[Recommendation], ok: Any) -> tuple[Recommendation | None, bool]:
    """The last point of the walk from large to small epsilon before ``ok`` first fails,
    and whether every point passed."""
    last = None
    for rec in dp:
        if not ok(rec):
            return last, False
        last = rec
    return last, True


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else "; ".join(parts[:-1]) + " and " + parts[-1]


def _per_k(parts: Sequence[tuple[int, str]]) -> str:
    """Phrases holding ``{ks}``, one per K, joined; equal phrases share one mention
    (``down to ε=2 at K=4 and K=16``)."""
    ks: dict[str, list[int]] = {}
    for k, phrase in parts:
        ks.setdefault(phrase, []).append(k)
    return _join([phrase.format(ks=" and ".join(f"K={k}" for k in group))
                  for phrase, group in ks.items()])


def _close_sentence(recs: Sequence[Recommendation], mechanism: str, loss: str) -> str | None:
    parts: list[tuple[int, str]] = []
    for k, nodp, dp in _by_k(recs, mechanism, loss):
        if nodp is None or not nodp.tuned.test[HELDOUT].measured:
            continue
        ref = nodp.tuned.test[HELDOUT].mean

        def close(rec: Recommendation, ref: float = ref) -> bool:
            est = rec.tuned.test[HELDOUT]
            return est.measured and est.mean >= ref - CLOSE_TO_NO_DP

        last, every = _down_to(dp, close)
        if last is None:
            gap = ref - dp[0].tuned.test[HELDOUT].mean
            parts.append((k, f"at no tested ε at {{ks}} (already {format_number(gap)} below "
                             f"at {format_epsilon(_eps(dp[0]))})"))
        else:
            tail = "" if every else f", not at {format_epsilon(_eps(dp[dp.index(last) + 1]))}"
            parts.append((k, f"down to {format_epsilon(_eps(last))} at {{ks}} "
                             f"({format_number(last.tuned.test[HELDOUT].mean)} vs "
                             f"{format_number(ref)}{tail})"))
    if not parts:
        return None
    return (f"Tuned {_name(mechanism, loss, recs)} comes within {CLOSE_TO_NO_DP:g} of the "
            f"tuned no-DP test held-out reward accuracy {_per_k(parts)}.")


def _fraction(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _base_sentence(recs: Sequence[Recommendation], mechanism: str, loss: str,
                   base: Mapping[str, Any]) -> str | None:
    parts: list[tuple[int, str]] = []
    series = _by_k(recs, mechanism, loss)
    for k, _, dp in series:
        if not any(r.beats_base is not None for r in dp):
            continue
        last, every = _down_to(dp, lambda r: bool(r.beats_base))
        if last is None:
            parts.append((k, "at no tested ε at {ks}"))
        elif every:
            parts.append((k, f"at every ε down to {format_epsilon(_eps(last))} at {{ks}}"))
        else:
            parts.append((k, f"down to {format_epsilon(_eps(last))} at {{ks}} (not below it)"))
    if not parts:
        return None
    sentence = (f"It beats the base model (test held-out reward accuracy's 95% CI above "
                f"chance, {CHANCE:g}) {_per_k(parts)}")
    dp_recs = [r for _, _, dp in series for r in dp]
    extra = []
    pope = _fraction([r.versus_base.get("pope", math.nan) for r in dp_recs])
    chair = _fraction([r.versus_base.get("chair", math.nan) for r in dp_recs])
    if not math.isnan(pope):
        extra.append(f"{pope:.0%} of its tuned seeds beat the base's POPE-adversarial accuracy "
                     f"({format_number(base.get('pope_adversarial_accuracy'))})")
    if not math.isnan(chair):
        silenced = int(sum(r.versus_base.get("n_recall_collapsed", 0) for r in dp_recs))
        note = (f", {silenced} with recall below {RECALL_COLLAPSE_RATIO:g}× the base's not "
                f"counted" if silenced else "")
        extra.append(f"{chair:.0%} end below its CHAIR_s ({format_number(base.get('chair_s'))}"
                     f"{note})")
    return sentence + ("; " + " and ".join(extra) if extra else "") + "."


def window_text(window: LrWindow) -> str:
    """``1e-04 – 1e-03 (1 decade)``, ``3e-04 only (0 decades)``, ``none stable (of 4)``,
    ``one lr swept``."""
    if len(window.swept) <= 1:
        return "one lr swept" if window.swept else "—"
    if window.width is None:
        return f"none stable (of {len(window.swept)})"
    if window.low == window.high:
        return f"{window.low:.0e} only (0 decades)"
    return f"{window.low:.0e} – {window.high:.0e} ({_decades(window.width)})"


def _width_estimate(window: LrWindow) -> Estimate:
    width = window.width
    return Estimate() if width is None else Estimate(width, width, width, window.seeds)


def _window_sentence(recs: Sequence[Recommendation], mechanism: str, loss: str,
                     thresholds: VerdictThresholds) -> str | None:
    series = [(k, ([nodp] if nodp else []) + dp) for k, nodp, dp in _by_k(recs, mechanism, loss)]
    swept = [(k, s) for k, s in series if any(len(r.window.swept) > 1 for r in s)]
    if not swept:
        return None
    parts, calls = [], []
    for k, s in swept:
        ends = [r for r in s if len(r.window.swept) > 1]
        first, last = ends[0], ends[-1]
        at_last = ("" if last is first else
                   f" and {_width_words(last.window)} at {format_epsilon(_eps(last))}")
        parts.append(f"{_width_words(first.window)} at {format_epsilon(_eps(first))}"
                     f"{at_last} (K={k})")
        t = trend([_eps(r) for r in ends], [_width_estimate(r.window) for r in ends],
                  thresholds)
        calls.append(t.kind)
    if all(kind == "falls" for kind in calls):
        shape = "it narrows as ε falls"
    elif all(kind == "rises" for kind in calls):
        shape = "it widens as ε falls"
    else:
        shape = "there is no clear trend in its width as ε falls"
    return (f"The stable lr window (lrs where every seed converges without divergence or "
            f"held-out collapse) spans {_join(parts)}; {shape} (trend rule: end points "
            f"separate and |ρ| ≥ {thresholds.min_rho:g}).")


def _width_words(window: LrWindow) -> str:
    width = window.width
    return "no stable lr" if width is None else _decades(width)


def _decades(width: float) -> str:
    return f"{width:.2g} decade{'' if f'{width:.2g}' == '1' else 's'}"


def _collapse_sentence(runs: pd.DataFrame, recs: Sequence[Recommendation]) -> str | None:
    ok = ok_runs(runs)
    fraction = collapse_fraction(ok)
    if math.isnan(fraction):
        return None
    n = int(collapsed(ok).sum())
    tuned = _fraction([r.collapse for r in recs])
    tail = (f" ({tuned:.0%} of the tuned configurations' runs)"
            if not math.isnan(tuned) else "")
    return (f"{n} of {len(ok)} finished runs ({fraction:.0%}) collapse on held-out, losing "
            f"more than {COLLAPSE_DROP:g} reward accuracy between their best and final "
            f"evaluation{tail}.")


def _divergence_sentence(runs: pd.DataFrame) -> str | None:
    ok = ok_runs(runs)
    if "diverged" not in ok or ok.empty:
        return None
    hit = ok[ok["diverged"].fillna(False).astype(bool)]
    if hit.empty:
        return f"None of the {len(ok)} finished runs diverges."
    worst = max(float(e) for e in hit["epsilon_target"])
    where = ("including runs without DP" if math.isinf(worst) else
             f"all at {format_epsilon(worst)} or below")
    return f"{len(hit)} of {len(ok)} finished runs ({len(hit) / len(ok):.0%}) diverge, {where}."


_SETTING_WORDS = (("clipping", "clipping"), ("optimizer", "optimizer"))
_RANGE_WORDS = (("lr", "lr"), ("max_grad_norm", "C"), ("sample_rate", "sample rate"))


def _settings_sentence(recs: Sequence[Recommendation]) -> str | None:
    private = [r.tuned for r in recs if r.tuned.private]
    if not private:
        return None
    n = len(private)
    parts = []
    for column, word in _SETTING_WORDS:
        values = [c.settings.get(column) for c in private if c.settings.get(column) is not None]
        if values:
            value, count = Counter(map(str, values)).most_common(1)[0]
            parts.append(f"{word} {value} ({count} of {n})")
    for column, word in _RANGE_WORDS:
        values = sorted(float(c.settings[column]) for c in private
                        if isinstance(c.settings.get(column), int | float)
                        and not math.isnan(float(c.settings[column])))
        if values:
            span = (format_number(values[0]) if values[0] == values[-1] else
                    f"{format_number(values[0])} to {format_number(values[-1])}")
            parts.append(f"{word} {span}")
    if not parts:
        return None
    tuned = sum(c.basis == "validation" for c in private)
    return (f"The {n} DP configurations ({tuned} chosen among several by validation) use "
            f"{_join(parts)}.")


def _tuning_sentence(recs: Sequence[Recommendation], tune: TuneSettings) -> str:
    if not any(r.tuned.basis == "validation" for r in recs):
        return ("No configuration was chosen by tuning (one configuration per group, or no "
                f"{tune.metric} recorded): figures are at the study's settings.")
    if tune.split == "public":
        return (f"Settings were chosen per ({_group_words(recs)}) by mean {tune.metric} on a "
                f"public validation split, which spends no privacy; figures are on the "
                f"disjoint test split.")
    return (f"Settings were chosen per ({_group_words(recs)}) by mean {tune.metric} on the "
            f"private validation split, itself a release that ε does not count (Papernot & "
            f"Steinke 2022); figures are on the disjoint test split.")


def answer_sentences(recs: Sequence[Recommendation], runs: pd.DataFrame, *,
                     tune: TuneSettings = DEFAULT_TUNE,
                     base: Mapping[str, Any] | None = None,
                     thresholds: VerdictThresholds = DEFAULT_THRESHOLDS) -> list[str]:
    """The opening answer: at most :data:`MAX_SENTENCES` sentences (see the module
    docstring), each made from the numbers of ``recs`` (from
    :func:`dpalign.study.analysis.recommendations`) and ``runs``."""
    base = base or {}
    methods = _methods(recs)
    focus = [r for r in recs if _method(r) == methods[0]] if len(methods) > 1 else recs
    primary = _primary(focus)
    sentences: list[str | None] = []
    if primary is not None:
        mechanism, loss = primary
        about = [_close_sentence(focus, mechanism, loss),
                 _base_sentence(focus, mechanism, loss, base),
                 _window_sentence(focus, mechanism, loss, thresholds)]
        if len(methods) > 1:  # the method compared against the others below the answer
            about = [s and f"{methods[0].capitalize()} alignment: {s}" for s in about]
        sentences += about
    else:
        sentences.append("The study has no DP runs, so there is no privacy cost to report.")
    sentences += [_collapse_sentence(runs, recs), _settings_sentence(recs),
                  _tuning_sentence(recs, tune) if recs else None]
    kept = [s for s in sentences if s]
    divergence = _divergence_sentence(runs)
    if divergence and len(kept) < MAX_SENTENCES:  # room left: how many runs diverge
        kept.insert(min(3, len(kept)), divergence)
    return kept[:MAX_SENTENCES]


# ---------------------------------------------------------------- the table


def _estimate_cell(est: Estimate) -> TableCell:
    if not est.measured:
        return cell(None)
    return TableCell(f"{format_number(est.mean)} [{format_number(est.low)}, "
                     f"{format_number(est.high)}]", repr(float(est.mean)))


def _setting_cell(value: Any) -> TableCell:
    if isinstance(value, float) and math.isnan(value):
        return cell(None)
    return cell(value)


def _beats_text(rec: Recommendation) -> str:
    """``yes (seeds: held-out 100%, POPE-adv 67%, CHAIR_s 33%, 1 silenced)``."""
    if rec.beats_base is None:
        return "—"
    vb = rec.versus_base
    shares = [f"{name} {vb[key]:.0%}" for key, name in
              (("heldout", "held-out"), ("pope", "POPE-adv"), ("chair", "CHAIR_s"))
              if not math.isnan(vb.get(key, math.nan))]
    silenced = int(vb.get("n_recall_collapsed", 0))
    shares += [f"{silenced} silenced"] if silenced else []
    return ("yes" if rec.beats_base else "no") + (f" (seeds: {', '.join(shares)})"
                                                 if shares else "")


_SETTING_COLUMNS = (("lr", "lr"), ("C", "max_grad_norm"), ("clipping", "clipping"),
                    ("optimizer", "optimizer"), ("batch", "batch_size"),
                    ("sample rate", "sample_rate"), ("steps", "steps"))


def recommendation_table(recs: Sequence[Recommendation],
                         base: Mapping[str, Any] | None = None) -> Table | None:
    """One row per (mechanism, ε, K, loss): the tuned configuration's settings and test
    figures with 95% CIs beside the figures at fixed settings, its stable lr window, whether
    it beats the base, its collapse fraction and seed std; a first row holds the base model
    (``None`` when there is nothing to show)."""
    if not recs:
        return None
    base = base or {}
    settings = [(h, c) for h, c in _SETTING_COLUMNS
                if any(r.tuned.settings.get(c) is not None for r in recs)]
    methods = ("method",) if len(_methods(recs)) > 1 else ()
    headers = ("mechanism", "ε", "K", "loss", *methods, "tuned point", "chosen by",
               *(h for h, _ in settings), "val score", "test held-out reward acc.",
               "POPE-adv acc.", "CHAIR_s", "held-out acc. at fixed settings",
               "stable lr window", "beats base", "collapsed", "seed std (held-out)")
    rows = []
    if base:
        blank = cell(None)
        rows.append((cell("base model (untrained)"), blank, blank, blank,
                     *(blank for _ in methods), blank, blank,
                     *(blank for _ in settings), blank,
                     TableCell(f"0 (all ties; chance {CHANCE:g})", "0"),
                     cell(base.get("pope_adversarial_accuracy")), cell(base.get("chair_s")),
                     blank, blank, blank, blank, blank))
    for r in recs:
        c = r.tuned
        eps = float(c.group["epsilon_target"])
        fixed = r.fixed.test[HELDOUT] if r.fixed is not None else Estimate()
        rows.append((
            cell(_mech(str(c.group["mechanism"]))),
            cell(eps, format_epsilon(eps).removeprefix("ε=")), cell(int(c.group["k"])),
            cell(str(c.group["loss"])), *(cell(_method(r)) for _ in methods), cell(c.point),
            cell(f"{c.basis} (of {c.n_candidates})"),
            *(_setting_cell(c.settings.get(col)) for _, col in settings),
            _estimate_cell(c.score), _estimate_cell(c.test[HELDOUT]), _estimate_cell(c.test[POPE]),
            _estimate_cell(c.test[CHAIR]), _estimate_cell(fixed),
            TableCell(window_text(r.window), "" if r.window.width is None
                      else repr(r.window.width)),
            TableCell(_beats_text(r), {True: "1", False: "0", None: ""}[r.beats_base]),
            cell(r.collapse), cell(r.dispersion.get(HELDOUT, math.nan))))
    return Table("recommendation", "Recommendation: the tuned configuration per (ε, K)",
                 "Per mechanism, ε, K and loss: the configuration with the best mean "
                 "validation score over seeds and its TEST figures (mean [95% bootstrap CI] "
                 "over seeds), beside the held-out figure at fixed settings. Beats base: the "
                 f"test held-out reward accuracy's CI lies above chance ({CHANCE:g}; the base "
                 "model scores 0, every pair a tie), with the share of seeds beating the "
                 "base's POPE-adversarial accuracy and CHAIR_s.",
                 headers, tuple(rows))


def answer_rules(tune: TuneSettings = DEFAULT_TUNE) -> list[str]:
    """How the answer and the recommendation table are decided, with their thresholds."""
    split = ("the private validation part of the held-out pairs — choosing hyperparameters "
             "on private data is itself a release that ε does not count (Papernot & Steinke "
             "2022, \"Hyperparameter Tuning with Renyi Differential Privacy\"); set "
             "tune.split = public to tune on a public split instead"
             if tune.split == "private" else "a public validation split (no privacy spent "
             "on the choice)")
    return [
        f"Tuning: per (mechanism, ε, K, loss) the configuration with the best mean "
        f"{tune.metric} over seeds is chosen on {split}. Its figures are on the disjoint "
        "test part; the figures at fixed settings (tune.fixed, else the first value of "
        "every axis) are shown beside them.",
        "Stable lr window: the swept lrs at which every seed converges (reaches the target), "
        "does not diverge and does not collapse, other settings at the tuned "
        "configuration's; its width is log10(highest / lowest lr) of the widest contiguous "
        "run of stable lrs (0 for one lr, none when no lr is stable).",
        f"Held-out collapse: a run collapses when its held-out reward accuracy falls more "
        f"than {COLLAPSE_DROP:g} from its best evaluation to its final one.",
        f"Better than the base: the untrained base model's held-out reward accuracy is 0 by "
        f"construction (policy = reference, every pair a tie), so a seed beats it on "
        f"held-out when its test reward accuracy exceeds chance ({CHANCE:g}); on "
        f"POPE-adversarial accuracy and CHAIR_s it is compared with base.json. A run whose "
        f"recall falls below {RECALL_COLLAPSE_RATIO:g}× the base's is flagged (its captions "
        f"stop naming objects) and its lower CHAIR is not counted as less hallucination.",
        f"Close to no DP: the tuned DP configuration's mean test held-out reward accuracy is "
        f"at most {CLOSE_TO_NO_DP:g} below the tuned no-DP configuration's at the same K. "
        f"Seed dispersion: std over seeds (ddof=1) of each final figure.",
    ]


def precision_note(runs: pd.DataFrame, config: Mapping[str, Any] | None) -> str | None:
    """How precise one run's figures are: the POPE questions each run answers (the 95%
    binomial CI half-width 1.96 sqrt(p (1 - p) / n) at its worst, p = 1/2) and the held-out
    validation / test pair counts the study's config implies."""
    parts = []
    for split in ("adversarial", "random", "popular"):
        column = f"final_pope_{split}_n"
        counts = pd.to_numeric(runs.get(column, pd.Series(dtype=float)), errors="coerce").dropna()
        if len(counts):
            n = int(counts.min())
            parts.append(f"POPE-{split}: {n} questions per run (95% CI half-width at most "
                         f"{1.96 * math.sqrt(0.25 / n):.3f} for any accuracy)")
    evaluation = ((config or {}).get("base") or {}).get("eval") or {}
    pairs, fraction = evaluation.get("heldout_pairs"), evaluation.get("validation_fraction")
    if pairs and fraction:
        val = round(fraction * pairs)
        parts.append(f"held-out pairs: {val} validation (for tuning) and {pairs - val} test "
                     f"(reported)")
    return ("Evaluation sets: " + "; ".join(parts) + ".") if parts else None
