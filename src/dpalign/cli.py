"""The ``dpalign`` command line: each command parses options and calls the library."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dpalign.config import apply_overrides


class JsonOnCrash(typer.core.TyperGroup):
    """The root group: a command that fails with an unexpected exception (exit status 1,
    with its traceback) still ends stdout with the --json failure object."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if getattr(exc, "exit_code", None) is None and not isinstance(exc, typer.Abort):
                _json_failure(f"{type(exc).__name__}: {exc}")  # not click's exits/usage errors
            raise


app = typer.Typer(help="Differentially private preference alignment of vision-language models.",
                  no_args_is_help=True, pretty_exceptions_enable=False, cls=JsonOnCrash)
world_app = typer.Typer(help="The synthetic image-text world.", no_args_is_help=True)
data_app = typer.Typer(help="Preference data files.", no_args_is_help=True)
app.add_typer(world_app, name="world")
app.add_typer(data_app, name="data")
reward_app = typer.Typer(help="Reward models (Bradley-Terry, under DP): train and score.",
                         no_args_is_help=True)
app.add_typer(reward_app, name="reward")
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _overrides(example: str, command: str) -> Any:
    """The ``key=value ...`` argument of a command, with an example valid for its config."""
    return Annotated[list[str] | None, typer.Argument(
        metavar="KEY=VALUE",
        help=f"Settings as dotted key=value (values read as YAML), e.g. {example}; every key: "
             f"dpalign settings {command}.")]


TrainOverrides = _overrides("train.steps=200 privacy.target_epsilon=8", "train")
RewardOverrides = _overrides("train.steps=200 privacy.target_epsilon=8", "reward")
AuditOverrides = _overrides("train.steps=200 privacy.target_epsilon=8", "audit")
WorldOverrides = _overrides("n_pool_pairs=128 hallucination_rate=0.5", "world")
StudyOverrides = _overrides("workers=4 grid.seed=[0,1,2]", "study")
PretrainOverrides = _overrides("steps=400 with --preset tiny, lm_steps=200 with --preset smol",
                               "pretrain --preset NAME")

_json_asked: ContextVar[bool] = ContextVar("dpalign_json", default=False)
"""Whether the running command was given --json (reset by the app's callback, set by the
option's), read by ``emit`` and ``fail``."""


def _remember_json(value: bool) -> bool:
    _json_asked.set(value)
    return value


JsonLine = Annotated[bool, typer.Option(
    "--json", callback=_remember_json,
    help='End stdout with one line holding a JSON object: the result, with "ok": true; on '
         'failure (exit status 1) {"ok": false, "error": MESSAGE}.')]
"""The one --json option: a command takes it (as ``as_json``) and reports through ``emit``
and ``fail``, which print the JSON line."""


