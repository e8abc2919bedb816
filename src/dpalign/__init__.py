"""dpalign: differentially private preference alignment of vision-language models."""

__version__ = "0.1.0"
