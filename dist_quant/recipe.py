"""The quantization recipe: an msModelSlim ``multimodal_vlm_modelslim_v1`` or ``modelslim_v1`` YAML file as typed
objects.

The recipe is the contract users already know from msModelSlim, so the file format is theirs: a ``spec.process`` list
of processors with include/exclude globs, a ``spec.save`` list and the calibration ``dataset`` (and, for the
multimodal format, ``default_text``). ``modelslim_v1`` is msModelSlim's format for text-only models; its ``group``
processor, a list of ``linear_quant`` entries msModelSlim calibrates in one pass, reads here as those entries in
order. Globs are fnmatch patterns matched against whole module names, where ``*`` also spans dots; the first
``linear_quant`` that selects a linear wins, as in msModelSlim (a linear it has quantized is no longer an
``nn.Linear`` that a later one selects, inside a group or not).

The file is read strictly: duplicate keys, aliases that expand past a small bound and values of the wrong type are
refused with one line naming the file and the field, and numbers follow YAML 1.2 (``1e-5`` is a number).
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from dist_quant import schemes
from dist_quant.checkpoint.formats import DEFAULT_SAVER, SAVERS
from dist_quant.errors import RecipeError, show
from dist_quant.presets import DEFAULT_MODEL_TYPE, DEFAULT_QUANT_TYPE, find_preset
from dist_quant.schemes import FLOAT, QSpec

log = logging.getLogger("dist_quant")

DEFAULT_RECIPE = find_preset(DEFAULT_MODEL_TYPE, DEFAULT_QUANT_TYPE).recipe  # the default preset's

# apiversion -> the spec fields it has (msModelSlim's prior/runner stages are not dist-quant's to run)
APIVERSIONS = {"multimodal_vlm_modelslim_v1": {"process", "save", "dataset", "default_text"},
               "modelslim_v1": {"process", "save", "dataset"}}
DEFAULT_APIVERSION = "multimodal_vlm_modelslim_v1"  # a recipe without apiversion, as dist-quant has always read it
_LINEAR_QUANT_KEYS = {"type", "qconfig", "include", "exclude"}
_GROUP_KEYS = {"type", "configs"}
_QSPEC_KEYS = {"scope", "dtype", "symmetric", "method", "ext"}
_QUAROT_KEYS = {"type", "block_size", "seed"}
_SMOOTH_KEYS = {"type", "alpha", "scale_min", "symmetric", "enable_subgraph_type", "include", "exclude"}
SUBGRAPH_TYPES = ("norm-linear", "linear-linear", "ov", "up-down")
PROCESSOR_TYPES = ("quarot", "iter_smooth", "linear_quant", "group")
_STAGE = {"quarot": 0, "iter_smooth": 1, "linear_quant": 2, "group": 2}  # where each may stand in spec.process
NOT_IMPLEMENTED = {  # msModelSlim processors a user may bring, and what to do instead
    "flex_smooth_quant": "flex_smooth_quant (msModelSlim's alpha/beta search) is not implemented; use iter_smooth "
                         "(SmoothQuant scales from one fixed alpha, e.g. alpha: 0.9, on the subgraphs of its "
                         "enable_subgraph_type) in its place, or remove it",
}
# glob characters msModelSlim's matcher (wcmatch with BRACE) reads specially and Python's fnmatch does not
_MSMODELSLIM_ONLY_GLOB = (
    ("{", "msModelSlim expands braces ({a,b}) and dist-quant does not: write one glob per alternative"),
    ("}", "msModelSlim expands braces ({a,b}) and dist-quant does not: write one glob per alternative"),
    ("\\", "msModelSlim reads a backslash as an escape and dist-quant does not: module names have nothing to "
            "escape, so leave it out"),
    ("[^", "msModelSlim reads [^...] as a negated set and dist-quant reads ^ as a character: write [!...]"),
)
MAX_BLOCK_SIZE = 2**14  # QuaRot builds a block_size x block_size float64 matrix: 2 GiB at this size
MAX_SEED = 2**64  # torch.Generator.manual_seed takes seeds below this
MAX_PART_FILE_GB = 2**20  # 1 PiB: anything larger is a typo
MAX_ALIAS_EXPANSION = 100_000  # nodes and scalar characters that aliases may add (the bundled recipes add ~300)


@dataclass(frozen=True)
class LinearQuant:
    """A ``linear_quant`` processor: a quantization scheme applied to the linears its globs select."""

    quant_type: str
    act: QSpec
    weight: QSpec
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    where: str = "spec.process"  # its place in the recipe, e.g. "spec.process[2]", for errors

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

    def selects(self, module_name: str) -> bool:
        return _selected(module_name, self.include, self.exclude)

    def smooths(self, subgraph: str, module_name: str) -> bool:
        """Whether the subgraph whose first linear is ``module_name`` is smoothed."""
        return subgraph in self.subgraphs and self.selects(module_name)


def _selected(name: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    """fnmatch's rules (case-sensitive), each glob list as one compiled alternation: a 235B's ~41,000 linears are
    matched against every processor when the plan is made."""
    return bool(_any_glob(include).match(name)) and not _any_glob(exclude).match(name)


@functools.lru_cache(maxsize=256)
def _any_glob(globs: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs) or "(?!)")


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

    def needs_hessian(self, module_name: str) -> bool:
        """Whether a linear's scheme rounds it with the Gram matrix of its calibration inputs (GPTQ)."""
        processor = self.linear_quant(module_name)
        return processor is not None and schemes.get(processor.quant_type).needs_hessian(processor.weight)


