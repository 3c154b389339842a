"""A family is one module (with its torch-free sizes module), and the rest of dist-quant names none.

1. Every registered family module has every member of ``Family`` (and of ``VisionFamily`` where its plan has the
   vision units), its sizes module every member of ``FamilySizes``, each function with the protocol's parameters (the
   same names in the same order, a default exactly where the protocol has one) and each constant of the protocol's
   type; the family module's sizes members are the sizes module's own objects (one home), and the sizes module
   imports no torch.
2. No Python file under dist_quant/ outside dist_quant/models/ names a family in code. A family's words are its
   ``MODEL_TYPE``, the names of its modules (a family module's name with anything after it, e.g. ``qwen3_vl_moe`` and
   ``qwen3_vl_moe_sizes``, ``qwen3_vl_moe_w8a8.yaml``) and its ``NAME`` (``Qwen3-VL-MoE``), each where no letter or
   digit (nor, before a module name, an underscore) touches it. Code is every identifier (names, attributes,
   imports, definitions, keywords) and every string literal, except: docstrings and comments (text for people), and
   in dist_quant/cli.py the help text: strings in the arguments of ``add_argument``, ``add_parser``, ``_command``
   and ``ArgumentParser`` calls, and the values of module constants named ``*_EXAMPLE``, ``*_EXAMPLES`` or
   ``*_HELP``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from dist_quant.models import family as protocol
from dist_quant.models.family import FAMILIES, Family, FamilySizes, VisionFamily, has_vision
from dist_quant.runtime.plan import Kind

PACKAGE = Path(protocol.__file__).resolve().parents[1]
MODELS = PACKAGE / "models"
HELP_CALLS = {"add_argument", "add_parser", "_command", "ArgumentParser"}
HELP_CONSTANT = re.compile(r"[A-Z0-9_]*_(EXAMPLES?|HELP)")


def protocol_members(cls: type) -> tuple[dict[str, object], dict[str, typing.Callable]]:
    """(constant name -> type, method name -> function) of a protocol, its base protocols' included."""
    protocols = [c for c in cls.__mro__ if c in (FamilySizes, Family, VisionFamily)]
    methods = {name: value for c in protocols for name, value in vars(c).items()
               if inspect.isfunction(value) and not name.startswith("_")}
    return typing.get_type_hints(cls, vars(protocol)), methods


