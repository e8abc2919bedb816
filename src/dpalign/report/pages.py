"""Assemble a :class:`~dpalign.report.html.Page` from a loaded study or run."""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from dpalign.diagnostics import Thresholds, diagnose_run_dir
from dpalign.diagnostics.trends import VerdictThresholds
from dpalign.report.answer import (
    answer_rules,
    answer_sentences,
    precision_note,
    recommendation_table,
)
from dpalign.report.audit import audit_table, run_audit_table
from dpalign.report.fmt import format_number
from dpalign.report.html import Block, Page
from dpalign.report.load import ReportInputError, RunInput, StudyInput
from dpalign.report.methods import method_rows, methods_table
from dpalign.report.rl import reward_rows, reward_table, rl_rows, rl_rules, rl_table
from dpalign.report.run_figures import run_figures
from dpalign.report.series import Cell, cells_from_tables, ok_runs
from dpalign.report.study_figures import study_figures
from dpalign.report.tables import (
    Table,
    TableCell,
    key_value_table,
    points_table,
    records_table,
    runs_table,
)
from dpalign.report.verdict import (
    KIND_WORDS,
    VERDICT_DEFAULTS,
    Verdict,
    describe_rules,
    glance,
    run_finding_rules,
    run_summary,
    study_verdicts,
)
from dpalign.rundir import RunDir, RunDirError
from dpalign.study.analysis import recommendations

__all__ = ["PAGES", "build_page", "run_page", "study_page"]

NOT_RECORDED = "not recorded"
DIAGNOSTIC_DEFAULTS = Thresholds()


def _pairs(values: Mapping[str, Any] | None) -> tuple[tuple[str, str], ...]:
    """``(name, text)`` pairs; nested values as compact JSON."""
    def text(value: Any) -> str:
        if value is None:
            return NOT_RECORDED
        return json.dumps(value) if isinstance(value, dict | list) else str(value)

    return tuple((str(k), text(v)) for k, v in (values or {}).items())


def diagnostic_rules(thresholds: Thresholds = DIAGNOSTIC_DEFAULTS) -> str:
    """How a single run is diagnosed (from :class:`dpalign.diagnostics.Thresholds`)."""
    limit = ("a fixed limit of " + format_number(thresholds.loss_limit)
             if thresholds.loss_limit is not None else
             f"{thresholds.loss_limit_factor:g} × |first loss| + {thresholds.loss_limit_floor:g}")
    return (f"A run diverges at the first step whose loss is non-finite or above {limit}, or "
            f"whose KL proxy is non-finite or above {thresholds.kl_limit:g} nats. Loss "
            f"volatility is the std of the per-step change of the EMA-smoothed loss (decay "
            f"{thresholds.ema_decay:g}). Steps to converge: the first evaluation step with "
            f"{thresholds.target_key} ≥ {thresholds.target_accuracy:g} (defaults of "
            f"dpalign.diagnostics.Thresholds; a study may set others in its config).")


# ---------------------------------------------------------------- study


def _seeds(study: StudyInput) -> list[int]:
    return sorted({int(s) for s in study.runs["seed"]}) if "seed" in study.runs else []


def _study_blocks(study: StudyInput) -> list[Block]:
    meta = study.meta
    command = meta.get("command")
    failed = len(study.runs) - len(ok_runs(study.runs))
    facts = {"study": meta.get("name", study.path.name), "directory": str(study.path),
             "created": meta.get("created"), "git revision": meta.get("git_revision"),
             "accountant": meta.get("accountant"),
             "seeds": ", ".join(map(str, _seeds(study))) or None,
             "runs": f"{len(study.runs)} ({failed} failed)"}
    config = meta.get("config")
    tune = study.tune
    facts |= {"tuned on": f"{tune.metric} ({tune.split} validation split)",
              "fixed settings": json.dumps(dict(tune.fixed)) if tune.fixed else
              "first value of every axis"}
    return [
        Block("Command", shlex.join(map(str, command)) if command else NOT_RECORDED),
        Block("Study", pairs=_pairs(facts)),
        Block("Base model (base.json)",
              pairs=_pairs(study.base) or (("base.json", NOT_RECORDED),)),
        Block("Machine", pairs=_pairs(meta.get("machine")) or (("machine", NOT_RECORDED),)),
        Block("Package versions",
              pairs=_pairs(meta.get("versions")) or (("versions", NOT_RECORDED),)),
        Block("Resolved config", yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
              if config is not None else NOT_RECORDED),
    ]


def _study_subtitle(study: StudyInput) -> str:
    runs = study.runs
    ks = sorted({int(k) for k in runs["k"]}) if "k" in runs else []
    eps = sorted({float(e) for e in runs["epsilon_target"]}) if "epsilon_target" in runs else []
    eps_text = ", ".join("∞" if math.isinf(e) else f"{e:g}" for e in eps)
    k_text = ", ".join(map(str, ks))
    return (f"{len(runs)} runs over {len(study.points)} grid points — K ∈ {{{k_text}}}, "
            f"ε ∈ {{{eps_text}}}, {len(_seeds(study))} seeds — {study.path}")


