"""The quantization recipe: an msModelSlim ``multimodal_vlm_modelslim_v1`` YAML file as typed objects.

The recipe is the contract users already know from msModelSlim, so the file format is theirs: a ``spec.process`` list
of processors with include/exclude globs, a ``spec.save`` list and the calibration ``dataset``/``default_text``.
Globs are fnmatch patterns matched against whole module names, where ``*`` also spans dots.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from dist_quant import schemes
from dist_quant.checkpoint.formats import SAVERS
from dist_quant.errors import RecipeError
from dist_quant.schemes import FLOAT, QSpec

log = logging.getLogger("dist_quant")

DEFAULT_SAVER = "ascendv1_saver"
BUNDLED_CONFIGS = Path(__file__).parent / "configs"
DEFAULT_RECIPE = BUNDLED_CONFIGS / "qwen3_vl_moe_w8a8.yaml"

_SPEC_KEYS = {"process", "save", "dataset", "default_text"}
_LINEAR_QUANT_KEYS = {"type", "qconfig", "include", "exclude"}
_QSPEC_KEYS = {"scope", "dtype", "symmetric", "method", "ext"}
_QUAROT_KEYS = {"type", "block_size", "seed"}
_SMOOTH_KEYS = {"type", "alpha", "scale_min", "symmetric", "enable_subgraph_type", "include", "exclude"}
SUBGRAPH_TYPES = ("norm-linear", "linear-linear", "ov", "up-down")
PROCESSOR_TYPES = ("quarot", "iter_smooth", "linear_quant")


@dataclass(frozen=True)
class LinearQuant:
    """A ``linear_quant`` processor: a quantization scheme applied to the linears its globs select."""

    quant_type: str
    act: QSpec
    weight: QSpec
    include: tuple[str, ...]
    exclude: tuple[str, ...]

    def selects(self, module_name: str) -> bool:
        return _selected(module_name, self.include, self.exclude)


@dataclass(frozen=True)
class QuaRot:
    """Rotate the text residual stream with a block-diagonal random Hadamard matrix (msModelSlim's seed: 1234)."""

    block_size: int = 32
    seed: int = 1234


@dataclass(frozen=True)
class IterSmooth:
    """SmoothQuant-style scales per subgraph: ``s = a^alpha / w^(1 - alpha)`` clamped to >= scale_min."""

    alpha: float = 0.9
    scale_min: float = 1e-5
    subgraphs: tuple[str, ...] = ("norm-linear", "ov")
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()

    def smooths(self, subgraph: str, module_name: str) -> bool:
        """Whether the subgraph whose first linear is ``module_name`` is smoothed."""
        return subgraph in self.subgraphs and _selected(module_name, self.include, self.exclude)


def _selected(name: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in include) and not any(fnmatch.fnmatchcase(name, p) for p in exclude)


@dataclass(frozen=True)
class Recipe:
    path: Path
    linear_quants: tuple[LinearQuant, ...]
    part_file_size_gb: float
    dataset: str | None
    default_text: str | None
    quarot: QuaRot | None = None
    smooth: IterSmooth | None = None
    saver: str = DEFAULT_SAVER  # names the output format: checkpoint.formats.for_saver(saver)

    def linear_quant(self, module_name: str) -> Optional[LinearQuant]:
        """The ``linear_quant`` processor of a linear module: the first that selects it, None if none does."""
        return next((p for p in self.linear_quants if p.selects(module_name)), None)

    def quant_type(self, module_name: str) -> str:
        """The quant type of a linear module (FLOAT when no ``linear_quant`` selects it)."""
        processor = self.linear_quant(module_name)
        return FLOAT if processor is None else processor.quant_type


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
        symmetric = raw["symmetric"]
        if not isinstance(symmetric, bool):  # bool("False") is True: a quoted value would flip the scheme silently
            raise _fail(path, f"{where}.symmetric", f"{symmetric!r} must be True or False (unquoted)")
        return QSpec(str(raw["scope"]), str(raw["dtype"]), symmetric, str(raw.get("method", "minmax")),
                     _ext(path, f"{where}.ext", raw.get("ext", {})))
    except KeyError as missing:
        raise _fail(path, where, f"missing field {missing}") from None


def _ext(path: Path, where: str, raw: Any) -> tuple[tuple[str, object], ...]:
    """A qconfig side's ``ext`` options (msModelSlim writes e.g. ``ext: {group_size: 64}``): plain values only."""
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, (bool, int, float, str))
                                            for k, v in raw.items()):
        raise _fail(path, where, "must be a mapping of option names to plain values")
    return tuple(sorted(raw.items()))