def conforms(value, hint) -> bool:
    """Whether ``value`` is of the annotated type (the generics the protocols use: tuple, dict, Optional, Any)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if hint is type(None):
        return value is None
    if origin is typing.Union:
        return any(conforms(value, arg) for arg in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(conforms(item, args[0]) for item in value)
        return len(value) == len(args) and all(conforms(item, arg) for item, arg in zip(value, args))
    if origin is dict:
        return isinstance(value, dict) and all(conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items())
    return isinstance(value, origin or hint)


def signature_problems(name: str, declared: typing.Callable, function) -> list[str]:
    """How a module's function differs from the protocol's method (``self`` aside): parameter names, order, kinds
    and which have defaults."""
    if not callable(function):
        return [f"{name} is {type(function).__name__}, not a function"]
    wanted = list(inspect.signature(declared).parameters.values())[1:]
    have = list(inspect.signature(function).parameters.values())
    if [(p.name, p.kind) for p in have] != [(p.name, p.kind) for p in wanted]:
        return [f"{name}{inspect.signature(function)} takes other parameters than the protocol's "
                f"{name}({', '.join(str(p) for p in wanted)})"]
    empty = inspect.Parameter.empty
    return [f"{name}: parameter {p.name} {'has no default' if p.default is empty else 'has a default'}, unlike the "
            "protocol's" for p, q in zip(have, wanted) if (p.default is empty) != (q.default is empty)]


def conformance_problems(module, cls: type) -> list[str]:
    """Every member of protocol ``cls`` that ``module`` lacks or has in another form."""
    constants, methods = protocol_members(cls)
    problems = []
    for name, hint in constants.items():
        if not hasattr(module, name):
            problems.append(f"{module.__name__} has no {name}")
        elif not conforms(getattr(module, name), hint):
            problems.append(f"{module.__name__}.{name} = {getattr(module, name)!r} is not a {hint}")
    for name, declared in methods.items():
        if not hasattr(module, name):
            problems.append(f"{module.__name__} has no {name}()")
        else:
            problems += [f"{module.__name__}.{p}" for p in signature_problems(name, declared, getattr(module, name))]
    return problems


REGISTERED = sorted(FAMILIES)


def importable_family(module_name: str):
    """The family module, or a skip where this transformers has no model for it (Qwen3.5-MoE: transformers 5 only;
    its refusal is tests/test_qwen3_5_moe_sizes.py's)."""
    from dist_quant.errors import CheckpointError

    try:
        return importlib.import_module(module_name)
    except CheckpointError as error:
        pytest.skip(str(error))


@pytest.mark.parametrize("model_type", REGISTERED)
def test_a_registered_family_provides_the_whole_protocol(model_type):
    module_name, name, sizes_name = FAMILIES[model_type]
    sizes = importlib.import_module(sizes_name)
    family = importable_family(module_name)
    assert (sizes.MODEL_TYPE, sizes.NAME) == (model_type, name)
    assert conformance_problems(sizes, FamilySizes) == []
    assert conformance_problems(family, VisionFamily if has_vision(sizes) else Family) == []
    constants, methods = protocol_members(FamilySizes)
    for member in [*constants, *methods]:  # one home: the family module re-exports its sizes module's
        if callable(getattr(sizes, member)):
            assert getattr(family, member) is getattr(sizes, member), member
        else:
            assert getattr(family, member) == getattr(sizes, member), member


@pytest.mark.parametrize("model_type", REGISTERED)
def test_unit_kinds_calibration_and_vision_agree(model_type):
    sizes = importlib.import_module(FAMILIES[model_type][2])
    plan_order = [kind.value for kind in Kind]
    assert sorted(sizes.UNIT_KINDS, key=plan_order.index) == list(sizes.UNIT_KINDS)
    assert {"embed", "layer", "head"} <= set(sizes.UNIT_KINDS)
    vision = has_vision(sizes)
    assert ("images" in sizes.UNIT_KINDS) == vision
    assert (sizes.VISUAL is not None) == vision
    assert sizes.CALIBRATION in (protocol.IMAGE_AND_TEXT, protocol.TEXT_ONLY)
    if not vision:
        assert sizes.CALIBRATION == protocol.TEXT_ONLY  # images need a tower to read them


@pytest.mark.parametrize("model_type", REGISTERED)
def test_a_sizes_module_imports_no_torch(model_type):
    """``dist-quant plan`` and ``check`` read sizes without torch (importing it took seconds)."""
    code = f"import sys, {FAMILIES[model_type][2]}; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_conformance_check_can_fail():
    """The checks above find a missing member, a parameter renamed or given a default, and a constant of another
    type."""
    class Broken:
        __name__ = "broken"
        MODEL_TYPE = 3

        @staticmethod
        def layer_prefix(layer):
            return ""

        @staticmethod
        def expert_key(layer_idx, expert, proj="gate_proj"):
            return ""

    problems = "\n".join(conformance_problems(Broken(), FamilySizes))
    assert "broken.MODEL_TYPE = 3 is not a <class 'str'>" in problems
    assert "broken has no NAME" in problems and "broken has no tp_errors()" in problems
    assert "broken.layer_prefix(layer) takes other parameters" in problems
    assert "broken.expert_key: parameter proj has a default" in problems


# --- no family is named outside dist_quant/models/ ----------------------------------------------------------------

def family_words() -> re.Pattern:
    """Any registered family's MODEL_TYPE, module names (with what follows them) or NAME, standing alone."""
    modules, names = set(), set()
    for model_type, (module_name, name, sizes_name) in FAMILIES.items():
        modules |= {model_type, module_name.rsplit(".", 1)[1], sizes_name.rsplit(".", 1)[1]}
        names.add(name)
    module_words = "|".join(re.escape(m) for m in sorted(modules, key=len, reverse=True))
    name_words = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<![A-Za-z0-9_])(?:{module_words})|(?<![A-Za-z0-9])(?:{name_words})(?![A-Za-z0-9])")


