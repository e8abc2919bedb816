"""What a study records about where and with what it ran (``study.json``): the command,
time, git revision, package versions, the machine (CPU model and vector flags, the torch
kernel set in use, threads) and a hash of the base model's weights."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from dpalign.io import atomic_write_json
from dpalign.study.config import StudyConfig
from dpalign.train.config import TrainConfig

PACKAGES = ("dpalign", "torch", "transformers", "peft", "dp-accounting", "pandas", "ray")
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "amx_tile")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS")


def versions() -> dict[str, str | None]:
    def one(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    return {name: one(name) for name in PACKAGES}


def git_revision() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, cwd=Path(__file__).parent, check=False)
    except OSError:
        return None
    return done.stdout.strip() or None


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """CPU model and which of ``CPU_FLAGS`` it has (from /proc/cpuinfo, Linux)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name", platform.processor() or None),
            "flags": [f for f in CPU_FLAGS if f in flags]}


def machine() -> dict[str, Any]:
    """Platform, CPU, the torch kernel set it runs with and the kernel environment."""
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "cpu": cpu_info(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(),
            "env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ}}


def weights_hash(model_dir: Path) -> str | None:
    """SHA-256 over the model folder's weight files (names and bytes, in name order);
    None when the folder holds none."""
    files = sorted(p for p in Path(model_dir).rglob("*")
                   if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(model_dir).as_posix().encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def write_provenance(path: Path, study: StudyConfig, command: list[str],
                     config: TrainConfig, weights_sha256: str | None) -> None:
    """Write ``study.json`` (``config``: any run's config, for the model and accountant;
    ``weights_sha256``: its weights' :func:`weights_hash`)."""
    atomic_write_json(path, {
        "name": study.name, "command": command,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_revision": git_revision(), "versions": versions(), "machine": machine(),
        "base_model": {"path": str(config.model), "weights_sha256": weights_sha256},
        "accountant": config.privacy.accountant, "config": study.model_dump(mode="json")})