def _rank() -> int:
    """This process's rank in a torch.distributed run (0 when not distributed)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return int(os.environ.get("RANK", "0"))


def emit(result: dict[str, Any]) -> None:
    """With --json (on rank 0), print ``{"ok": true, **result}`` as the last stdout line."""
    if _json_asked.get() and _rank() == 0:
        print(json.dumps({"ok": True, **result}))


def fail(message: str, **details: Any) -> typer.Exit:
    """Print ``message`` (plain text) as an error and return the exit to raise (status 1);
    with --json, also the last stdout line ``{"ok": false, "error": message, **details}``."""
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    _json_failure(message, **details)
    return typer.Exit(1)


def _json_failure(message: str, **details: Any) -> None:
    if _json_asked.get() and _rank() == 0:
        print(json.dumps({"ok": False, "error": message, **details}))


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"dpalign {version('dpalign')}", markup=False, highlight=False)
        raise typer.Exit


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_show_version,
                                          help="Print dpalign's version and exit.")] = False,
) -> None:
    from dpalign.progress import quiet_other_bars

    _json_asked.set(False)  # a subcommand's --json sets it
    quiet_other_bars()


@world_app.command("build")
def world_build(
    out: Annotated[Path, typer.Option(help="Folder to write the world into.")],
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives identical files.")] = 0,
    force: Annotated[bool, typer.Option(help="Replace a different world at OUT.")] = False,
    overrides: WorldOverrides = None,
) -> None:
    """Build the synthetic image-text world (pretraining, preference pairs, POPE, captions)."""
    from dpalign.world.build import WorldExistsError, build_world
    from dpalign.world.config import WorldConfig

    try:
        cfg = apply_overrides(WorldConfig(seed=seed), overrides or [])
        path, built = build_world(out, cfg, force=force)
    except (WorldExistsError, ValueError) as exc:
        raise fail(str(exc)) from exc
    stats = json.loads((path / "world.json").read_text())["stats"]
    verb = "built" if built else "up to date (same config)"
    console.print(f"world {verb}: {path}")
    console.print({k: v for k, v in stats.items() if k != "object_frequency"})


@world_app.command("text")
def world_text(
    world: Annotated[Path, typer.Option(help="A world folder (dpalign world build).")],
    out: Annotated[Path, typer.Option(help="Folder for pool.jsonl and heldout.jsonl.")],
) -> None:
    """The world's preference pairs as text-only pairs for text LLMs: each image replaced
    by a sentence stating its objects and colours, before the question."""
    from dpalign.data.records import read_preference_jsonl, write_preference_jsonl
    from dpalign.data.text_pairs import MissingSceneError, text_pair
    from dpalign.world.load import NotAWorldError, World

    try:
        loaded = World.load(world)
        for name, source in (("pool", loaded.pool_file), ("heldout", loaded.heldout_file)):
            try:
                pairs = [text_pair(r) for r in read_preference_jsonl(source)]
            except MissingSceneError as exc:
                raise MissingSceneError(f"{source}: {exc}") from None
            write_preference_jsonl(out / f"{name}.jsonl", pairs)
            console.print(f"{name}: {len(pairs)} text-only pairs -> {out / f'{name}.jsonl'}")
    except (NotAWorldError, MissingSceneError) as exc:
        raise fail(str(exc)) from exc


@data_app.command("validate")
def data_validate(
    file: Annotated[Path, typer.Argument(help="Preference JSONL file, or a folder written by "
                                              "datasets' Dataset.save_to_disk.")],
    no_images: Annotated[bool, typer.Option("--no-images", help="Skip image checks.")] = False,
    as_json: JsonLine = False,
) -> None:
    """Check a preference JSONL file (or a saved dataset): schema, duplicate ids, images
    readable.

    Every problem of the file is reported in one run, one ``file:line: message`` line each
    (the first 50, then a count of the rest); any problem means exit status 1. The --json
    object: path, records, images, users, error_kinds; on failure also path, count and
    errors (file, line, field, message).
    """
    from dpalign.data.errors import DataValidationError, format_issues
    from dpalign.data.hf import validate_source

    try:
        summary = validate_source(file, check_images=not no_images)
    except DataValidationError as exc:
        for line in format_issues(exc.issues):
            err.print(line, markup=False, highlight=False)
        count = len(exc.issues)
        raise fail(f"{count} problem{'s' if count != 1 else ''} in {file}", path=str(file),
                   **exc.as_dict()) from exc
    info = {"path": str(summary.path), "records": summary.n_records, "images": summary.n_images,
            "users": summary.n_users, "error_kinds": summary.error_kinds}
    if not as_json:
        console.print(f"ok: {info}", highlight=False)
    emit(info)


@data_app.command("convert")
def data_convert(
    source: Annotated[Path, typer.Argument(help="Dataset file: .jsonl, .json or .parquet.")],
    fmt: Annotated[str, typer.Option("--format", help="rlhf-v, rlaif-v, vlfeedback, povid "
                                                      "or trl.")],
    out: Annotated[Path, typer.Option(help="Preference JSONL file to write.")],
    images: Annotated[Path | None, typer.Option(help="Folder relative image paths are in "
                                                     "(default: the input's folder).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")] = False,
    as_json: JsonLine = False,
) -> None:
    """Convert a public preference dataset into dpalign's JSONL format (all or nothing).

    Image paths are written relative to OUT's folder; an existing OUT is kept unless --force.
    The --json object: source, out, format, rows, records, embedded_images, images_dir,
    skipped.
    """
    from dpalign.data.convert import convert_file

    try:
        summary = convert_file(source, fmt, out, images=images, force=force)
    except ValueError as exc:  # includes DataValidationError and OutputExistsError
        raise fail(str(exc)) from exc
    skipped = "; ".join(f"{reason} ({n})" for reason, n in summary.skipped.items()) or "none"
    console.print(f"wrote {summary.n_records} pairs from {summary.n_rows} rows to {summary.out}"
                  f" ({summary.n_embedded_images} embedded images); skipped: {skipped}",
                  markup=False, highlight=False)
    emit(summary.as_dict())


@data_app.command("bdhs")
def data_bdhs(
    model: Annotated[Path, typer.Option(help="Model folder that writes the rejections.")],
    source: Annotated[Path, typer.Option("--in", help="JSONL of answers (image(s), prompt, "
                                                      "answer) or of preference pairs.")],
    out: Annotated[Path, typer.Option(help="Preference JSONL file to write.")],
    seed: Annotated[int, typer.Option(help="Seed of split points, swaps and sampling.")] = 0,
    mask_rate: Annotated[float, typer.Option(help="Image-token masking rate.")] = 0.99,
    max_tries: Annotated[int, typer.Option(help="Most tries per sentence.")] = 5,
    threshold: Annotated[float, typer.Option(help="Resample above this cosine.")] = 0.97,
    batch_size: Annotated[int, typer.Option(help="Generation batch size.")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per completion.")] = 48,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N].")] = "auto",
) -> None:
    """Bias-driven hallucination sampling: a rejected answer for each good one, written by
    MODEL with the image masked from attention (BDHS; input checked before the model loads)."""
    from dpalign.models.load import load_model, resolve_device, resolve_dtype
    from dpalign.online.bdhs import make_bdhs_pairs, read_bdhs_inputs
    from dpalign.online.config import BDHSConfig

    try:
        cfg = BDHSConfig(mask_rate=mask_rate, max_tries=max_tries, threshold=threshold,
                         seed=seed, sampling={"temperature": temperature,
                                              "max_new_tokens": max_new_tokens})
        items = read_bdhs_inputs(source)
        where = resolve_device(device)
        vlm = load_model(model, device=str(where), dtype=resolve_dtype("auto", where))
        summary = make_bdhs_pairs(vlm.model, vlm.processor, items, out, cfg,
                                  batch_size=batch_size)
    except (OSError, ImportError, ValueError) as exc:  # incl. DataValidationError
        raise fail(str(exc)) from exc
    console.print(f"wrote {summary.n_pairs} pairs to {summary.out} ({summary.n_identical} "
                  f"left out: rejected equal to chosen); mean tries {summary.mean_tries:.2f}, "
                  f"at max tries {summary.share_max_tries:.1%}, mean similarity "
                  f"{summary.mean_similarity:.3f}, yes/no swapped {summary.n_swapped}",
                  markup=False, highlight=False)


@app.command()
def pretrain(
    out: Annotated[Path, typer.Option(help="Folder for the base model.")],
    world: Annotated[Path, typer.Option(help="World folder (from `dpalign world build`).")],
    preset: Annotated[str, typer.Option(help="Model preset: tiny (from scratch) | smol "
                                             "(SmolLM2 + EfficientNet-Lite0) | smollm2 "
                                             "(text-only SmolLM2-135M-Instruct, as is).")] = "tiny",
    force: Annotated[bool, typer.Option(help="Rebuild even if OUT holds this model.")] = False,
    overrides: PretrainOverrides = None,
) -> None:
    """Pretrain a base VLM on the world's biased pretraining split (cached at OUT); the
    text-only ``smollm2`` preset is written as built."""
    from dpalign.pretrain import PRESETS, default_config
    from dpalign.pretrain import pretrain as run_pretrain
    from dpalign.world.load import NotAWorldError

    if preset not in PRESETS:
        raise fail(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    try:
        cfg = apply_overrides(default_config(preset), overrides or [])
        result = run_pretrain(world, out, cfg, force=force)
    except (NotAWorldError, FileExistsError, ValueError, ImportError) as exc:
        raise fail(str(exc)) from exc
    verb = (("written" if result.first_loss is None else "trained") if result.built
            else "up to date (cached)")
    loss = ("" if result.first_loss is None else
            f"  loss {result.first_loss:.3f} -> {result.last_loss:.3f}")
    console.print(f"base model {verb}: {result.out}{loss}  wall {result.wall_seconds:.0f}s")


def _train_table(evaluations: list[dict]) -> Table:
    first, last = evaluations[0], evaluations[-1]
    table = Table(title="Held-out evaluation")
    for column in ("metric", f"step {first['step']}", f"step {last['step']}"):
        table.add_column(column, justify="right")
    for key in first:
        if key != "step" and isinstance(first[key], float):
            table.add_row(key, f"{first[key]:.3f}", f"{last.get(key, float('nan')):.3f}")
    return table


def _init_distributed() -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); gloo on CPU."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _os_error_text(exc: OSError, out: Path) -> str:
    """``path: cause`` of an OS error; errors that name no file (a write that found the disk
    full) are put on the run directory ``out``."""
    if exc.strerror is None:  # raised with a message of its own (e.g. no weights file)
        return str(exc)
    where = exc.filename if exc.filename is not None else f"{out} (run directory)"
    also = f" -> {exc.filename2}" if exc.filename2 is not None else ""
    return f"{where}{also}: {exc.strerror}"


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Show dpalign's own warnings (e.g. a torn log line dropped on resume) as one
    ``warning:`` line each on stderr; others as Python shows them."""
    import warnings

    from rich.markup import escape

    from dpalign.io import TornLineWarning

    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], *args: object,
                 **kwargs: object) -> None:
            if issubclass(category, TornLineWarning):
                err.print(f"[bold yellow]warning:[/] {escape(str(message))}",
                          highlight=False)
            else:
                shown(message, category, *args, **kwargs)  # type: ignore[arg-type]

        warnings.showwarning = show
        yield


