"""The quantization recipe: an msModelSlim ``multimodal_vlm_modelslim_v1`` YAML file as typed objects.

The recipe is the contract users already know from msModelSlim, so the file format is theirs: a ``spec.process`` list
of processors with include/exclude globs, a ``spec.save`` list and the calibration ``dataset``/``default_text``.
Globs are fnmatch patterns matched against whole module names, where ``*`` also spans dots.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import yaml

from dist_quant.errors import RecipeError

W8A8 = "W8A8"
W8A8_DYNAMIC = "W8A8_DYNAMIC"
FLOAT = "FLOAT"

BUNDLED_CONFIGS = Path(__file__).parent / "configs"
DEFAULT_RECIPE = BUNDLED_CONFIGS / "qwen3_vl_moe_w8a8.yaml"

_SPEC_KEYS = {"process", "save", "dataset", "default_text"}
_LINEAR_QUANT_KEYS = {"type", "qconfig", "include", "exclude"}
_QSPEC_KEYS = {"scope", "dtype", "symmetric", "method"}
_NOT_YET = {"quarot", "iter_smooth"}


@dataclass(frozen=True)
class QSpec:
    """How one side (activations or weights) of a linear is quantized."""

    scope: str
    dtype: str
    symmetric: bool
    method: str


@dataclass(frozen=True)
class LinearQuant:
    """A ``linear_quant`` processor: a quantization scheme applied to the linears its globs select."""

    quant_type: str
    act: QSpec
    weight: QSpec
    include: tuple[str, ...]
    exclude: tuple[str, ...]

    def selects(self, module_name: str) -> bool:
        return any(fnmatch.fnmatchcase(module_name, p) for p in self.include) and not any(
            fnmatch.fnmatchcase(module_name, p) for p in self.exclude
        )


@dataclass(frozen=True)
class Recipe:
    path: Path
    linear_quants: tuple[LinearQuant, ...]
    part_file_size_gb: float
    dataset: str | None
    default_text: str | None

    def quant_type(self, module_name: str) -> str:
        """The quant type of a linear module: the first ``linear_quant`` that selects it wins, FLOAT if none does."""
        for processor in self.linear_quants:
            if processor.selects(module_name):
                return processor.quant_type
        return FLOAT


def _fail(path: Path, where: str, message: str) -> RecipeError:
    return RecipeError(f"recipe {path}: {where}: {message}")


def _check_keys(path: Path, where: str, given: dict, allowed: set[str]) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise _fail(path, where, f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")


def _qspec(path: Path, where: str, raw: Any) -> QSpec:
    if not isinstance(raw, dict):
        raise _fail(path, where, "must be a mapping with scope, dtype, symmetric, method")
    _check_keys(path, where, raw, _QSPEC_KEYS)
    try:
        return QSpec(str(raw["scope"]), str(raw["dtype"]), bool(raw["symmetric"]), str(raw.get("method", "minmax")))
    except KeyError as missing:
        raise _fail(path, where, f"missing field {missing}") from None


def _scheme(path: Path, where: str, act: QSpec, weight: QSpec) -> str:
    """Map a qconfig onto the two schemes vLLM Ascend serves for this model; anything else is refused by name."""
    if weight != QSpec("per_channel", "int8", True, "minmax"):
        raise _fail(path, f"{where}.weight", f"{weight} is not supported; use per_channel int8 symmetric minmax")
    if act == QSpec("per_tensor", "int8", False, "minmax"):
        return W8A8
    if act == QSpec("per_token", "int8", True, "minmax"):
        return W8A8_DYNAMIC
    raise _fail(
        path,
        f"{where}.act",
        f"{act} is not supported; use per_tensor int8 asymmetric minmax (W8A8) "
        "or per_token int8 symmetric minmax (W8A8_DYNAMIC)",
    )


def _globs(path: Path, where: str, raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(p, str) and p for p in raw):
        raise _fail(path, where, "must be a list of non-empty glob strings")
    for pattern in raw:
        if pattern.count("[") != pattern.count("]"):
            raise _fail(path, where, f"bad glob {pattern!r}: unbalanced brackets")
    return tuple(raw)


def _linear_quant(path: Path, where: str, raw: dict) -> LinearQuant:
    _check_keys(path, where, raw, _LINEAR_QUANT_KEYS)
    qconfig = raw.get("qconfig")
    if not isinstance(qconfig, dict) or "act" not in qconfig or "weight" not in qconfig:
        raise _fail(path, f"{where}.qconfig", "must be a mapping with act and weight")
    _check_keys(path, f"{where}.qconfig", qconfig, {"act", "weight"})
    act = _qspec(path, f"{where}.qconfig.act", qconfig["act"])
    weight = _qspec(path, f"{where}.qconfig.weight", qconfig["weight"])
    include = _globs(path, f"{where}.include", raw.get("include", ["*"]))
    return LinearQuant(_scheme(path, f"{where}.qconfig", act, weight), act, weight, include,
                       _globs(path, f"{where}.exclude", raw.get("exclude")))


def _part_file_size(path: Path, raw: Any) -> float:
    if raw is None:
        return 4.0
    if not isinstance(raw, list) or len(raw) != 1 or not isinstance(raw[0], dict):
        raise _fail(path, "spec.save", "must be a list with one ascendv1_saver entry")
    saver = raw[0]
    _check_keys(path, "spec.save[0]", saver, {"type", "part_file_size"})
    if saver.get("type") != "ascendv1_saver":
        raise _fail(path, "spec.save[0].type", f"{saver.get('type')!r} is not supported; allowed: ['ascendv1_saver']")
    size = saver.get("part_file_size", 4)
    if not isinstance(size, (int, float)) or size < 0:
        raise _fail(path, "spec.save[0].part_file_size", f"{size!r} must be a number of GB >= 0")
    return float(size)


def parse_recipe(raw: Any, path: Path) -> Recipe:
    """Validate a loaded recipe document; errors name the field and the allowed values."""
    if not isinstance(raw, dict) or not isinstance(raw.get("spec"), dict):
        raise _fail(path, "top level", "expected a mapping with a 'spec' section")
    apiversion = raw.get("apiversion", "multimodal_vlm_modelslim_v1")
    if apiversion != "multimodal_vlm_modelslim_v1":
        raise _fail(path, "apiversion", f"{apiversion!r} is not supported; allowed: ['multimodal_vlm_modelslim_v1']")
    spec = raw["spec"]
    _check_keys(path, "spec", spec, _SPEC_KEYS)
    process = spec.get("process")
    if not isinstance(process, list) or not process:
        raise _fail(path, "spec.process", "must be a non-empty list of processors")
    linear_quants = []
    for i, entry in enumerate(process):
        where = f"spec.process[{i}]"
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind == "linear_quant":
            linear_quants.append(_linear_quant(path, where, entry))
        elif kind in _NOT_YET:
            raise _fail(path, f"{where}.type", f"{kind!r} is not implemented in this version of dist-quant yet")
        else:
            raise _fail(path, f"{where}.type", f"unknown processor {kind!r}; allowed: ['linear_quant']")
    dataset = spec.get("dataset")
    default_text = spec.get("default_text")
    return Recipe(path, tuple(linear_quants), _part_file_size(path, spec.get("save")),
                  None if dataset is None else str(dataset), None if default_text is None else str(default_text))


def load_recipe(path: Union[str, Path, None] = None) -> Recipe:
    """Load and validate a recipe file (the bundled W8A8 recipe when ``path`` is None)."""
    path = Path(path) if path is not None else DEFAULT_RECIPE
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from None
    return parse_recipe(raw, path)
