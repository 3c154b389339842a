"""The quant schemes, one module each; this registry is the only list of them.

Adding a scheme: write its module (a ``SCHEME`` built from schemes.base.Scheme) and add it to ``_MODULES``; each
output format that stores it says how (the ascendv1 format: a row of checkpoint/formats/ascendv1_encoding.py; the
compressed-tensors format derives its layout from the scheme's qconfig); a recipe preset that uses it goes to
dist_quant/configs/.
"""

from __future__ import annotations

from typing import Optional

from dist_quant.errors import RecipeError
from dist_quant.schemes import unquantized as _float
from dist_quant.schemes import w4a8_dynamic as _w4a8_dynamic
from dist_quant.schemes import w8a8 as _w8a8
from dist_quant.schemes import w8a8_dynamic as _w8a8_dynamic
from dist_quant.schemes import w8a8_mxfp8 as _w8a8_mxfp8
from dist_quant.schemes import w8a16 as _w8a16
from dist_quant.schemes.base import UNQUANTIZED_ACT, LinearSpec, QSpec, QuantizedLinear, Scheme

# compressed-tensors' config groups in this order
_MODULES = (_float, _w8a8, _w8a8_dynamic, _w4a8_dynamic, _w8a8_mxfp8, _w8a16)
SCHEMES: dict[str, Scheme] = {m.SCHEME.name: m.SCHEME for m in _MODULES}
FLOAT, W8A8, W8A8_DYNAMIC, W4A8_DYNAMIC = _float.NAME, _w8a8.NAME, _w8a8_dynamic.NAME, _w4a8_dynamic.NAME
SELECTABLE = tuple(s for s in SCHEMES.values() if s.act is not None)


def get(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except (KeyError, TypeError):
        raise RecipeError(f"unknown quant type {name!r}; known: {list(SCHEMES)}") from None


def for_qconfig(act: QSpec, weight: QSpec) -> Optional[Scheme]:
    """The scheme a recipe's ``qconfig`` selects (by its fields, ``ext`` options aside), or None."""
    return next((s for s in SELECTABLE if s.selected_by(act, weight)), None)


__all__ = ["FLOAT", "SCHEMES", "SELECTABLE", "W4A8_DYNAMIC", "W8A8", "W8A8_DYNAMIC", "LinearSpec", "QSpec",
           "QuantizedLinear", "Scheme", "UNQUANTIZED_ACT", "for_qconfig", "get"]