def _scheme(path: Path, where: str, act: QSpec, weight: QSpec) -> str:
    """The registered scheme (dist_quant/schemes/) of a qconfig; anything else is refused, naming the processor."""
    scheme = schemes.for_qconfig(act, weight)
    if scheme is not None:
        for side, spec in (("act", act), ("weight", weight)):
            unknown = sorted(k for k, _ in spec.ext if k not in scheme.ext_keys)
            if unknown:
                raise _fail(path, f"{where}.{side}.ext", f"{scheme.name} has no option(s) {unknown}; it takes "
                                                         f"{list(scheme.ext_keys) or 'none'}")
            try:
                notes = scheme.check_ext(side, spec)
            except ValueError as bad:
                raise _fail(path, f"{where}.{side}.ext", str(bad)) from None
            for note in notes:
                log.warning("recipe %s: %s.%s.ext: %s", path, where, side, note)
        return scheme.name
    allowed = "; ".join(f"{s.name}: {s.summary}" for s in schemes.SELECTABLE)
    side, spec = ("weight", weight) if all(s.weight != weight for s in schemes.SELECTABLE) else ("act", act)
    raise _fail(path, f"{where}.{side}", f"{_show_spec(spec)} is not supported; use one of: {allowed}")


def _show_spec(spec: QSpec) -> str:
    return (f"{spec.scope} {spec.dtype} {'symmetric' if spec.symmetric else 'asymmetric'} {spec.method}")


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


def _number(path: Path, where: str, raw: Any, low: float, high: float, low_open: bool = True) -> float:
    if isinstance(raw, str):  # YAML 1.1 reads msModelSlim's `scale_min: 1e-5` (no dot) as a string
        try:
            raw = float(raw)
        except ValueError:
            pass
    ok = isinstance(raw, (int, float)) and not isinstance(raw, bool) and (raw > low if low_open else raw >= low) \
        and raw <= high
    if not ok:
        bound = f"{'(' if low_open else '['}{low}, {high}]"
        raise _fail(path, where, f"{raw!r} must be a number in {bound}")
    return float(raw)


def _quarot(path: Path, where: str, raw: dict) -> QuaRot:
    _check_keys(path, where, raw, _QUAROT_KEYS)
    block = raw.get("block_size", 32)
    if not isinstance(block, int) or isinstance(block, bool) or block < 2 or block & (block - 1):
        raise _fail(path, f"{where}.block_size", f"{block!r} must be a power of two >= 2 (a Hadamard block size)")
    seed = raw.get("seed", 1234)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _fail(path, f"{where}.seed", f"{seed!r} must be an integer")
    return QuaRot(block, seed)


def _iter_smooth(path: Path, where: str, raw: dict) -> IterSmooth:
    _check_keys(path, where, raw, _SMOOTH_KEYS)
    if raw.get("symmetric", True) is not True:
        raise _fail(path, f"{where}.symmetric", "only symmetric smoothing (True) is supported (no shift)")
    subgraphs = raw.get("enable_subgraph_type", ["norm-linear", "ov"])
    if not isinstance(subgraphs, list) or not set(subgraphs) <= set(SUBGRAPH_TYPES):
        raise _fail(path, f"{where}.enable_subgraph_type", f"{subgraphs!r}: allowed values {list(SUBGRAPH_TYPES)}")
    return IterSmooth(_number(path, f"{where}.alpha", raw.get("alpha", 0.9), 0.0, 1.0),
                      _number(path, f"{where}.scale_min", raw.get("scale_min", 1e-5), 0.0, 1.0),
                      tuple(subgraphs), _globs(path, f"{where}.include", raw.get("include", ["*"])),
                      _globs(path, f"{where}.exclude", raw.get("exclude")))


