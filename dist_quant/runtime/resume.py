"""Resuming an interrupted run: a journal of finished units and the calibration stream at layer boundaries.

Everything lives in the writer's private folder inside the staging folder (never published). The journal's first
line fingerprints the run (model, recipe, calibration inputs, expert group size, compute threads, versions); each
further line records one finished unit file, or one saved stream file, with its size and CRC-32. Each layer's
output (the float hidden states entering the next layer) is saved by the unit that combines it, the next layer's
unit, and journaled with that unit (the previous layer's file is then dropped); the vision tower's outputs once. The
last layer's output is never needed, so a run killed between a layer's last expert group and the end of the next
layer unit recomputes that layer. A resumed run checks the fingerprint, keeps the files that still match their
record (and only files of the staging folder, whatever a record names), restarts after the last layer whose output
was saved, and recomputes only what follows; since every unit is deterministic, the checkpoint is the same as an
uninterrupted run's.

What the fingerprint sees of the source weights without reading them: each weights file's name, size, modification
time and header, and checkpoint.fingerprint's SAMPLES blocks spread over its data. A changed header, size or mtime
(any copy, download or editor that rewrites a file) or bytes changed inside a sampled block are detected; an
in-place change of the same size elsewhere whose mtime was put back is not.
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
from safetensors.torch import load_file, save

from dist_quant import __version__
from dist_quant.calib.inputs import ModelInputs
from dist_quant.checkpoint.fingerprint import digest_safetensors
from dist_quant.checkpoint.unit_file import UnitRecord, file_crc32, is_plain_name
from dist_quant.errors import OutputError
from dist_quant.runtime.plan import Kind, Unit

PLAN_LAYOUT = 3  # unit ids, stream-saving points, unit records; a journal of another layout is not resumed
# (2: "L003" units; 3: units write into the part files, records without a unit file)
JOURNAL = "journal.jsonl"
STREAM_DIR = "stream"
VISION_FILE = "vision.safetensors"
SAMPLE_BYTES = 64 * 1024


def _sha256(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def weights_fingerprint(model: Path) -> str:
    """Names, sizes, mtimes, headers and sampled data blocks of the model's weights files (see the module text)."""
    digest = hashlib.sha256()
    for path in sorted(model.glob("*.safetensors")) + sorted(model.glob("*.safetensors.index.json")):
        stat = path.stat()
        digest.update(json.dumps([path.name, stat.st_size, stat.st_mtime_ns]).encode())
        with open(path, "rb") as f:
            digest_safetensors(digest, f, stat.st_size, SAMPLE_BYTES)
    return digest.hexdigest()


def fingerprint(model_path: str | Path, recipe_path: Path, inputs: list[ModelInputs], expert_group_size: int,
                compute_threads: int, device: str, saver: str = "ascendv1_saver") -> dict:
    """What must not change between an interrupted run and its resumption: anything that changes a bit of the
    checkpoint (the thread count does: float reductions round differently with other splits)."""
    model = Path(model_path)
    tensors = [t for s in inputs for t in (s.input_ids, s.pixel_values, s.image_grid_thw) if t is not None]
    return {
        "model": _sha256((model / "config.json").read_bytes(), weights_fingerprint(model).encode()),
        "recipe": _sha256(recipe_path.read_bytes()),
        "format": saver,  # the recipe's save type, or --save_format's
        "calibration": _sha256(*(t.contiguous().numpy().tobytes() for t in tensors)),
        "expert_group_size": expert_group_size,
        "compute_threads": compute_threads,
        "device": device,
        "dist_quant": __version__,
        "plan_layout": PLAN_LAYOUT,
        "torch": torch.__version__,
    }


@dataclass(frozen=True)
class StreamRecord:
    """A saved calibration-stream file (vision outputs, or a layer's output) with its size and CRC-32."""

    stream: str  # file name inside the stream folder
    bytes: int
    crc32: int