@app.command()
def train(
    config: Annotated[Path, typer.Option(help="YAML training config (see configs/).")],
    out: Annotated[Path, typer.Option(help="Run directory.")],
    resume: Annotated[bool, typer.Option(help="Continue the run at OUT from its newest "
                                               "checkpoint.")] = False,
    as_json: JsonLine = False,
    overrides: TrainOverrides = None,
) -> None:
    """Align a VLM on preference pairs (DPO family, LoRA or full), with checkpoints.

    Bad input (data, settings, over-long pairs, a budget that allows no step) and OS errors
    end with one ``error:`` line and exit status 1; a failed fresh start leaves OUT as found.
    The --json object is OUT/result.json. Under torchrun only rank 0 prints.
    """
    _run_training(config, out, resume=resume, overrides=overrides or [])


def _run_training(config: Path, out: Path, *, resume: bool, overrides: list[str]) -> None:
    """``dpalign train`` and ``dpalign reward train``: load the config (YAML + overrides),
    run it, print the held-out table and the summary line (on rank 0 only: under torchrun
    every rank runs this)."""
    from dpalign.config import ConfigError, load_yaml_config
    from dpalign.data.errors import DataValidationError
    from dpalign.rundir import RunDir, RunDirError
    from dpalign.train.config import TrainConfig
    from dpalign.train.loop import train as run_train

    _init_distributed()
    try:
        cfg = load_yaml_config(TrainConfig, config, overrides)
        with _warnings_as_lines():
            result = run_train(cfg, out, resume=resume)
    except OSError as exc:  # read-only or full disk, a model folder without its weights
        raise fail(_os_error_text(exc, out)) from exc
    except (ConfigError, DataValidationError, RunDirError, ValueError) as exc:
        raise fail(str(exc)) from exc
    if _rank() != 0:  # rank R wrote its own copy at OUT.rankR; rank 0 reports the run
        return
    if result.evaluations:
        console.print(_train_table(result.evaluations))
    steps = (f"{result.steps} steps" if result.stopped is None
             else f"{result.steps} of {result.planned_steps} steps ({result.stopped})")
    console.print(f"run finished: {result.out}  {steps}  "
                  f"wall {result.wall_seconds:.0f}s  model: {RunDir(result.out).final}",
                  markup=False, highlight=False)
    emit(json.loads(RunDir(result.out).result.read_text()))


POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
CHAIR_METRICS = ("chair_s", "chair_i", "recall", "partner_hallucination_rate")


def _world_tables(report: dict) -> list[Table]:
    """The world's figures: POPE as metric x split, then CHAIR, object recall and the
    partner-hallucination rate as metric, value."""
    pope = report["pope"]
    table = Table(title="POPE on the world (yes/no questions)")
    for column in ("metric", *pope):
        table.add_column(column, justify="right")
    for key in POPE_METRICS:
        table.add_row(key, *(f"{split[key]:.3f}" for split in pope.values()))
    chair = report["chair"]
    captions = Table(title=f"Captions on the world (CHAIR rules: {chair['rules']})")
    captions.add_column("metric")
    captions.add_column("value", justify="right")
    for key in CHAIR_METRICS:
        captions.add_row(f"CHAIR {key}" if key.startswith("chair") else key,
                         f"{chair[key]:.3f}")
    return [table, captions]


def _published_tables(published: dict) -> list[Table]:
    """A POPE table (one column per question file) and a CHAIR/AMBER table, when present."""
    tables = []
    pope = published.get("pope", {})
    if pope:
        table = Table(title=f"POPE on published files (images: {published['images']})")
        for column in ("metric", *pope):
            table.add_column(column, justify="right")
        for key in POPE_METRICS:
            table.add_row(key, *(f"{result[key]:.3f}" for result in pope.values()))
        table.add_row("questions", *(str(result["n"]) for result in pope.values()))
        tables.append(table)
    if "chair" in published:
        chair = published["chair"]
        truth = chair.get("ground_truth", "instances")
        table = Table(title=f"Captions of {chair['n_captions']} images: CHAIR and AMBER "
                            f"(CHAIR rules: {chair['rules']}; ground truth: {truth})")
        table.add_column("metric")
        table.add_column("value", justify="right")
        rows = {f"CHAIR {k}": chair[k] for k in ("chair_s", "chair_i", "recall")}
        rows |= {f"AMBER {k}": v for k, v in chair["amber"].items() if isinstance(v, float)}
        for name, value in rows.items():
            table.add_row(name, f"{value:.3f}")
        tables.append(table)
    return tables


def _eval_tables(report: dict) -> list[Table]:
    """The world's table (when a world was evaluated) and the published files' tables."""
    world = _world_tables(report) if "world" in report else []
    return world + _published_tables(report.get("published", {}))


_BULKY_KEYS = frozenset({"captions", "answers"})


def _eval_summary(value: object) -> object:
    """The report without per-caption and per-question lists (the ``--json`` last line)."""
    if isinstance(value, dict):
        return {k: _eval_summary(v) for k, v in value.items() if k not in _BULKY_KEYS}
    return value