def _saver(path: Path, raw: Any) -> tuple[str, float]:
    """(saver type, part_file_size) of ``spec.save``; the saver type names the output format
    (dist_quant/checkpoint/formats/)."""
    if raw is None:
        return DEFAULT_SAVER, 4.0
    if not isinstance(raw, list) or len(raw) != 1 or not isinstance(raw[0], dict):
        raise _fail(path, "spec.save", f"must be a list with one saver entry (one of {list(SAVERS)})")
    saver = raw[0]
    _check_keys(path, "spec.save[0]", saver, {"type", "part_file_size"})
    if saver.get("type") not in SAVERS:
        raise _fail(path, "spec.save[0].type", f"{saver.get('type')!r} is not supported; allowed: {list(SAVERS)}")
    size = saver.get("part_file_size", 4)
    if isinstance(size, bool) or not isinstance(size, (int, float)) or not 0 <= size < math.inf:
        raise _fail(path, "spec.save[0].part_file_size", f"{size!r} must be a number of GB >= 0")
    return saver["type"], float(size)


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
    linear_quants, quarot, smooth = [], None, None
    last = -1  # processors run in the order quarot -> iter_smooth -> linear_quant, as msModelSlim runs them
    for i, entry in enumerate(process):
        where = f"spec.process[{i}]"
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind not in PROCESSOR_TYPES:
            raise _fail(path, f"{where}.type", f"unknown processor {kind!r}; allowed: {list(PROCESSOR_TYPES)}")
        if PROCESSOR_TYPES.index(kind) < last or (kind != "linear_quant" and PROCESSOR_TYPES.index(kind) == last):
            raise _fail(path, where, f"{kind!r} is out of place: use at most one quarot, then at most one "
                                     "iter_smooth, then the linear_quant entries")
        last = PROCESSOR_TYPES.index(kind)
        if kind == "quarot":
            quarot = _quarot(path, where, entry)
        elif kind == "iter_smooth":
            smooth = _iter_smooth(path, where, entry)
        else:
            linear_quants.append(_linear_quant(path, where, entry))
    if not linear_quants:
        raise _fail(path, "spec.process", "needs at least one linear_quant processor")
    dataset = spec.get("dataset")
    default_text = spec.get("default_text")
    saver, part_file_size = _saver(path, spec.get("save"))
    return Recipe(path, tuple(linear_quants), part_file_size,
                  None if dataset is None else str(dataset), None if default_text is None else str(default_text),
                  quarot, smooth, saver)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Where and what the YAML error is, in one line: PyYAML's own message quotes the offending lines of the file."""
    problem = getattr(error, "problem", None) or getattr(error, "context", None) or type(error).__name__
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    problem = " ".join(str(problem).split())
    return f"{problem[:200]}{where}"


def load_recipe(path: Union[str, Path, None] = None) -> Recipe:
    """Load and validate a recipe file (the bundled W8A8 recipe when ``path`` is None)."""
    from dist_quant.checkpoint.safetensors_stream import read_text  # FIFO-safe; no torch at import time

    path = Path(path) if path is not None else DEFAULT_RECIPE
    try:
        raw = yaml.safe_load(read_text(path))
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe {path} is not UTF-8 text (invalid byte at offset {exc.start}); save it as "
                          "UTF-8") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise RecipeError(f"recipe {path} is not a usable recipe: it is nested too deeply to parse") from None
    return parse_recipe(raw, path)