def check_linear_quants_apply(recipe: Recipe, *linears: Iterable[str]) -> None:
    """Refuse a ``linear_quant`` processor that no linear of the model gets: a typo in a glob (or globs that only
    select linears an earlier processor takes, as the first match wins) would otherwise leave its linears FLOAT and
    publish with exit 0. ``linears``: the model's linear module names, in one or more iterables, read lazily and only
    until every processor has a linear, so a large model is walked in full only when a processor is refused."""
    processors = recipe.linear_quants
    used = [False] * len(processors)
    taken_by: dict[int, int] = {}  # processor -> an earlier processor that took a linear it also selects
    example = None
    for name in chain.from_iterable(linears):
        example = example or name
        selecting = [i for i, processor in enumerate(processors) if processor.selects(name)]
        if selecting and not used[selecting[0]]:
            used[selecting[0]] = True
            if all(used):
                return
        taken_by.update((i, selecting[0]) for i in selecting[1:] if i not in taken_by)
    idle = used.index(False)
    processor = processors[idle]
    what = (f"linear_quant {processor.quant_type} with include {list(processor.include)} and exclude "
            f"{list(processor.exclude)}")
    if idle in taken_by:
        earlier = processors[taken_by[idle]].where
        raise _fail(recipe.path, processor.where, f"{what} only selects linears that {earlier} takes first (the first "
                                                  "linear_quant that selects a linear wins): narrow that one's globs "
                                                  "or remove this one")
    raise _fail(recipe.path, processor.where, f"{what} selects no linear of this model (globs match whole module "
                                              f"names such as {example!r}): fix its globs or remove it")


def _fail(path: Path, where: str, message: str) -> RecipeError:
    return RecipeError(f"recipe {path}: {where}: {message}")


def _text(path: Path, where: str, raw: Any) -> str:
    """A string field; lone surrogates (a YAML "\\ud800" escape) would fail later, in the tokenizer or a path."""
    if not isinstance(raw, str):
        raise _fail(path, where, f"{show(raw)} must be a string")
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError as bad:
        raise _fail(path, where, f"{show(raw)} has a character that is not Unicode text (at {bad.start})") from None
    return raw