def _audit_line(report: dict) -> str:
    claimed = report["claimed_epsilon"]
    claim = "inf (not private)" if claimed is None else f"{claimed:.4g}"
    verdict = ("consistent: the bound does not exceed the claim" if report["consistent"]
               else "INCONSISTENT: the run leaks more than its claimed epsilon")
    return (f"audit ({report['kind']} canaries, m={report['canaries']}): claimed epsilon "
            f"{claim}, audited lower bound {report['epsilon_lower_bound']:.4g} at "
            f"{1 - report['level']:.0%} confidence ({report['correct']} of "
            f"{report['guesses']} guesses correct); MIA AUC {report['auc']:.3f}; {verdict}")


@app.command("audit")
def audit_command(
    config: Annotated[Path, typer.Option(help="YAML training config (see configs/).")],
    out: Annotated[Path, typer.Option(help="Run directory: the run, audit/ and audit.json.")],
    canaries: Annotated[int | None, typer.Option(
        help="m canaries (default 10000 gradient, 256 input).")] = None,
    kind: Annotated[str, typer.Option(
        help="gradient (white box, Dirac units) | input (black box, unique pairs).")
    ] = "gradient",
    seed: Annotated[int, typer.Option(help="Which canaries are in; their batches.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the audit at OUT.")] = False,
    as_json: JsonLine = False,
    overrides: AuditOverrides = None,
) -> None:
    """Empirical epsilon lower bound from one training run (Steinke, Nasr & Jagielski 2023).

    Trains the configured run with m canaries, each included with probability 1/2, scores
    them, and reports the largest epsilon that the guesses reject at 95 % confidence, next
    to the run's claimed epsilon, with membership-inference AUC and TPR at low FPR. Writes
    OUT/audit.json (last), OUT/audit/canaries.parquet and OUT/audit/scores.png. The --json
    object is OUT/audit.json.
    """
    from pydantic import ValidationError

    from dpalign.audit.config import AuditConfig
    from dpalign.audit.run import run_audit
    from dpalign.config import ConfigError, load_yaml_config
    from dpalign.data.errors import DataValidationError
    from dpalign.rundir import RunDirError
    from dpalign.train.config import TrainConfig

    try:
        audit = AuditConfig(kind=kind, canaries=canaries, seed=seed)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise fail("; ".join(f"--{e['loc'][0]}: {e['msg']}" for e in exc.errors())) from exc
    try:
        cfg = load_yaml_config(TrainConfig, config, overrides or [])
        with _warnings_as_lines():
            report = run_audit(cfg, out, audit, resume=resume)
    except OSError as exc:
        raise fail(_os_error_text(exc, out)) from exc
    except (ConfigError, DataValidationError, RunDirError, ValueError) as exc:
        raise fail(str(exc)) from exc
    console.print(_audit_line(report), markup=False, highlight=False)
    emit(report)


