"""Audit canaries: which are trained on, which a step samples, and input canaries' records.

Each of the m canaries is included in training independently with probability 1/2
(``inclusion``), the coin flips the one-run audit's theorem assumes (Steinke, Nasr &
Jagielski 2023). An included canary is a privacy unit like any other: at every step it joins
the batch independently with the run's Poisson sample rate q (``canary_batch``), from a
random stream of its own, so the training pairs' batches are those of the run without
canaries and the plan (q, sigma, steps, hence the claimed epsilon) is the configured run's:
with Poisson sampling a unit's guarantee does not depend on how many other units there are.

- ``GradientCanaries`` (white box; Nasr et al. 2023, "Dirac canaries"): canary i is a unit
  whose gradient is ``norm * C`` times the unit vector of coordinate i of an audit vector
  of length m, made of ``rows`` equal rows (as a pair is two rows), so a step that clips
  rows instead of units shows it. The score is the sum over steps of the released noisy
  audit vector at i (``LoopState.audit``).
- ``InputCanaries`` (black box): m preference pairs no real example resembles, each a
  unique noise image with a unique prompt and fixed arbitrary answers drawn from the
  training data's words (``input_records``). The score is the trained policy's implicit
  reward margin on the canary against the reference model (``dpalign.audit.run``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dpalign.data.schema import PreferenceRecord
from dpalign.io import atomic_write_bytes
from dpalign.privacy.sampling import poisson_mask
from dpalign.train.dp_step import CanaryDraw, DPStep
from dpalign.world.render import png_bytes

INCLUSION_STREAM = 11  # numpy streams of the audit, apart from the batches' (1, 2)
SAMPLING_STREAM = 12
RECORD_STREAM = 13


def inclusion(m: int, seed: int) -> np.ndarray:
    """(m,) bool: canary i is trained on (probability 1/2 each, independently)."""
    if m < 1:
        raise ValueError(f"need at least one canary, got {m}")
    return np.random.default_rng([seed, 0, INCLUSION_STREAM]).random(m) < 0.5


def canary_batch(included: np.ndarray, sample_rate: float, seed: int, step: int) -> np.ndarray:
    """Indices (sorted) of the included canaries in batch ``step`` (1-based): each joins with
    probability ``sample_rate``, a function of (seed, step) so resume draws the same."""
    ins = np.flatnonzero(included)
    rng = np.random.default_rng([seed, step, SAMPLING_STREAM])
    return ins[poisson_mask(len(ins), sample_rate, rng)] if len(ins) else ins


@dataclass(frozen=True)
class GradientCanaries:
    """Dirac gradient canaries: ``included`` (m,) bool; each sampled one is a unit of
    ``rows`` rows of ``norm * C / rows`` at its own coordinate (C the step's clipping norm,
    or 1 when C is infinite, the non-private limit)."""

    included: np.ndarray
    sample_rate: float
    seed: int
    norm: float = 10.0
    rows: int = 2
    dp_step: type[DPStep] = DPStep
    records: Sequence[PreferenceRecord] = ()

    @property
    def size(self) -> int:
        return len(self.included)

    def draw(self, step: int, clip_norm: float) -> CanaryDraw:
        coords = canary_batch(self.included, self.sample_rate, self.seed, step)
        scale = clip_norm if np.isfinite(clip_norm) else 1.0
        dirac = torch.full((len(coords), self.rows), self.norm * scale / self.rows,
                           dtype=torch.float64)
        return CanaryDraw(dirac=dirac, coords=torch.as_tensor(coords, dtype=torch.long))


@dataclass(frozen=True)
class InputCanaries:
    """Input canaries: ``records`` (m) trained on where ``included``; they follow the
    training pairs in the run's encoded pairs."""

    records: Sequence[PreferenceRecord]
    included: np.ndarray
    sample_rate: float
    seed: int
    dp_step: type[DPStep] = DPStep
    size: int = field(default=0, init=False)

    def draw(self, step: int, clip_norm: float) -> CanaryDraw:
        del clip_norm
        chosen = canary_batch(self.included, self.sample_rate, self.seed, step)
        return CanaryDraw(pairs=[[int(i)] for i in chosen])


def vocabulary(records: Sequence[PreferenceRecord]) -> list[str]:
    """The distinct lower-case words of the records' prompts and answers, sorted."""
    words = {w for r in records for text in (r.prompt, r.chosen, r.rejected)
             for w in re.findall(r"[a-z]+", text.lower())}
    if len(words) < 2:
        raise ValueError("input canaries need training records with at least two words")
    return sorted(words)


def _sentence(rng: np.random.Generator, words: list[str], n: int) -> str:
    text = " ".join(rng.choice(words, size=n))
    return text[0].upper() + text[1:] + "."


def input_records(m: int, like: Sequence[PreferenceRecord], folder: Path, seed: int
                  ) -> list[PreferenceRecord]:
    """m canary pairs written to ``folder``: ``canary-00000.png``... (uniform noise images
    the size of ``like``'s first image) and records with a unique prompt (a hex code and
    random words) and two different random answers of the training data's words. A
    function of (m, the words and image size of ``like``, seed): a resumed audit rebuilds
    the same canaries."""
    words = vocabulary(like)
    with Image.open(like[0].images[0]) as first:
        width, height = first.size
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for j in range(m):
        rng = np.random.default_rng([seed, j, RECORD_STREAM])
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        image = folder / f"canary-{j:05d}.png"
        atomic_write_bytes(image, png_bytes(Image.fromarray(pixels)))
        code = f"{int(rng.integers(0, 16 ** 6)):06x}"
        chosen = _sentence(rng, words, 6)
        rejected = _sentence(rng, words, 6)
        while rejected == chosen:
            rejected = _sentence(rng, words, 6)
        records.append(PreferenceRecord(
            id=f"canary-{j:05d}", images=(str(image.resolve()),),
            prompt=f"Code {code}: {_sentence(rng, words, 4)[:-1].lower()}?",
            chosen=chosen, rejected=rejected))
    return records