def glance_table(cells: list[Cell], thresholds: VerdictThresholds = VERDICT_DEFAULTS
                 ) -> Table | None:
    """The at-a-glance matrix of :func:`dpalign.report.verdict.glance` (``None`` when no
    series has two or more epsilon values). A cell's ``sort`` holds its trend kind, used as
    its CSS class."""
    labels, rows = glance(cells, thresholds)
    if not labels or not rows:
        return None
    kinds = {word: kind for kind, word in KIND_WORDS.items()}
    body = tuple((TableCell(name, ""), *(TableCell(w, kinds[w]) for w in words))
                 for name, words in rows)
    return Table("glance", "At a glance: the trend as ε decreases (more noise)",
                 f"A trend is called only when the 95% CIs at no DP (or the least-private ε) "
                 f"and at the smallest ε do not overlap and |Spearman ρ| ≥ "
                 f"{thresholds.min_rho:g}; the folded sentences below give the numbers.",
                 ("metric", *labels), body)


def study_page(study: StudyInput,
               thresholds: VerdictThresholds = VERDICT_DEFAULTS) -> Page:
    """The report page of a study directory: the answer (at most six sentences) and the
    recommendation table first, then the at-a-glance trends, the per-metric sentences
    (folded), the rules, figures, tables and reproducibility."""
    cells = cells_from_tables(study.points, study.runs)
    name = study.meta.get("name", study.path.name)
    recs = recommendations(study.runs, study.tune, study.base)
    return Page(
        title=f"dpalign study report: {name}",
        subtitle=_study_subtitle(study),
        answer=answer_sentences(recs, study.runs, tune=study.tune, base=study.base,
                                thresholds=thresholds),
        recommendation=recommendation_table(recs, study.base),
        fold_verdicts=True,
        notes=("What does DP noise do to convergence stability in few-shot image-text "
               "alignment? The answer above and every sentence below are generated from the "
               "grid's numbers.",
               *filter(None, [precision_note(study.runs, study.meta.get("config"))])),
        glance=glance_table(cells, thresholds),
        verdicts=study_verdicts(cells, thresholds),
        rules=[*answer_rules(study.tune), *describe_rules(thresholds), diagnostic_rules(),
               *rl_rules(study.runs)],
        figures=study_figures(study, cells),
        tables=[*filter(None, [methods_table(method_rows(study.runs, study.tune)),
                               rl_table(rl_rows(study.runs, study.tune)),
                               reward_table(reward_rows(study.runs, study.tune)),
                               audit_table(study.runs)]),
                points_table(cells, study.points),
                runs_table(study.runs)],
        reproducibility=_study_blocks(study),
    )


# ---------------------------------------------------------------- single run


def _config(run: RunInput) -> Mapping[str, Any]:
    try:
        loaded = yaml.safe_load(run.config_text) if run.config_text else {}
    except yaml.YAMLError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _run_blocks(run: RunInput) -> list[Block]:
    config = _config(run)
    privacy = run.privacy
    spent = ((run.result or {}).get("privacy") or {}).get("epsilon")
    facts = {
        "directory": str(run.path),
        "seed (train.seed)": (config.get("train") or {}).get("seed"),
        "few-shot split seed (data.seed)": (config.get("data") or {}).get("seed"),
        "K (data.k)": (config.get("data") or {}).get("k"),
        "accountant": privacy.get("accountant") if privacy else "none (non-private run)",
        "ε spent": spent if privacy else "∞ (no DP)",
        "git revision": None,
    }
    rerun = f"dpalign train --config {shlex.quote(str(RunDir(run.path).config))} --out NEW_DIR"
    blocks = [
        Block("Command (not stored in a run directory; this re-runs it)", rerun),
        Block("Run", pairs=_pairs(facts)),
        Block("Environment (env.json)",
              pairs=_pairs(run.env) or (("env.json", NOT_RECORDED),)),
    ]
    if privacy:
        blocks.append(Block("Privacy (privacy.json)", pairs=_pairs(privacy)))
    blocks.append(Block("Resolved config (config.yaml)", run.config_text or NOT_RECORDED))
    return blocks


_RUN_FINDINGS = ("moved", "loss_start", "loss_end", "collapsed", "heldout_drop",
                 "heldout_best_step", "val_drop", "silenced", "pope_one_way", "recall_ratio",
                 "recall_collapsed")
"""The diagnostics behind the run's findings, shown first in its diagnostics table."""


def run_page(run: RunInput, thresholds: VerdictThresholds = VERDICT_DEFAULTS) -> Page:
    """The report page of a single run directory: summary (its findings first: did not
    move, over-optimised, silenced), curves, metrics tables."""
    try:
        diagnostics = diagnose_run_dir(run.path).as_dict()
    except RunDirError as exc:
        raise ReportInputError(str(exc)) from exc
    first = {k: diagnostics[k] for k in _RUN_FINDINGS if k in diagnostics}
    tables = [key_value_table("diagnostics", "Run diagnostics",
                              "Findings (did it move, over-optimise, answer one way), then "
                              "the stability summary and final/best/step-0 evaluation values.",
                              first | diagnostics)]
    if run.audit is not None:
        tables.append(run_audit_table(run.audit))
    if run.evals:
        tables.append(records_table("evals", "Evaluations",
                                    "One row per evaluation step (eval.jsonl).", run.evals))
    return Page(
        title=f"dpalign run report: {run.path.name}",
        subtitle=f"{len(run.metrics)} logged steps, {len(run.evals)} evaluations — {run.path}",
        verdicts=[Verdict("Summary", tuple(run_summary(diagnostics)))],
        rules=[run_finding_rules(), diagnostic_rules()],
        figures=run_figures(run),
        tables=tables,
        reproducibility=_run_blocks(run),
    )


PAGES: dict[type, Callable[[Any], Page]] = {StudyInput: study_page, RunInput: run_page}
"""Page builder per kind of loaded input."""


def build_page(data: StudyInput | RunInput) -> Page:
    """The page for a loaded study or run."""
    return PAGES[type(data)](data)