def _check_keys(path: Path, where: str, given: dict, allowed: set[str]) -> None:
    unknown = sorted(set(given) - allowed, key=str)  # keys may be numbers or None as well as strings
    if unknown:
        raise _fail(path, where, f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")


def _qspec(path: Path, where: str, raw: Any) -> QSpec:
    if not isinstance(raw, dict):
        raise _fail(path, where, "must be a mapping with scope, dtype, symmetric, method")
    _check_keys(path, where, raw, _QSPEC_KEYS)
    try:
        symmetric = raw["symmetric"]
        if not isinstance(symmetric, bool):  # bool("False") is True: a quoted value would flip the scheme silently
            raise _fail(path, f"{where}.symmetric", f"{show(symmetric)} must be True or False (unquoted)")
        return QSpec(_text(path, f"{where}.scope", raw["scope"]), _text(path, f"{where}.dtype", raw["dtype"]),
                     symmetric, _text(path, f"{where}.method", raw.get("method", "minmax")),
                     _ext(path, f"{where}.ext", raw.get("ext", {})))
    except KeyError as missing:
        raise _fail(path, where, f"missing field {missing}") from None


def _ext(path: Path, where: str, raw: Any) -> tuple[tuple[str, object], ...]:
    """A qconfig side's ``ext`` options (msModelSlim writes e.g. ``ext: {group_size: 64}``): plain values only, as
    YAML 1.2 reads them (``damp: 1e-2`` is a number; a quoted ``"1e-2"`` stays a string), for the scheme to check."""
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, (bool, int, float, str))
                                            for k, v in raw.items()):
        raise _fail(path, where, "must be a mapping of option names to plain values")
    for key, value in raw.items():
        _text(path, f"{where}.{key}", key)
        if isinstance(value, str):
            _text(path, f"{where}.{key}", value)
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
    takers = [s for s in schemes.SELECTABLE if s.takes_weight(weight)]
    if takers and act == schemes.UNQUANTIZED_ACT:
        needed = " or ".join(f"{_show_spec(s.act)} ({s.name})" for s in takers)
        raise _fail(path, where, f"has no act (weight-only), which its weight {_show_spec(weight)} is not offered "
                                 f"with: add act {needed}")
    allowed = "; ".join(f"{s.name}: act {_show_spec(s.act, True)}, weight {_show_spec(s.weight, True)}"
                        + "".join(f"|{m}" for m in s.weight_methods)
                        for s in schemes.SELECTABLE)  # `dist-quant presets` and the README describe each
    side, spec = ("act", act) if takers else ("weight", weight)
    raise _fail(path, f"{where}.{side}", f"{_show_spec(spec)} is not supported; use one of: {allowed}")


def _show_spec(spec: QSpec, short: bool = False) -> str:
    """A qconfig side in a message; ``short``: as the list of every scheme's spells it (one line for all)."""
    if spec == schemes.UNQUANTIZED_ACT:
        return "left out (not quantized)"
    symmetry = ("sym" if short else "symmetric") if spec.symmetric else ("asym" if short else "asymmetric")
    return f"{spec.scope} {spec.dtype} {symmetry} {spec.method}"


def _globs(path: Path, where: str, raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(p, str) and p for p in raw):
        raise _fail(path, where, f"{show(raw)} must be a list of non-empty glob strings")
    for pattern in raw:
        _text(path, where, pattern)
        if pattern.count("[") != pattern.count("]"):
            raise _fail(path, where, f"bad glob {show(pattern)}: unbalanced brackets")
        for text, advice in _MSMODELSLIM_ONLY_GLOB:
            if text in pattern:
                raise _fail(path, where, f"bad glob {show(pattern)}: {advice}")
    return tuple(raw)


def _include(path: Path, where: str, raw: Any) -> tuple[str, ...]:
    """A processor's ``include`` globs (every module when left out); an empty list would select nothing."""
    include = _globs(path, where, raw)
    if not include:
        raise _fail(path, where, "is empty, so the processor selects nothing: list globs, or leave include out to "
                                 "select every module")
    return include


def _linear_quant(path: Path, where: str, raw: dict) -> LinearQuant:
    _check_keys(path, where, raw, _LINEAR_QUANT_KEYS)
    qconfig = raw.get("qconfig")
    if not isinstance(qconfig, dict) or "weight" not in qconfig:
        raise _fail(path, f"{where}.qconfig", "must be a mapping with weight, and act unless the activations stay "
                                              "unquantized (W8A16)")
    _check_keys(path, f"{where}.qconfig", qconfig, {"act", "weight"})
    act = _qspec(path, f"{where}.qconfig.act", qconfig["act"]) if "act" in qconfig else schemes.UNQUANTIZED_ACT
    weight = _qspec(path, f"{where}.qconfig.weight", qconfig["weight"])
    include = _include(path, f"{where}.include", raw.get("include", ["*"]))
    return LinearQuant(_scheme(path, f"{where}.qconfig", act, weight), act, weight, include,
                       _globs(path, f"{where}.exclude", raw.get("exclude")), where)


def _group(path: Path, where: str, raw: dict) -> list[LinearQuant]:
    """A ``group`` processor (msModelSlim's way to calibrate several ``linear_quant`` entries in one pass): its
    entries, in order, each named by its place (``spec.process[1].configs[0]``)."""
    _check_keys(path, where, raw, _GROUP_KEYS)
    configs = raw.get("configs")
    if not isinstance(configs, list) or not configs:
        raise _fail(path, f"{where}.configs", "must be a non-empty list of linear_quant processors")
    entries = []
    for j, entry in enumerate(configs):
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind != "linear_quant":
            explained = NOT_IMPLEMENTED.get(kind) if isinstance(kind, str) else None
            raise _fail(path, f"{where}.configs[{j}].type", explained or f"{show(kind)} cannot be in a group here; a "
                                                                          "group holds linear_quant processors")
        entries.append(_linear_quant(path, f"{where}.configs[{j}]", entry))
    return entries


