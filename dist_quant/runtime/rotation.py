"""The recipe's QuaRot rotations, built and checked once per process.

They depend only on the quarot processor's block size and seed and on the model's widths, so the driver (which
exports the rotation), the layout and a worker in the same process share one copy. Callers must not change the
tensors in place (``BlockRotation.to`` makes a new one on another device).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from dist_quant.algorithms import hadamard, quarot
from dist_quant.errors import RecipeError
from dist_quant.recipe import Recipe


@lru_cache(maxsize=4)
def _stream_block(block_size: int, seed: int) -> torch.Tensor:
    block = hadamard.random_hadamard(block_size, seed)
    hadamard.check_orthogonal(block, "the QuaRot rotation block")
    return block


@lru_cache(maxsize=4)
def _head(head_dim: int, block_size: int, seed: int) -> torch.Tensor:
    rotation = hadamard.head_rotation(head_dim, block_size, seed)
    hadamard.check_orthogonal(rotation, "the QuaRot head rotation")
    return rotation


def stream_rotation(recipe: Recipe, config) -> Optional[quarot.BlockRotation]:
    """The recipe's rotation of the text residual stream (None without a quarot processor), checked orthogonal."""
    if recipe.quarot is None:
        return None
    hidden = config.get_text_config().hidden_size
    if hidden % recipe.quarot.block_size:
        raise RecipeError(f"recipe {recipe.path}: quarot block_size {recipe.quarot.block_size} does not divide the "
                          f"hidden size {hidden}")
    return quarot.BlockRotation(_stream_block(recipe.quarot.block_size, recipe.quarot.seed), hidden)


def head_rotation(recipe: Recipe, head_dim: int) -> Optional[torch.Tensor]:
    """The rotation between each v head and o_proj (None without a quarot processor), checked orthogonal."""
    if recipe.quarot is None:
        return None
    return _head(head_dim, recipe.quarot.block_size, recipe.quarot.seed)


def export_rotation(writer, recipe: Recipe, config) -> None:
    """QuaRot's rotation goes to the format's side file, when it has one, and the description points to it
    (docs/FORMAT.md)."""
    rotation = stream_rotation(recipe, config)
    side = writer.output_format.rotation_file(rotation.dense()) if rotation is not None else None
    if side is not None:
        path, tensors, optional = side
        writer.add_optional(path, tensors)
        writer.set_optional_description(optional)
