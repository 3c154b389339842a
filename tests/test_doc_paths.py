"""Every repository path the docs and the code's own prose cite exists, and configs/ links every bundled recipe.

Where paths are collected: the whole text of README.md, docs/*.md and configs/README.md; the docstrings and ``#``
comments of tests/*.py, dist_quant/**/*.py and scripts/*.py; the full-line ``#`` comments of the shell scripts
(launch/*.sh, launch/*.sbatch, scripts/*.sh, .ci/run). String literals in code are not prose and are not read.

What counts as a repository path (everything else is ignored):
- a token that starts with a top-level folder of the repository, ``dist_quant/``, ``docs/``, ``tests/``,
  ``scripts/``, ``launch/``, ``configs/`` or ``.ci/``, and is not glued to what comes before it: ``/work/x/docs/a``,
  ``https://host/docs/a``, ``~/.ray/a``, ``vllm_ascend/quantization/a`` and ``save_path/optional/a`` are not
  repository paths, nor is a checkpoint-relative name such as ``optional/quarot.safetensors``;
- a bare upper-case Markdown name such as ``FORMAT.md``: the file of that name at the top level or in docs/
  (``FORMAT.md`` is docs/FORMAT.md).
A token runs over letters, digits and ``_ . / * - …``; trailing dots are dropped (end of a sentence). A placeholder
ends it: ``...``/``…`` or a component in capitals without an extension (``launch/SCRIPT``, ``OUT_DIR``), so only the
part before it has to exist. A token with ``*`` is a glob that must match something. A cited folder must exist.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP_FOLDERS = ("dist_quant", "docs", "tests", "scripts", "launch", "configs", ".ci")
BARE_DOC_FOLDERS = (".", "docs")  # where a bare FORMAT.md-style name is looked for
TEXT_SOURCES = ("README.md", "docs/*.md", "configs/README.md")
PYTHON_SOURCES = ("tests/*.py", "dist_quant/**/*.py", "scripts/*.py")
SHELL_SOURCES = ("launch/*.sh", "launch/*.sbatch", "scripts/*.sh", ".ci/run")

_NOT_GLUED = r"(?<![\w./~-])"
CITED_PATH = re.compile(_NOT_GLUED + r"(?:(?:%s)/[\w./*…-]*|[A-Z][A-Z0-9]+(?:_[A-Za-z0-9]+)*\.md\b)"
                        % "|".join(re.escape(folder) for folder in TOP_FOLDERS))
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")


def cited_paths(text: str) -> list[str]:
    """The repository paths ``text`` cites, as written (trailing dots and placeholders cut off)."""
    paths = []
    for match in CITED_PATH.finditer(text):
        token = match.group().split("…")[0].split("...")[0].rstrip(".")
        parts = token.split("/")
        for i, part in enumerate(parts):
            if i and PLACEHOLDER.fullmatch(part):
                token = "/".join(parts[:i]) + "/"
                break
        paths.append(token)
    return paths


def exists(path: str, root: Path = ROOT) -> bool:
    if "/" not in path:  # a bare FORMAT.md-style name
        return any((root / folder / path).is_file() for folder in BARE_DOC_FOLDERS)
    if "*" in path:
        return any(root.glob(path))
    return (root / path).is_dir() if path.endswith("/") else (root / path).exists()


def python_prose(source: str) -> str:
    """The docstrings and comments of a Python file."""
    pieces = [ast.get_docstring(node, clean=False) or "" for node in ast.walk(ast.parse(source))
              if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    pieces += [tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
               if tok.type == tokenize.COMMENT]
    return "\n".join(pieces)


def shell_prose(source: str) -> str:
    return "\n".join(line for line in source.splitlines()
                     if line.lstrip().startswith("#") and not line.startswith("#!"))


def _files(patterns: tuple[str, ...]) -> list[Path]:
    return sorted({p for pattern in patterns for p in ROOT.glob(pattern) if p.is_file()})


def prose_by_file() -> dict[str, str]:
    prose = {}
    for patterns, extract in ((TEXT_SOURCES, str), (PYTHON_SOURCES, python_prose), (SHELL_SOURCES, shell_prose)):
        for path in _files(patterns):
            prose[str(path.relative_to(ROOT))] = extract(path.read_text(encoding="utf-8"))
    return prose


def test_every_cited_repository_path_exists():
    prose = prose_by_file()
    assert {"README.md", "docs/FORMAT.md", "configs/README.md", "dist_quant/cli.py", "tests/conftest.py"} <= set(prose)
    cited = [(name, path) for name, text in prose.items() for path in cited_paths(text)]
    assert len(cited) > 50  # the collector does find the docs' paths
    missing = [f"{name}: {path}" for name, path in cited if not exists(path)]
    assert not missing, "cited paths that are not in the repository:\n" + "\n".join(missing)


def test_the_rules_on_what_is_a_repository_path(tmp_path):
    text = """See docs/FORMAT.md, FORMAT.md and `tests/data/...`; run launch/SCRIPT or `scripts/nope.py`.
    Not ours: /work/shared/docs/FORMAT.md, https://github.com/x/y/blob/main/docs/a.md, ~/.ray/auth_token,
    vllm_ascend/quantization/methods/w8a8_static.py, lab_practice/qwen3_vl_moe/x.yaml, /tmp/tests/a.py,
    save_path/optional/quarot.safetensors, optional/quarot.safetensors, my_docs/a.md and dist_quant.recipe."""
    assert cited_paths(text) == ["docs/FORMAT.md", "FORMAT.md", "tests/data/", "launch/", "scripts/nope.py"]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "FORMAT.md").write_text("")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a.yaml").write_text("")
    assert exists("docs/FORMAT.md", tmp_path) and exists("FORMAT.md", tmp_path)
    assert exists("configs/*.yaml", tmp_path) and exists("configs/", tmp_path)
    assert not exists("ARCHITECTURE.md", tmp_path) and not exists("scripts/nope.py", tmp_path)
    assert not exists("configs/*.yml", tmp_path) and not exists("docs/FORMAT.md/", tmp_path)


def test_comments_and_docstrings_are_read_but_not_string_literals():
    source = '"""Module: docs/a.md."""\nX = "docs/b.md"  # docs/c.md\ndef f():\n    """docs/d.md"""\n'
    assert sorted(cited_paths(python_prose(source))) == ["docs/a.md", "docs/c.md", "docs/d.md"]
    assert cited_paths(shell_prose("#!/usr/bin/env bash\n# see launch/x.sh\necho launch/y.sh\n")) == ["launch/x.sh"]


def test_configs_links_every_bundled_recipe():
    """configs/ is where users find the recipes; the package ships them from dist_quant/configs/."""
    bundled = ROOT / "dist_quant" / "configs"
    readme = (ROOT / "configs" / "README.md").read_text(encoding="utf-8")
    recipes = sorted(bundled.glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        link = ROOT / "configs" / recipe.name
        assert link.exists() and link.resolve() == recipe.resolve(), (
            f"add a relative link configs/{recipe.name} -> ../dist_quant/configs/{recipe.name}")
        assert f"configs/{recipe.name}" in readme, f"configs/README.md does not describe {recipe.name}"
    for entry in (ROOT / "configs").iterdir():
        if entry.name != "README.md":
            assert entry.exists() and entry.resolve().parent == bundled.resolve(), (
                f"configs/{entry.name} is not a link to a recipe in dist_quant/configs/ (which the package ships)")


def test_the_package_ships_the_bundled_recipes():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "configs/*.yaml" in config["tool"]["setuptools"]["package-data"]["dist_quant"]