def _number(path: Path, where: str, raw: Any, low: float, high: float, low_open: bool = True) -> float:
    if isinstance(raw, str):  # a quoted number, which msModelSlim's own reader converts too
        try:
            raw = float(raw)
        except ValueError:
            pass
    ok = isinstance(raw, (int, float)) and not isinstance(raw, bool) and (raw > low if low_open else raw >= low) \
        and raw <= high
    if not ok:
        bound = f"{'(' if low_open else '['}{low}, {high}]"
        raise _fail(path, where, f"{show(raw)} must be a number in {bound}")
    return float(raw)


def _quarot(path: Path, where: str, raw: dict) -> QuaRot:
    _check_keys(path, where, raw, _QUAROT_KEYS)
    block = raw.get("block_size", 32)
    if not isinstance(block, int) or isinstance(block, bool) or not 2 <= block <= MAX_BLOCK_SIZE or block & (block - 1):
        raise _fail(path, f"{where}.block_size", f"{show(block)} must be a power of two from 2 to {MAX_BLOCK_SIZE} "
                                                 "(a Hadamard block size)")
    seed = raw.get("seed", 1234)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < MAX_SEED:
        raise _fail(path, f"{where}.seed", f"{show(seed)} must be an integer from 0 to 2**64 - 1")
    return QuaRot(block, seed)


