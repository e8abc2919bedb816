"""dpalign: differentially private preference alignment of vision-language models and text
LLMs.

The public API lives in ``dpalign.api`` and is reachable from here (``dpalign.train``,
``dpalign.make_private``, ``dpalign.TrainConfig``, ...; see ``dpalign.api.__all__``). It is
imported on first use, so ``import dpalign`` (and the CLI's ``--help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    api = importlib.import_module("dpalign.api")
    # ``train`` and ``report`` are also subpackages, which importing the API binds here:
    # the public functions replace those bindings (``import dpalign.train.loop`` still
    # works: the import system finds loaded modules in sys.modules, not on the package)
    globals().update({public: getattr(api, public) for public in api.__all__})
    if name == "api":
        return api
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'dpalign' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *importlib.import_module("dpalign.api").__all__])
