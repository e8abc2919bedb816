"""The source formats ``dpalign data convert`` reads, by name."""

from __future__ import annotations

from dpalign.data.convert.base import Converter
from dpalign.data.convert.povid import POVID
from dpalign.data.convert.rlaif_v import RLAIF_V
from dpalign.data.convert.rlhf_v import RLHF_V
from dpalign.data.convert.trl_vision import TRL
from dpalign.data.convert.vlfeedback import VLFEEDBACK

FORMATS: dict[str, Converter] = {c.name: c for c in (RLHF_V, RLAIF_V, VLFEEDBACK, POVID, TRL)}