def _iter_smooth(path: Path, where: str, raw: dict) -> IterSmooth:
    _check_keys(path, where, raw, _SMOOTH_KEYS)
    if raw.get("symmetric", True) is not True:
        raise _fail(path, f"{where}.symmetric", "only symmetric smoothing (True) is supported (no shift)")
    subgraphs = raw.get("enable_subgraph_type", ["norm-linear", "ov"])
    if not isinstance(subgraphs, list) or not all(isinstance(s, str) and s in SUBGRAPH_TYPES for s in subgraphs):
        raise _fail(path, f"{where}.enable_subgraph_type", f"{show(subgraphs)}: must be a list of "
                                                           f"{list(SUBGRAPH_TYPES)}")
    return IterSmooth(_number(path, f"{where}.alpha", raw.get("alpha", 0.9), 0.0, 1.0),
                      _number(path, f"{where}.scale_min", raw.get("scale_min", 1e-5), 0.0, 1.0),
                      tuple(subgraphs), _include(path, f"{where}.include", raw.get("include", ["*"])),
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
    if not isinstance(saver.get("type"), str) or saver["type"] not in SAVERS:
        raise _fail(path, "spec.save[0].type", f"{show(saver.get('type'))} is not supported; allowed: {list(SAVERS)}")
    size = saver.get("part_file_size", 4)
    if isinstance(size, bool) or not isinstance(size, (int, float)) or not 0 <= size <= MAX_PART_FILE_GB:
        raise _fail(path, "spec.save[0].part_file_size", f"{show(size)} must be a number of GB >= 0 (at most "
                                                         f"{MAX_PART_FILE_GB})")
    return saver["type"], float(size)


def parse_recipe(raw: Any, path: Path) -> Recipe:
    """Validate a loaded recipe document; errors name the field and the allowed values."""
    if not isinstance(raw, dict) or not isinstance(raw.get("spec"), dict):
        raise _fail(path, "top level", "expected a mapping with a 'spec' section")
    apiversion = raw.get("apiversion", DEFAULT_APIVERSION)
    if apiversion == "modelslim_v0":
        raise _fail(path, "apiversion", "'modelslim_v0' is msModelSlim's legacy recipe format (anti_cfg, calib_cfg), "
                                        "which dist-quant does not read; write it as a modelslim_v1 recipe (a "
                                        "spec.process list: see configs/README.md) or start from a bundled one")
    if not isinstance(apiversion, str) or apiversion not in APIVERSIONS:  # a list is unhashable
        raise _fail(path, "apiversion", f"{show(apiversion)} is not supported; allowed: {list(APIVERSIONS)}")
    spec = raw["spec"]
    _check_keys(path, "spec", spec, APIVERSIONS[apiversion])
    process = spec.get("process")
    if not isinstance(process, list) or not process:
        raise _fail(path, "spec.process", "must be a non-empty list of processors")
    linear_quants, quarot, smooth = [], None, None
    last = -1  # processors run in the order quarot -> iter_smooth -> linear_quant/group, as msModelSlim runs them
    for i, entry in enumerate(process):
        where = f"spec.process[{i}]"
        kind = entry.get("type") if isinstance(entry, dict) else None
        if isinstance(kind, str) and kind in NOT_IMPLEMENTED:
            raise _fail(path, f"{where}.type", NOT_IMPLEMENTED[kind])
        if kind not in PROCESSOR_TYPES:
            raise _fail(path, f"{where}.type", f"unknown processor {show(kind)}; allowed: {list(PROCESSOR_TYPES)}")
        if _STAGE[kind] < last or (_STAGE[kind] == last and kind not in ("linear_quant", "group")):
            raise _fail(path, where, f"{kind!r} is out of place: use at most one quarot, then at most one "
                                     "iter_smooth, then the linear_quant (and group) entries")
        last = _STAGE[kind]
        if kind == "quarot":
            quarot = _quarot(path, where, entry)
        elif kind == "iter_smooth":
            smooth = _iter_smooth(path, where, entry)
        elif kind == "group":
            linear_quants.extend(_group(path, where, entry))
        else:
            linear_quants.append(_linear_quant(path, where, entry))
    if not linear_quants:
        raise _fail(path, "spec.process", "needs at least one linear_quant processor (alone or in a group)")
    dataset = spec.get("dataset")
    if dataset is not None and (not _text(path, "spec.dataset", dataset) or "\0" in dataset):
        raise _fail(path, "spec.dataset", f"{show(dataset)} must be a folder name or path (non-empty, no NUL)")
    default_text = spec.get("default_text")
    saver, part_file_size = _saver(path, spec.get("save"))
    return Recipe(path, tuple(linear_quants), part_file_size, dataset,
                  None if default_text is None else _text(path, "spec.default_text", default_text), quarot, smooth,
                  saver)


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, strict where the plain one misleads or explodes: a duplicate key is refused (the plain
    loader keeps the last, so a second ``include:`` silently replaced the first), aliases may not expand past
    MAX_ALIAS_EXPANSION (a "billion laughs" document is a few lines that expand to gigabytes when printed or
    copied), a value its constructor cannot build is a YAML error at its line, and numbers follow YAML 1.2, so
    msModelSlim's ``1e-5`` (no dot) is a number, as msModelSlim's readers treat it, not YAML 1.1's string."""

    def compose_document(self) -> yaml.Node:
        root = super().compose_document()
        added = _alias_expansion(root)
        if added > MAX_ALIAS_EXPANSION:
            raise yaml.composer.ComposerError(None, None, f"its aliases expand to more than {MAX_ALIAS_EXPANSION} "
                                              "further nodes and characters (an alias bomb?); write the repeated "
                                              "parts out", root.start_mark)
        return root

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden by the keys beside it
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = first.setdefault(key, key_node)
            except TypeError:  # unhashable: the base constructor names it
                continue
            if earlier is not key_node:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {show(key)} (first at line "
                                                        f"{earlier.start_mark.line + 1}): remove one of them",
                                                        key_node.start_mark)
        return super().construct_mapping(node, deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as bad:  # a 5000-digit integer, the date 2024-13-45
            raise yaml.constructor.ConstructorError(None, None, f"cannot read {show(node.value)}: {bad}",
                                                    node.start_mark) from None


_RecipeLoader.add_implicit_resolver(  # YAML 1.2 floats that YAML 1.1 misses: an exponent without a dot or sign
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def _alias_expansion(root: yaml.Node) -> int:
    """How many nodes and scalar characters a document's aliases add when written out in full: its expanded size
    less its distinct size, counted once per distinct node (so a bomb is measured in time linear in its text).
    An alias inside the node it names (a recursive structure) is refused."""
    expanded: dict[int, int] = {}
    open_nodes: set[int] = set()
    distinct = 0

    def size(node: yaml.Node) -> int:
        nonlocal distinct
        if id(node) in expanded:
            return expanded[id(node)]
        if id(node) in open_nodes:
            raise yaml.composer.ComposerError(None, None, "an alias refers to a node that contains it (a recursive "
                                              "structure)", node.start_mark)
        open_nodes.add(id(node))
        own = 1 + len(node.value) if isinstance(node, yaml.ScalarNode) else 1
        children = node.value if isinstance(node, yaml.SequenceNode) else \
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
        expanded[id(node)] = own + sum(size(child) for child in children)
        distinct += own
        open_nodes.discard(id(node))
        return expanded[id(node)]

    return size(root) - distinct


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
        raw = yaml.load(read_text(path), Loader=_RecipeLoader)  # a SafeLoader: no Python objects
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
