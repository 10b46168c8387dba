"""The error the Megatron -> Hugging Face export raises for inputs it cannot export."""
from __future__ import annotations

from memmgr.errors import MemmgrInputError


class MemmgrExportError(MemmgrInputError):
    """A model, parameter or Hugging Face config the export cannot map: raised on every rank, before any weight
    moves, naming the parameter (or config field) and what was expected."""
