"""Models: the tiny and smol VLMs, loading, LoRA, pair encoding and collation, sequence log-probs.

Importing the package registers dpalign's own vision towers with the transformers Auto
classes (``efficientnet_lite``), so ``load_model`` and ``from_pretrained`` can read the folders
that use them.
"""

from dpalign.models import efficientnet_lite as _registration  # noqa: F401