def _docstrings(tree: ast.AST) -> set[int]:
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    return {id(n.body[0].value) for n in nodes
            if n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)
            and isinstance(n.body[0].value.value, str)}


def _help_text(tree: ast.AST) -> set[int]:
    """The string nodes of cli.py that are help text (see the module docstring)."""
    roots = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if called in HELP_CALLS:
                roots += [*node.args, *(k.value for k in node.keywords)]
    for node in tree.body:
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and HELP_CONSTANT.fullmatch(t.id)
                                                for t in node.targets):
            roots.append(node.value)
    return {id(n) for root in roots for n in ast.walk(root) if isinstance(n, ast.Constant)}


def _identifiers(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        return [node.attr]
    if isinstance(node, ast.alias):
        return [node.name, node.asname or ""]
    if isinstance(node, ast.ImportFrom):
        return [node.module or ""]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.arg):
        return [node.arg]
    if isinstance(node, ast.keyword):
        return [node.arg or ""]
    return []


def family_names_in_code(path: Path, source: str, words: re.Pattern) -> list[str]:
    """'file:line: word' for each family word in the code of one file (the module docstring's rule)."""
    tree = ast.parse(source)
    allowed = _docstrings(tree) | (_help_text(tree) if path.name == "cli.py" else set())
    found = []
    for node in ast.walk(tree):
        texts = _identifiers(node)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in allowed:
            texts.append(node.value)
        found += [f"{path}:{getattr(node, 'lineno', 0)}: {m.group(0)}" for text in texts for m in words.finditer(text)]
    return found


def test_no_family_is_named_outside_the_models_package():
    words = family_words()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        # presets.py is the presets' table (model names and their recipes) and synthetic.py builds each family's tiny
        # test model: data and test fixtures, as recipes and tests are, not branches of the tool on a family
        if MODELS not in path.parents and path not in (PACKAGE / "presets.py", PACKAGE / "synthetic.py"):
            found += family_names_in_code(path.relative_to(PACKAGE.parent), path.read_text(), words)
    assert found == []


def test_the_naming_rule_finds_what_it_forbids_and_passes_what_it_allows():
    words = family_words()
    code = '''"""Quantizes Qwen3-VL-MoE (a docstring: for people)."""
from dist_quant.models import qwen3_vl_moe_sizes as family  # qwen3_moe in a comment: for people
RECIPE = "qwen3_moe_w8a8.yaml"
QUANT_EXAMPLE = "dist-quant quant --model_path /models/a-Qwen3-MoE"

def f(config):
    """Qwen3-MoE here is a docstring."""
    parser.add_argument("--x", help="a Qwen3-MoE checkpoint")
    return config.model_type == "qwen3_vl_moe" or NAME == "Qwen3-MoE" or "Qwen3-MoEx" or "myqwen3_moe"
'''

    def found(path: str) -> list[str]:
        return sorted(line.split(": ", 1)[1] for line in family_names_in_code(Path(path), code, words))

    in_code = ["qwen3_vl_moe_sizes", "qwen3_moe", "qwen3_vl_moe", "Qwen3-MoE"]
    assert found("dist_quant/cli.py") == sorted(in_code)
    assert found("dist_quant/runtime/x.py") == sorted(in_code + ["Qwen3-MoE", "Qwen3-MoE"])  # help text, outside cli
