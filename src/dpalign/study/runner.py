"""Running a study's runs: one run directory per grid run, in parallel, resumable.

A run is *finished* when its directory holds ``result.json`` (and, in an audited study,
``audit.json``); rerunning a study skips those, resumes runs that have a ``config.yaml``
(and ``audit/settings.json`` when audited; from their last checkpoint; the ledger is in it)
and starts the rest afresh. An audited study's task carries its ``AuditConfig`` as JSON data
and the worker trains with ``dpalign.audit.run.run_audit`` instead of ``train``.
A run that raises, or whose worker process dies (killed, out of memory), is recorded in its
``error.json`` (the message, and the traceback when there is one) and the others go on; the
next invocation tries it again.

Backends (``BACKENDS``): ``local``, a process pool (spawned workers, each with
``cpu_count // workers`` torch threads), and ``ray`` (``ray.init()`` locally, or at
``address``), one task per run. Either way a worker runs ``run_one``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from dpalign.io import atomic_write_json
from dpalign.rundir import RunDir

PR_SET_PDEATHSIG = 1  # prctl option, <linux/prctl.h>


@dataclass(frozen=True)
class RunTask:
    """What a worker needs: the run's name, its TrainConfig as JSON data, where to write,
    and the study's ``AuditConfig`` as JSON data (``None``: a plain training run)."""

    name: str
    config: dict[str, Any]
    run_dir: str
    threads: int
    audit: dict[str, Any] | None = None


def is_finished(run_dir: Path, audited: bool = False) -> bool:
    """Whether the run wrote ``result.json`` (and ``audit.json`` when ``audited``)."""
    files = RunDir(run_dir)
    return files.is_finished() and (not audited or files.audit.is_file())


def can_resume(run_dir: Path, audited: bool = False) -> bool:
    """Whether the run was started: ``config.yaml`` (and the audit's ``settings.json``)."""
    files = RunDir(run_dir)
    return files.config.is_file() and (not audited
                                       or (files.audit_dir / "settings.json").is_file())


def _train(task: RunTask, run_dir: Path, resume: bool) -> None:
    """Train the task's run, with the study's canaries when it is audited."""
    from dpalign.train.config import TrainConfig

    cfg = TrainConfig.model_validate(task.config)
    if task.audit is None:
        from dpalign.train.loop import train

        train(cfg, run_dir, resume=resume)
        return
    from dpalign.audit.config import AuditConfig
    from dpalign.audit.run import run_audit

    run_audit(cfg, run_dir, AuditConfig.model_validate(task.audit), resume=resume)


def run_one(task: RunTask) -> dict[str, Any]:
    """Train one run (resuming it when it was interrupted) and diagnose it; never raises:
    returns ``{"run", "status": "ok"|"failed", "error"}`` and writes ``error.json`` on
    failure."""
    os.environ["DPALIGN_NO_PROGRESS"] = "1"
    run_dir = Path(task.run_dir)
    files = RunDir(run_dir)
    try:
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()  # the study's bar is the only one
        transformers.utils.logging.set_verbosity_error()
        from dpalign.diagnostics import diagnose_run_dir

        torch.set_num_threads(task.threads)
        resume = can_resume(run_dir, task.audit is not None)
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)
        files.error.unlink(missing_ok=True)
        _train(task, run_dir, resume)
        atomic_write_json(files.diagnostics, diagnose_run_dir(run_dir).as_dict())
        return {"run": task.name, "status": "ok", "error": None}
    except Exception as exc:  # one failed run must not stop the study
        message = f"{type(exc).__name__}: {exc}"
        record_failure(run_dir, message, traceback.format_exc())
        return {"run": task.name, "status": "failed", "error": message}


def record_failure(run_dir: Path, message: str, trace: str | None = None) -> None:
    """Write the run's ``error.json`` (kept if the run already wrote its own)."""
    error = RunDir(run_dir).error
    if error.is_file() and trace is None:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(error, {"error": message, "traceback": trace})


Backend = Callable[[Sequence[RunTask], int, "str | None"], Iterator[dict[str, Any]]]


def die_with_parent(parent: int) -> None:
    """Make this worker process die when the study process does (Linux ``PR_SET_PDEATHSIG``).

    Without it a study killed with SIGTERM (a scheduler's preemption, ``kill``) leaves its
    workers training on, and the study run again later would write into the same run
    directories at the same time."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # it died before the call: nobody is left to wait for us
            os._exit(1)


def local_backend(tasks: Sequence[RunTask], workers: int,
                  address: str | None = None) -> Iterator[dict[str, Any]]:
    """Results of ``run_one`` over a spawned process pool, as runs finish."""
    if address is not None:
        raise ValueError("--address is for the ray backend")
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                             initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(run_one, task): task for task in tasks}
        for future in as_completed(futures):
            try:
                yield future.result()
            except Exception as exc:  # the worker process itself died (e.g. out of memory)
                yield {"run": futures[future].name, "status": "failed",
                       "error": f"worker died: {type(exc).__name__}: {exc} (killed, e.g. "
                                "out of memory? try fewer --workers or a smaller "
                                "eval.batch_size)"}


def ray_backend(tasks: Sequence[RunTask], workers: int,
                address: str | None = None) -> Iterator[dict[str, Any]]:
    """Results of ``run_one`` as Ray tasks (``ray.init(address)``; local when None), at most
    ``workers`` at a time, each reserving its thread count in CPUs."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 num_cpus=None if address else max(workers, os.cpu_count() or 1))
    try:
        remote = ray.remote(run_one)
        pending = list(tasks)
        running: dict[Any, RunTask] = {}
        while pending or running:
            while pending and len(running) < workers:
                task = pending.pop(0)
                running[remote.options(num_cpus=task.threads).remote(task)] = task
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                task = running.pop(ref)
                try:
                    yield ray.get(ref)
                except Exception as exc:  # the task's worker died
                    yield {"run": task.name, "status": "failed",
                           "error": f"ray task failed: {type(exc).__name__}: {exc}"}
    finally:
        if started:
            ray.shutdown()


BACKENDS: dict[str, Backend] = {"local": local_backend, "ray": ray_backend}


def threads_per_run(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)

