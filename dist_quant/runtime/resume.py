"""Resuming an interrupted run: a journal of finished units and the calibration stream at layer boundaries.

Everything lives in the writer's private folder inside the staging folder (never published). The journal's first line fingerprints the run (model, recipe, calibration
inputs, expert group size); each further line records one finished unit file with its size and CRC-32. After each
layer the float hidden states entering the next layer are saved (the previous layer's file is then dropped), and the
vision tower's outputs once. A resumed run checks the fingerprint, keeps the unit files that still match their
record, restarts the sweep at the first layer whose input was saved, and recomputes only what follows; since every
unit is deterministic, the checkpoint is the same as an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from dist_quant import __version__
from dist_quant.calib.inputs import ModelInputs
from dist_quant.checkpoint.unit_file import UnitRecord
from dist_quant.errors import OutputError
from dist_quant.runtime.plan import Unit

JOURNAL = "journal.jsonl"
STREAM_DIR = "stream"
VISION_FILE = "vision.safetensors"


def _sha256(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def fingerprint(model_path: str | Path, recipe_path: Path, inputs: list[ModelInputs], expert_group_size: int) -> dict:
    """What must not change between an interrupted run and its resumption (no weights are hashed: too big; their
    files' names and sizes are)."""
    model = Path(model_path)
    weights = sorted((p.name, p.stat().st_size) for p in model.glob("*.safetensors"))
    tensors = [t for s in inputs for t in (s.input_ids, s.pixel_values, s.image_grid_thw) if t is not None]
    return {
        "model": _sha256((model / "config.json").read_bytes(), json.dumps(weights).encode()),
        "recipe": _sha256(recipe_path.read_bytes()),
        "calibration": _sha256(*(t.contiguous().numpy().tobytes() for t in tensors)),
        "expert_group_size": expert_group_size,
        "dist_quant": __version__,
    }


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 * 1024**2), b""):
            crc = zlib.crc32(block, crc)
    return crc


class Journal:
    """Finished units of this run, appended as they finish and fsync'd, so a killed driver loses none."""

    def __init__(self, staging: Path, run: dict, resume: bool):
        self.path = staging / JOURNAL
        self.finished: dict[str, UnitRecord] = {}
        self.expert_tokens: dict[int, list[int]] = {}  # per MoE layer, from its attention unit
        if resume:
            self._load(run)
        else:
            self._append(run)

    def _load(self, run: dict) -> None:
        if not self.path.exists():
            raise OutputError(f"nothing to resume: {self.path} does not exist (the run finished, was never started "
                              "here, or its staging folder was removed); run again without --resume")
        lines = self.path.read_text().splitlines()
        previous = json.loads(lines[0])
        changed = [k for k in run if previous.get(k) != run[k]]
        if changed:
            raise OutputError(f"cannot resume the run in {self.path.parent}: its {', '.join(changed)} differ(s) from "
                              "this one's (a different model, recipe, calibration set or version); run without "
                              "--resume and with --overwrite to start over")
        for line in lines[1:]:
            try:
                fields = json.loads(line)
            except json.JSONDecodeError:  # the last line of a driver killed while writing it
                continue
            coverage = fields.pop("expert_tokens", None)
            record = UnitRecord(**{**fields, "keys": tuple(fields["keys"]),
                                   "quant_types": tuple(fields["quant_types"])})
            self.finished[record.unit_id] = record
            if coverage is not None:
                self.expert_tokens[coverage["layer"]] = coverage["tokens"]

    def _append(self, entry: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def record(self, record: UnitRecord, layer: int = -1, expert_tokens: Optional[list[int]] = None) -> None:
        """A finished unit (with the calibration tokens per expert when it is a MoE layer's attention)."""
        entry = dataclasses.asdict(dataclasses.replace(record, payload=None))
        if expert_tokens is not None:
            entry["expert_tokens"] = {"layer": layer, "tokens": expert_tokens}
        self._append(entry)
        self.finished[record.unit_id] = record

    def intact(self, spill_dir: Path) -> dict[str, UnitRecord]:
        """The finished units whose files are still there, whole and unchanged."""
        good = {}
        for unit_id, record in self.finished.items():
            path = spill_dir / record.file
            if path.is_file() and path.stat().st_size == record.file_bytes and file_crc32(path) == record.crc32:
                good[unit_id] = record
        return good


# --- the calibration stream at layer boundaries ---------------------------------------------------------------------

def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def save_vision(staging: Path, vision: list) -> None:
    """Image features and deepstack features of every sample (None for text-only samples is simply absent)."""
    tensors = {}
    for i, out in enumerate(vision):
        if out is not None:
            tensors[f"{i}.image_embeds"] = out.image_embeds
            tensors.update({f"{i}.deepstack.{k}": d for k, d in enumerate(out.deepstack)})
    _save_atomic(tensors, staging / STREAM_DIR / VISION_FILE)


def load_vision(staging: Path, samples: int) -> list:
    from dist_quant.runtime.worker import VisionOutput

    tensors = load_file(staging / STREAM_DIR / VISION_FILE)
    vision = []
    for i in range(samples):
        if f"{i}.image_embeds" not in tensors:
            vision.append(None)
            continue
        deepstack = [tensors[f"{i}.deepstack.{k}"] for k in range(sum(key.startswith(f"{i}.deepstack.")
                                                                      for key in tensors))]
        vision.append(VisionOutput(tensors[f"{i}.image_embeds"], deepstack))
    return vision


def _layer_file(staging: Path, layer: int) -> Path:
    return staging / STREAM_DIR / f"after_layer_{layer:04d}.safetensors"


def save_hidden(staging: Path, layer: int, hidden: list[torch.Tensor]) -> None:
    """The hidden states that leave ``layer`` (deepstack included); the previous layer's file is then dropped."""
    _save_atomic({str(i): h for i, h in enumerate(hidden)}, _layer_file(staging, layer))
    _layer_file(staging, layer - 1).unlink(missing_ok=True)


@dataclass
class ResumePoint:
    layer: int  # the last layer whose output was saved; the sweep restarts at layer + 1
    hidden: list[torch.Tensor]
    vision: list


def resume_point(staging: Path, plan: list[Unit], finished: dict[str, UnitRecord],
                 samples: int) -> Optional[ResumePoint]:
    """Where to restart: after the last saved layer whose units (and vision, embeddings) all finished."""
    saved = sorted(staging.glob(f"{STREAM_DIR}/after_layer_*.safetensors"))
    for path in reversed(saved):
        layer = int(path.stem.rsplit("_", 1)[1])
        needed = [u.id for u in plan if u.kind in ("vision", "embed") or (u.layer != -1 and u.layer <= layer)]
        if all(unit_id in finished for unit_id in needed) and (staging / STREAM_DIR / VISION_FILE).exists():
            tensors = load_file(path)
            return ResumePoint(layer, [tensors[str(i)] for i in range(samples)], load_vision(staging, samples))
    return None


def remaining_units(plan: list[Unit], point: Optional[ResumePoint], finished: dict[str, UnitRecord]) -> list[Unit]:
    """Units still to run: everything after the resume point, except a head that already finished."""
    if point is None:
        return list(plan)
    return [u for u in plan if (u.kind in ("attention", "experts") and u.layer > point.layer)
            or (u.kind == "head" and u.id not in finished)]