class Journal:
    """Finished units of this run, appended as they finish and fsync'd, so a killed driver loses none."""

    def __init__(self, private_dir: Path, run: dict, resume: bool):
        self.path = private_dir / JOURNAL
        self.finished: dict[str, UnitRecord] = {}
        self.streams: dict[str, StreamRecord] = {}
        self.expert_tokens: dict[int, list[int]] = {}  # per MoE layer, from its layer unit
        if resume and self.path.exists():
            self._load(run)
        else:
            self.path.unlink(missing_ok=True)
            self._append(run)

    def _load(self, run: dict) -> None:
        text = self.path.read_text(encoding="utf-8", errors="replace")
        if text and not text.endswith("\n"):  # a line torn by a kill: this run's records start on a line of their own
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("\n")
        lines = text.splitlines()
        try:
            previous = json.loads(lines[0])
        except (IndexError, ValueError):
            previous = None
        if not isinstance(previous, dict):
            raise OutputError(f"the journal {self.path} of the interrupted run is unreadable; run again without "
                              "--resume, with --overwrite, to start over")
        changed = [k for k in run if previous.get(k) != run[k]]
        if changed:
            raise OutputError(f"cannot resume the run in {self.path.parent.parent.parent}: its "
                              f"{', '.join(changed)} differ(s) from this one's (a different model or weights, "
                              "recipe, calibration set, thread count, device or version); run without --resume and "
                              "with --overwrite to start over")
        for line in lines[1:]:
            self._load_line(line)

    def _load_line(self, line: str) -> None:
        """One record; a line that is not a well-formed record (the last line of a driver killed while writing it,
        or a damaged file) is skipped: its unit simply runs again."""
        try:
            fields = json.loads(line)
            if "stream" in fields:
                record = StreamRecord(str(fields["stream"]), int(fields["bytes"]), int(fields["crc32"]))
                if is_plain_name(record.stream):
                    self.streams[record.stream] = record
                return
            coverage = fields.pop("expert_tokens", None)
            record = UnitRecord(**{**fields, "keys": tuple(fields["keys"]),
                                   "quant_types": tuple(fields["quant_types"])})
            if not (isinstance(record.unit_id, str) and isinstance(record.crc32, int)):
                return
            if coverage is not None:
                self.expert_tokens[int(coverage["layer"])] = [int(t) for t in coverage["tokens"]]
            self.finished[record.unit_id] = record
        except (ValueError, TypeError, KeyError, AttributeError):
            return

    def _append(self, entry: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def record(self, record: UnitRecord, layer: int = -1, expert_tokens: Optional[list[int]] = None) -> None:
        """A finished unit (with the calibration tokens per expert when it is a MoE layer unit)."""
        entry = dataclasses.asdict(dataclasses.replace(record, payload=None))
        if expert_tokens is not None:
            entry["expert_tokens"] = {"layer": layer, "tokens": expert_tokens}
            self.expert_tokens[layer] = expert_tokens
        self.finished[record.unit_id] = record  # first: a signal during the append must not hide a written record
        try:
            self._append(entry)
        except OSError:  # not on disk (disk full): a resume will not keep it, so neither does the count of kept units
            del self.finished[record.unit_id]
            raise

    def prune_streams(self, plan: list[Unit]) -> None:
        """Drop the layer files older than the newest one a resume could start from (never earlier: on Ray a layer
        file can be journaled before the last expert group of its layer, and a run killed in between must still find
        a restart point)."""
        saved = _layer_files(self.path.parent)
        usable = next((layer for layer, path in reversed(saved) if path.name in self.streams
                       and all(unit_id in self.finished for unit_id in needed_for(plan, layer))), None)
        for layer, path in saved:
            if usable is not None and layer < usable:
                path.unlink(missing_ok=True)

    def record_stream(self, record: StreamRecord) -> None:
        """A saved stream file (the layer files it makes useless go in ``prune_streams``)."""
        self.streams[record.stream] = record
        self._append(dataclasses.asdict(record))

    def intact_stream(self, path: Path) -> bool:
        record = self.streams.get(path.name)
        return record is not None and _matches(path, record.bytes, record.crc32)


def _matches(path: Path, size: int, crc: int) -> bool:
    return path.is_file() and not path.is_symlink() and path.stat().st_size == size and file_crc32(path) == crc


# --- the calibration stream at layer boundaries ---------------------------------------------------------------------

def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> StreamRecord:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return StreamRecord(path.name, len(data), zlib.crc32(data))


def save_vision(private_dir: Path, vision: list) -> StreamRecord:
    """Image features and deepstack features of every sample (None for text-only samples is simply absent)."""
    tensors = {}
    for i, out in enumerate(vision):
        if out is not None:
            tensors[f"{i}.image_embeds"] = out.image_embeds
            tensors.update({f"{i}.deepstack.{k}": d for k, d in enumerate(out.deepstack)})
    return _save_atomic(tensors, private_dir / STREAM_DIR / VISION_FILE)


def load_vision(private_dir: Path, samples: int) -> list:
    from dist_quant.models.family import VisionOutput

    tensors = load_file(private_dir / STREAM_DIR / VISION_FILE)
    vision = []
    for i in range(samples):
        if f"{i}.image_embeds" not in tensors:
            vision.append(None)
            continue
        deepstack = [tensors[f"{i}.deepstack.{k}"] for k in range(sum(key.startswith(f"{i}.deepstack.")
                                                                      for key in tensors))]
        vision.append(VisionOutput(tensors[f"{i}.image_embeds"], deepstack))
    return vision


def _layer_file(private_dir: Path, layer: int) -> Path:
    return private_dir / STREAM_DIR / f"after_layer_{layer:04d}.safetensors"


def save_hidden(private_dir: Path, layer: int, hidden: list[torch.Tensor]) -> StreamRecord:
    """The hidden states that leave ``layer`` (deepstack included); the journal drops the earlier ones once this
    one is recorded."""
    return _save_atomic({str(i): h for i, h in enumerate(hidden)}, _layer_file(private_dir, layer))


@dataclass
class ResumePoint:
    layer: int  # the last layer whose output was saved; the run restarts at layer + 1
    hidden: list[torch.Tensor]
    vision: list


def _layer_files(private_dir: Path) -> list[tuple[int, Path]]:
    """(layer, file) of the saved layer outputs, in layer order."""
    files = []
    for path in private_dir.glob(f"{STREAM_DIR}/after_layer_*.safetensors"):
        try:
            files.append((int(path.stem.rsplit("_", 1)[1]), path))
        except ValueError:
            continue
    return sorted(files)


def needed_for(plan: list[Unit], layer: int) -> list[str]:
    """The units that must have finished for a run to restart after ``layer``."""
    return [u.id for u in plan if u.kind in (Kind.VISION, Kind.EMBED) or (u.layer != -1 and u.layer <= layer)]


def resume_point(private_dir: Path, plan: list[Unit], finished: dict[str, UnitRecord], journal: Journal,
                 samples: int) -> Optional[ResumePoint]:
    """Where to restart: after the last saved layer whose units (and vision, embeddings) all finished and whose
    stream files match their journal records."""
    with_vision = any(u.kind is Kind.VISION for u in plan)  # a family without a vision tower saves no vision file
    if with_vision and not journal.intact_stream(private_dir / STREAM_DIR / VISION_FILE):
        return None
    for layer, path in reversed(_layer_files(private_dir)):
        if all(unit_id in finished for unit_id in needed_for(plan, layer)) and journal.intact_stream(path):
            tensors = load_file(path)
            vision = load_vision(private_dir, samples) if with_vision else [None] * samples
            return ResumePoint(layer, [tensors[str(i)] for i in range(samples)], vision)
    return None


def remaining_units(plan: list[Unit], point: Optional[ResumePoint], finished: dict[str, UnitRecord]) -> list[Unit]:
    """Units still to run: everything after the resume point, except a head or carried share that already
    finished."""
    if point is None:
        return list(plan)
    return [u for u in plan if (u.kind in (Kind.LAYER, Kind.EXPERTS) and u.layer > point.layer)
            or (u.kind in (Kind.HEAD, Kind.CARRIED) and u.id not in finished)]
