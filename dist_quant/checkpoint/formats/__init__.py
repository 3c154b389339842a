"""Output formats, one module each. A format owns its file names, how a scheme's roles become file keys, dtypes and
description entries, the config rewrite, its side files, and how a checkpoint of it is read back (for eval); the
checkpoint writer keeps what is common: staging, unit files, parts and the atomic publish.

Adding a format: its module (with the names and functions ascendv1.py has) and a line in ``SAVERS``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from dist_quant.errors import RecipeError

SAVERS = {"ascendv1_saver": "dist_quant.checkpoint.formats.ascendv1",  # a recipe's ``save: - type:`` -> module
          "compressed_tensors": "dist_quant.checkpoint.formats.compressed_tensors"}
SAVE_FORMATS = {"ascendv1": "ascendv1_saver", "compressed-tensors": "compressed_tensors"}  # --save_format -> saver


def for_saver(saver: str) -> ModuleType:
    """The format module a recipe's saver type names."""
    if saver not in SAVERS:
        raise RecipeError(f"unknown saver {saver!r}; known: {list(SAVERS)}")
    return importlib.import_module(SAVERS[saver])
