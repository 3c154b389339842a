"""Output formats, one module each, on the :class:`OutputFormat` protocol: a format owns its file names, how what a
scheme made becomes file keys, dtypes and description entries, the config rewrite, its side files, how a published
checkpoint of it is recognised and read back, and which loader rules check it; the checkpoint writer keeps what is
common: staging, the part layout the units write into, the index and the atomic publish.

``FORMATS`` is the only list of them. Adding a format: its module, with the names of ``OutputFormat`` (its
``SAVER`` and ``CLI_NAME`` are how a recipe and ``--save_format`` name it), and its place in ``FORMATS``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Protocol

from dist_quant.checkpoint.formats import ascendv1 as _ascendv1
from dist_quant.checkpoint.formats import compressed_tensors as _compressed_tensors
from dist_quant.errors import RecipeError

if TYPE_CHECKING:
    import torch

    from dist_quant.schemes import LinearSpec, QuantizedLinear


class OutputFormat(Protocol):
    """What the writer, the emitter, eval, the report and ``check`` ask of a format (a module)."""

    NAME: str  # in words, for messages
    SAVER: str  # a recipe's ``save: - type:`` that selects it
    CLI_NAME: str  # ``--save_format``'s name for it
    CHECK_RULES: str  # the dist_quant.check module with its serving engines' loader rules
    WEIGHTS_PREFIX: str  # of its weight part files
    INDEX_FILE: str  # the weight parts' index
    MARKER_FILE: str  # published last: a folder without it does not look finished
    OPTIONAL_DIR: str  # the folder of its side files

    def part_names(self, count: int) -> list[str]: ...

    def unsupported(self, quant_types: Iterable[str]) -> Optional[str]: ...

    def linear_entries(self, name: str, quant_type: str, quantized: QuantizedLinear,
                       spec: LinearSpec) -> list[tuple[str, torch.Tensor, str]]: ...

    def description_files(self, types: dict[str, str], optional: Optional[dict]) -> dict[str, dict]: ...

    def rewrite_config(self, config: dict, types: dict[str, str]) -> dict: ...

    def rotation_file(self, rotation: torch.Tensor) -> Optional[tuple[str, dict[str, torch.Tensor], dict]]: ...

    def published_types(self, save_path: Path) -> dict[str, str]: ...

    def is_published(self, save_path: Path) -> bool: ...

    def is_own_file(self, name: str) -> bool: ...


# in the order a folder is recognised: a config.json saying compressed-tensors wins over a description file
FORMATS: tuple[OutputFormat, ...] = (_compressed_tensors, _ascendv1)
DEFAULT: OutputFormat = _ascendv1
SAVERS = {fmt.SAVER: fmt for fmt in FORMATS}  # a recipe's ``save: - type:`` -> its format
SAVE_FORMATS = {fmt.CLI_NAME: fmt.SAVER for fmt in FORMATS}  # --save_format -> a saver
DEFAULT_SAVER = DEFAULT.SAVER


def published_format(path) -> Optional[OutputFormat]:
    """The format of the finished checkpoint in ``path``, None when there is none."""
    return next((fmt for fmt in FORMATS if fmt.is_published(path)), None)


def for_saver(saver: str) -> OutputFormat:
    """The format a recipe's saver type names."""
    if saver not in SAVERS:
        raise RecipeError(f"unknown saver {saver!r}; known: {list(SAVERS)}")
    return SAVERS[saver]
