"""Converters from public preference datasets into dpalign's record schema.

``convert_file(source, fmt, out, images=...)`` reads a JSONL, JSON-array or Parquet file in
one of the layouts in ``FORMATS`` (``rlhf-v``, ``rlaif-v``, ``vlfeedback``, ``povid``,
``trl``) and writes a validated preference JSONL file atomically, refusing to replace an
existing one unless ``force=True``; image paths in it are relative to its folder. Each format
module documents the layout it reads and where the field names come from.
"""

from __future__ import annotations

from dpalign.data.convert.base import Converter, Draft, ImageRef, RowError, RowSkip
from dpalign.data.convert.registry import FORMATS
from dpalign.data.convert.run import (
    ConversionSummary,
    OutputExistsError,
    convert_file,
    get_converter,
)

__all__ = [
    "FORMATS",
    "ConversionSummary",
    "Converter",
    "Draft",
    "ImageRef",
    "OutputExistsError",
    "RowError",
    "RowSkip",
    "convert_file",
    "get_converter",
]