@app.command("eval")
def evaluate(
    model: Annotated[Path, typer.Option(help="Model folder (save_pretrained layout).")],
    world: Annotated[Path | None, typer.Option(help="World folder.")] = None,
    pope_file: Annotated[list[Path] | None, typer.Option(
        metavar="FILE",
        help="Published POPE question file (repeatable); its images are in --images.")] = None,
    coco_instances: Annotated[Path | None, typer.Option(
        help="COCO instances JSON: caption its images, score CHAIR and AMBER.")] = None,
    coco_captions: Annotated[Path | None, typer.Option(
        metavar="FILE",
        help="COCO captions JSON: objects named in an image's reference captions join its "
             "--coco-instances ground truth (the CHAIR authors' ground truth).")] = None,
    images: Annotated[Path | None, typer.Option(
        help="Folder holding the images the published files name.")] = None,
    synonyms: Annotated[Path | None, typer.Option(
        help="CHAIR synonym list (default: shared/reference/chair/synonyms.txt).")] = None,
    caption_prompt: Annotated[str | None, typer.Option(
        help="Prompt for the --coco-instances captions (default: AMBER's).")] = None,
    chair_rules: Annotated[str, typer.Option(
        help="CHAIR rules for the --coco-instances captions: coco-official (the CHAIR "
             "authors' COCO rules, comparable with published numbers) | dpalign.")
    ] = "coco-official",
    out: Annotated[Path | None, typer.Option(help="JSON file (default MODEL/eval.json).")] = None,
    batch_size: Annotated[int, typer.Option(help="Generation batch size.")] = 64,
    limit: Annotated[int | None, typer.Option(help="At most N images per part.")] = None,
    as_json: JsonLine = False,
    device: Annotated[str, typer.Option(help="auto (GPU if visible) | cpu | cuda[:N].")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16.")] = "auto",
    trust_remote_code: Annotated[bool, typer.Option(
        help="Run Python code shipped in the model folder (only for folders you trust).")
    ] = False,
) -> None:
    """POPE, CHAIR and object recall of a model on a world and/or on published files.

    The --json object is the report written to OUT without its per-caption and
    per-question lists."""
    from rich.markup import escape

    from dpalign.eval.published import plan_published, plan_warnings, run_published
    from dpalign.eval.world_eval import EvalSettings, evaluate_world
    from dpalign.io import atomic_write_json
    from dpalign.models.load import load_model, resolve_device, resolve_dtype
    from dpalign.world.load import World

    if world is None and not pope_file and coco_instances is None:
        raise fail("nothing to evaluate: give --world DIR, or --pope-file FILE and/or "
                   "--coco-instances FILE with --images DIR")
    try:  # every input is read and checked before the model loads
        the_world = None if world is None else World.load(world)
        plan = plan_published(images, pope_file or [], coco_instances, synonyms, limit=limit,
                              prompt=caption_prompt, chair_rules=chair_rules,
                              coco_captions=coco_captions)
        for warning in plan_warnings(plan):
            err.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False)
        where = resolve_device(device)
        vlm = load_model(model, device=str(where), dtype=resolve_dtype(dtype, where),
                       trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise fail(str(exc)) from exc
    report = {} if the_world is None else evaluate_world(
        vlm.model, vlm.processor, the_world, EvalSettings(batch_size=batch_size, limit=limit))
    if plan is not None:
        report["published"] = run_published(vlm.model, vlm.processor, plan, batch_size=batch_size)
    report["model"] = str(model.resolve())
    path = atomic_write_json(out or model / "eval.json", report)
    for table in _eval_tables(report):
        console.print(table)
    console.print(f"written: {path}")
    emit(_eval_summary(report))  # type: ignore[arg-type]


Accountant = Annotated[str, typer.Option(help="Privacy accountant: pld (tight) or rdp.")]
SampleRate = Annotated[float, typer.Option(help="Poisson sampling rate q in (0, 1].")]
DpSteps = Annotated[int, typer.Option(help="Number of DP-SGD steps.")]
Delta = Annotated[float, typer.Option(help="Target delta, in (0, 1).")]


@app.command("epsilon")
def epsilon_command(
    sigma: Annotated[float, typer.Option(help="Noise multiplier (noise std / clip norm).")],
    sample_rate: SampleRate,
    steps: DpSteps,
    delta: Delta = 1e-5,
    accountant: Accountant = "pld",
    as_json: JsonLine = False,
) -> None:
    """Epsilon spent by Poisson-sampled DP-SGD (sigma, q, steps) at delta.

    The --json object: epsilon, delta, sigma, sample_rate, steps, accountant."""
    from dpalign.privacy.accounting import account

    try:
        result = account((sigma, sample_rate, steps), delta, accountant)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    info = {"epsilon": result.epsilon, "delta": delta, "sigma": sigma,
            "sample_rate": sample_rate, "steps": steps, "accountant": result.accountant}
    console.print(f"epsilon {result.epsilon:.4f} at delta {delta:g} ({result.accountant}; "
                  f"sigma {sigma:g}, q {sample_rate:g}, {steps} steps)", highlight=False)
    emit(info)


@app.command("calibrate")
def calibrate_command(
    target_epsilon: Annotated[float, typer.Option(help="Epsilon not to exceed.")],
    sample_rate: SampleRate,
    steps: DpSteps,
    delta: Delta = 1e-5,
    accountant: Accountant = "pld",
    as_json: JsonLine = False,
) -> None:
    """The smallest noise multiplier sigma that keeps epsilon <= the target.

    The --json object: sigma, epsilon, target_epsilon, delta, sample_rate, steps,
    accountant."""
    from dpalign.privacy.accounting import account, calibrate_sigma

    try:
        sigma = calibrate_sigma(target_epsilon, delta, sample_rate, steps, accountant)
        result = account((sigma, sample_rate, steps), delta, accountant)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    info = {"sigma": sigma, "epsilon": result.epsilon, "target_epsilon": target_epsilon,
            "delta": delta, "sample_rate": sample_rate, "steps": steps,
            "accountant": result.accountant}
    console.print(f"sigma {sigma:.4f} gives epsilon {result.epsilon:.4f} <= "
                  f"{target_epsilon:g} at delta {delta:g} ({result.accountant}; "
                  f"q {sample_rate:g}, {steps} steps)", highlight=False)
    emit(info)


def _reward_defaults(config: Path, overrides: list[str]) -> list[str]:
    """``loss.name=bradley_terry`` unless the config file or an override names a loss (a
    file that cannot be read is left to the config loader, which reports it)."""
    import yaml

    from dpalign.config import ConfigError, parse_overrides

    try:
        sources = [yaml.safe_load(config.read_text()) or {}, parse_overrides(overrides)]
    except (OSError, yaml.YAMLError, ConfigError):
        return []
    named = any(isinstance(s, dict) and isinstance(s.get("loss"), dict) and "name" in s["loss"]
                for s in sources)
    return [] if named else ["loss.name=bradley_terry"]


@reward_app.command("train")
def reward_train(
    config: Annotated[Path, typer.Option(help="YAML training config (see "
                                              "configs/world_reward.yaml).")],
    out: Annotated[Path, typer.Option(help="Run directory; the model is saved in OUT/final.")],
    resume: Annotated[bool, typer.Option(help="Continue the run at OUT from its newest "
                                               "checkpoint.")] = False,
    as_json: JsonLine = False,
    overrides: RewardOverrides = None,
) -> None:
    """Train a reward model (Bradley-Terry, DP): `dpalign train` of a reward model.

    reward.enabled=true is forced and the loss is bradley_terry when the config names none;
    DP, ledger, checkpoints, resume, errors and the --json object (OUT/result.json) are those
    of `dpalign train`.
    """
    given = list(overrides or [])
    _run_training(config, out, resume=resume,
                  overrides=[*_reward_defaults(config, given), *given, "reward.enabled=true"])


def _reward_table(summary: dict) -> Table:
    table = Table(title=f"Reward model on {summary['data']} ({summary['n']} pairs)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("accuracy (r_w > r_l)", f"{summary['accuracy']:.3f}")
    table.add_row("95% Wilson interval", f"[{summary['ci_low']:.3f}, {summary['ci_high']:.3f}]")
    table.add_row("pairs", str(summary["n"]))
    table.add_row("ties (count as wrong)", str(summary["ties"]))
    table.add_row("mean margin r_w - r_l", f"{summary['mean_margin']:.4g}")
    return table


@reward_app.command("eval")
def reward_eval(
    model: Annotated[Path, typer.Argument(help="Reward run directory or its final/ folder.")],
    data: Annotated[Path, typer.Option(help="Preference JSONL file to score.")],
    limit: Annotated[int | None, typer.Option(min=1, help="Only the file's first N pairs.")
                     ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Pairs per forward pass.")] = 32,
    out: Annotated[Path | None, typer.Option(help="JSONL to write: one line per pair (id, "
                                                  "rewards, margin, correct).")] = None,
    as_json: JsonLine = False,
    device: Annotated[str, typer.Option(help="auto (GPU if visible) | cpu | cuda[:N].")
                      ] = "auto",
) -> None:
    """Pairwise accuracy of a reward model on a preference file, with its 95 % interval.

    A tie (r_w = r_l up to rounding) counts as wrong; the ties and the mean margin r_w - r_l
    are shown too. The file is read and checked before the model loads. The --json object:
    model, data, n, accuracy, ci_low, ci_high, ties, mean_margin (and out).
    """
    from dpalign.data.records import read_preference_jsonl
    from dpalign.io import atomic_write_jsonl
    from dpalign.models.load import resolve_device, resolve_dtype
    from dpalign.rl.reward import FactsError, load_reward_model
    from dpalign.rl.reward_eval import evaluate_reward

    try:
        records = read_preference_jsonl(data)[:limit]
        where = resolve_device(device)
        loaded = load_reward_model(model, device=str(where),
                                   dtype=resolve_dtype("auto", where))
        result = evaluate_reward(loaded, records, batch_size)
    except FactsError as exc:
        raise fail(f"{data}: {exc}") from exc
    except (OSError, ValueError) as exc:  # includes DataValidationError (file:line)
        raise fail(str(exc)) from exc
    summary = {"model": str(loaded.path), "data": str(data), **result.summary()}
    if out is not None:
        summary["out"] = str(atomic_write_jsonl(out, result.rows()))
    console.print(_reward_table(summary))
    if out is not None:
        console.print(f"written: {out}", markup=False, highlight=False)
    emit(summary)


@app.command()
def study(
    out: Annotated[Path, typer.Option(help="Study directory (runs/, runs.parquet, ...).")],
    preset: Annotated[str | None, typer.Option(
        help="Packaged study: quickstart | full | answer | online | rl | reward.")] = None,
    config: Annotated[Path | None, typer.Option(help="Study YAML (instead of --preset).")] = None,
    model: Annotated[str | None, typer.Option(
        help="Base model: a model folder, or a pretrain preset (tiny | smol) pretrained on the "
             "study's world at OUT/base-NAME (built once, world too if missing).")] = None,
    workers: Annotated[int | None, typer.Option(help="Runs at once (default: study's).")] = None,
    backend: Annotated[str, typer.Option(help="local (process pool) | ray.")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray cluster address (ray backend).")] = None,
    as_json: JsonLine = False,
    overrides: StudyOverrides = None,
) -> None:
    """Run a grid of alignment runs (mechanism x epsilon x K x seed x loss x any setting, e.g.
    optim.lr or privacy.clipping); with halving, only the best settings run every seed;
    resumable.

    The --json object: out, runs, failed, report, points."""
    from dpalign.config import ConfigError
    from dpalign.study import load_study, preset_path, run_study
    from dpalign.study.models import with_model
    from dpalign.study.store import summary_rows
    from dpalign.world.load import NotAWorldError

    if (preset is None) == (config is None):
        raise fail("give exactly one of --preset NAME or --config FILE")
    try:
        cfg = load_study(config or preset_path(preset), overrides)  # type: ignore[arg-type]
        if model is not None:
            cfg = with_model(cfg, model, out)
        result = run_study(cfg, out, backend=backend, workers=workers, address=address)
    except (ConfigError, NotAWorldError, FileExistsError, ValueError, ImportError) as exc:
        raise fail(str(exc)) from exc
    headings, rows = summary_rows(result.points)
    table = Table(title=f"study {cfg.name}: {len(result.runs)} runs ({result.skipped} already "
                        f"done), mean over seeds")
    for heading in headings:
        table.add_column(heading, justify="right")
    for row in rows:
        table.add_row(*row)
    Console(width=max(console.width, 150)).print(table)  # a wide table, also in logs
    failed = result.runs[result.runs["status"] == "failed"]
    for _, run in failed.iterrows():
        console.print(f"[red]failed[/red] {run['run']}: {run['error']}")
    console.print(f"results: {out / 'runs.parquet'}  {out / 'points.parquet'}")
    from dpalign.report import write_report

    report = write_report(out)
    for sentence in report.sentences:
        console.print(f"- {sentence}", highlight=False)
    console.print(f"report: {report.html}", highlight=False)
    emit({"out": str(out), "runs": len(result.runs), "failed": len(failed),
          "report": str(report.html),
          "points": json.loads(result.points.to_json(orient="records"))})


@app.command("report")
def report_command(
    path: Annotated[Path, typer.Argument(metavar="DIR",
                                         help="Study directory or single run directory.")],
    out: Annotated[Path | None, typer.Option(
        help="HTML file to write (default DIR/report.html; figures/ goes beside it).")] = None,
    as_json: JsonLine = False,
) -> None:
    """Write a self-contained HTML report (verdict, figures, tables, reproducibility).

    The --json object: report, figures, verdict."""
    from dpalign.report import ReportInputError, write_report

    try:
        report = write_report(path, out=out)
    except ReportInputError as exc:
        raise fail(str(exc)) from exc
    for sentence in report.sentences:
        console.print(f"- {sentence}", highlight=False)
    console.print(f"report: {report.html}  ({len(report.figures)} figures)", highlight=False)
    emit({"report": str(report.html), "figures": [str(p) for p in report.figures],
          "verdict": list(report.sentences)})


SETTINGS_COMMANDS = ("train", "reward", "audit", "world", "study", "pretrain")


def settings_model(command: str, preset: str = "tiny") -> type[BaseModel]:
    """The config model whose keys ``command``'s key=value arguments set (pretrain: the
    ``preset``'s settings class)."""
    if command in ("train", "reward", "audit"):
        from dpalign.train.config import TrainConfig

        return TrainConfig
    if command == "world":
        from dpalign.world.config import WorldConfig

        return WorldConfig
    if command == "study":
        from dpalign.study.config import StudyConfig

        return StudyConfig
    if command == "pretrain":
        from dpalign.pretrain import PRESETS

        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[preset].config
    raise ValueError(f"no settings for {command!r}; choose one of "
                     f"{', '.join(SETTINGS_COMMANDS)}")


def _value_text(value: object) -> str:
    """A default as YAML (how a key=value override writes it)."""
    import yaml
    from pydantic_core import to_jsonable_python

    text = yaml.safe_dump(to_jsonable_python(value), default_flow_style=True, width=10**6)
    return text.removesuffix("\n").removesuffix("\n...").strip()


@app.command("settings")
def settings_command(
    command: Annotated[str, typer.Argument(
        metavar="COMMAND", help=f"The command: {' | '.join(SETTINGS_COMMANDS)}.")],
    preset: Annotated[str, typer.Option(help="pretrain: the preset whose settings to list "
                                             "(tiny | smol | smollm2).")] = "tiny",
    as_json: JsonLine = False,
) -> None:
    """Every key=value setting of COMMAND (its YAML keys too): key, type, default, help.

    Read from the command's config model. reward and audit take train's settings. A key
    inside a section that is off by default (a study's halving or audit) shows the default
    it takes once set. The --json object: command, model, settings (key, type, default,
    required, help).
    """
    from dataclasses import asdict

    from pydantic_core import to_jsonable_python

    from dpalign.config import settings_of

    try:
        model = settings_model(command, preset)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    found = settings_of(model)
    if not as_json:
        table = Table(title=f"dpalign {command} settings ({model.__name__})")
        for column in ("key", "type", "default", "help"):
            table.add_column(column, overflow="fold")
        for s in found:
            default = "(required)" if s.required else _value_text(s.default)
            table.add_row(*(Text(cell) for cell in (s.key, s.type, default, s.help)))
        Console(width=max(console.width, 150)).print(table)
    emit({"command": command, "model": model.__name__,
          "settings": [to_jsonable_python(asdict(s)) for s in found]})


def main() -> None:
    app()


if __name__ == "__main__":
    main()
