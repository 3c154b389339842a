"""Write a quantized checkpoint in an output format (checkpoint/formats/; ascendv1 by default, docs/FORMAT.md).

The part files are laid out before any unit runs (checkpoint/layout.py: every tensor's place follows from its dtype
and shape) and created in a staging folder with their headers; each unit writes its tensors straight into their
places (checkpoint/unit_file.py), so every byte is written once and memory holds a unit, never a part. Nothing lands
in save_path until publish(), and the format's marker file (ascendv1: quant_model_description.json) lands last: a
crashed run never leaves a folder that looks like a finished checkpoint. The writer holds save_path's lock (one run
per folder) and removes only what a checkpoint consists of.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from dist_quant import failpoints
from dist_quant.checkpoint.formats import ascendv1
from dist_quant.checkpoint.layout import Layout, PartFiles, Place, create_parts, plan_layout, write_payload
from dist_quant.checkpoint.reader import read_config
from dist_quant.checkpoint.save_lock import LOCK_FILE, SaveLock
from dist_quant.checkpoint.unit_file import UnitRecord, is_plain_name, writing
from dist_quant.errors import OutputError

logger = logging.getLogger(__name__)

STAGING_DIR = ".dist_quant_staging"
PRIVATE_DIR = "run"
DESCRIPTION_FILE = ascendv1.DESCRIPTION_FILE  # the default format's, for callers that read what was published
COPIED_SUFFIXES = (".json", ".py", ".txt", ".jinja")
RUN_SUFFIXES = (".yaml", ".yml", ".log")  # the recipe and the run log published next to the checkpoint
LAYOUT_FILE = "layout.json"  # private: the parts and every tensor's place, as the run began
MOVE_FILE = "move.json"  # private: the files to move into save_path, written once all of them are finished
FILES_FILE = "quant_model_files.json"  # published: what this checkpoint consists of (all --overwrite may delete)
GiB = 1024**3  # msModelSlim calls its part_file_size unit "GB"; it is 2**30 bytes
FREE_SPACE_MARGIN = 64 * 2**20  # beyond the part files: tokenizer, description, index, logs, a resume's layer files
MiB = 1024**2


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _write_json(path: Path, content: dict) -> None:
    """Written under a temporary name and renamed: a file killed half-way never carries the final name."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with writing(path), open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """save_file creates files readable by the owner only; a served checkpoint is read by other users too."""
    with writing(path):
        save_file(tensors, str(path))
    path.chmod(0o644)


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A private contiguous CPU copy: safetensors refuses tensors that share storage (q/k/v passing one input_scale)."""
    return tensor.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)


def _copy(source: Path, target: Path) -> None:
    with writing(target):
        shutil.copy2(source, target)


def _is_checkpoint_entry(path: Path, fmt, listed: Optional[set] = None) -> bool:
    """What a checkpoint consists of: the only things --overwrite may delete. A checkpoint written here lists its
    files (``listed``, from quant_model_files.json); for one without that list (msModelSlim's), its file kinds."""
    name = path.name
    if listed is not None:
        return name in listed or name in (STAGING_DIR, LOCK_FILE)
    if path.is_symlink() or (name.startswith(".") and name not in (STAGING_DIR, LOCK_FILE)):
        return False
    if path.is_dir():
        return name == STAGING_DIR or (name == fmt.OPTIONAL_DIR and all(
            p.is_file() and not p.is_symlink() and p.suffix == ".safetensors" for p in path.iterdir()))
    return (name == LOCK_FILE or fmt.is_own_file(name)
            or path.suffix in COPIED_SUFFIXES + RUN_SUFFIXES)


def _missing_ancestors(path: Path) -> list[Path]:
    """The folders mkdir(parents=True) would create for ``path``, deepest first."""
    missing = []
    while not path.exists() and not path.is_symlink() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _check_apart(save_path: Path, folder: Path, what: str) -> None:
    target, other = save_path.resolve(), folder.resolve()
    if _is_within(target, other) or _is_within(other, target):
        raise OutputError(f"save path {save_path} and {what} {folder} overlap: writing there would mix the "
                          f"quantized files with (or delete) the {what}; choose a separate folder")


class CheckpointWriter:
    """Lays out and creates the part files the units write into, registers the finished units, and publishes them
    as one checkpoint in its output format in save_path, holding save_path's lock.

    A run is recoverable: the part layout and the list of files to move are recorded in the private folder before
    they are acted on, so a resumed run keeps the part files (each kept unit checked by its CRC-32,
    ``unit_intact``), and one killed while moving is finished by ``publish()`` on the next attempt.
    """

    def __init__(
        self,
        save_path: str | Path,
        *,
        part_file_size_gb: float = 4,
        overwrite: bool = False,
        model_path: str | Path | None = None,
        protected: Iterable[tuple[str | Path, str]] = (),
        resume: bool = False,
        output_format=ascendv1,
    ):
        """``protected``: (folder, what) pairs, such as the
        calibration set, that save_path must neither be, hold nor lie inside (the model folder always is one).
        ``resume`` keeps the staging folder of an interrupted run when it holds one (``self.resuming``)."""
        self.save_path = Path(save_path)
        self.output_format = output_format  # a module of checkpoint/formats/
        if part_file_size_gb < 0:
            raise ValueError(f"part_file_size_gb must be >= 0 (0 writes a single file), got {part_file_size_gb}")
        folders = ([(model_path, "model path")] if model_path is not None else []) + list(protected)
        for folder, what in folders:
            _check_apart(self.save_path, Path(folder), what)
        if self.save_path.is_symlink() and not self.save_path.exists():
            raise OutputError(f"save path {self.save_path} is a symbolic link to {os.readlink(self.save_path)}, "
                              "which does not exist; remove the link or choose another path")
        if self.save_path.exists() and not self.save_path.is_dir():
            raise OutputError(f"save path {self.save_path} exists and is not a folder; choose another path")
        self._created = _missing_ancestors(self.save_path)
        try:
            self.save_path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create save path {self.save_path}: {error.strerror}; choose a folder you can "
                              "write to") from None
        self.overwrite = overwrite
        self.lock: Optional[SaveLock] = None
        self.staging = self.save_path / STAGING_DIR
        self._files = PartFiles(self.staging)  # the part files, opened as they are first written or checked
        self.private_dir = self.staging / PRIVATE_DIR  # the run's own bookkeeping (resume journal...): never published
        try:
            self.lock = SaveLock(self.save_path)
        except BaseException:
            self._remove_created()
            raise
        try:
            self.resuming = resume and self.private_dir.is_dir() and any(self.private_dir.iterdir())
            self.published = self.output_format.is_published(self.save_path) and not self.resuming
            if self.resuming:
                self._make_staging()
            elif not (resume and self.published):
                self.start_afresh()
        except OSError as error:
            self.close()
            if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise OutputError(f"cannot write into save path {self.save_path}: {error.strerror}; choose a folder "
                              "you can write to") from None
        except BaseException:
            self.close()
            raise

        self._part_bytes = int(part_file_size_gb * GiB)
        self._quant_types: dict[str, str] = {}
        self.layout: Optional[Layout] = None
        self._optional_files: list[str] = []
        self._optional_description: dict | None = None

    def _make_staging(self) -> None:
        with writing(self.staging):
            self.private_dir.mkdir(parents=True, exist_ok=True)

    def start_afresh(self) -> None:
        """An empty staging folder, once save_path's content is known to be replaceable (see __init__); the driver
        calls it when a --resume --overwrite finds another run's finished checkpoint."""
        self._check_save_path_content()
        shutil.rmtree(self.staging, ignore_errors=True)  # left over by a run that crashed
        self.published = False
        self._make_staging()

    def _listed_files(self) -> Optional[set]:
        try:
            files = json.loads((self.save_path / FILES_FILE).read_text())["files"]
            return {name for name in files if isinstance(name, str)} | {FILES_FILE}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _foreign(self, entries: list[Path]) -> list[str]:
        """The names among ``entries`` that are not part of the checkpoint in save_path (kept by --overwrite)."""
        listed = self._listed_files()
        return [p.name for p in entries if not _is_checkpoint_entry(p, self.output_format, listed)]

    def _check_save_path_content(self) -> None:
        existing = sorted(p for p in self.save_path.iterdir() if p.name not in (STAGING_DIR, LOCK_FILE))
        if not existing:
            return
        if not self.overwrite:
            raise OutputError(
                f"save path {self.save_path} is not empty (holds {[p.name for p in existing[:5]]}); choose an empty "
                "folder or pass --overwrite to replace the checkpoint it holds"
            )
        foreign = self._foreign(existing)
        if not self.output_format.is_published(self.save_path) and not (self.staging).exists():
            foreign = [p.name for p in existing]  # e.g. a float model folder: never replaced
        if foreign:
            raise OutputError(
                f"save path {self.save_path} holds files that are not part of a quantized checkpoint ({foreign[:10]}"
                f"{' ...' if len(foreign) > 10 else ''}); --overwrite only replaces a checkpoint: move them away or "
                "choose another folder"
            )

    # --- collecting ---------------------------------------------------------------------------------------------

    def set_layout(self, units: list[tuple[str, list[tuple[str, torch.dtype, tuple[int, ...]]]]]) -> Layout:
        """Lay out the parts for ``units`` = [(unit id, [(key, dtype, shape), ...]), ...] in plan order (every
        tensor's place); nothing is written until ``create_parts``."""
        self.layout = plan_layout(units, self._part_bytes, self.output_format.part_names)
        return self.layout

    def create_parts(self) -> None:
        """The part files with their headers, at their full size. A resumed run must find the same layout (the same
        model and recipe give it) and keeps the part files, rewriting only a missing or damaged part's header and
        size (the units whose bytes it held then fail their check and run again)."""
        self._check_free_space()
        saved = self.private_dir / LAYOUT_FILE
        if self.resuming and saved.exists():
            try:
                same = json.loads(saved.read_text()) == json.loads(json.dumps(self.layout.to_json()))
            except ValueError:
                same = False
            if not same:
                raise OutputError(f"{saved} does not match this run's checkpoint layout; rerun without --resume, "
                                  "with --overwrite")
            create_parts([p for p in self.layout.parts if not self._part_intact(p)], self.staging)
        else:
            create_parts(self.layout.parts, self.staging)
            _write_json(saved, self.layout.to_json())

    def space_needed(self) -> int:
        """Bytes the part files still need on disk: their full size less what their existing files (a resumed run's)
        already hold. Part files are created sparse, so a full disk would otherwise show only when a unit writes."""
        held = 0
        for part in self.layout.parts:
            path = self.staging / part.name
            if path.is_file() and not path.is_symlink():
                held += min(path.stat().st_blocks * 512, part.size)
        return sum(part.size for part in self.layout.parts) - held

    def _check_free_space(self) -> None:
        needed, free = self.space_needed() + FREE_SPACE_MARGIN, shutil.disk_usage(self.staging).free
        if needed > free:
            raise OutputError(f"the checkpoint needs {needed / GiB:.2f} GiB more on the file system of "
                              f"{self.save_path}, which has {free / GiB:.2f} GiB free: free some space or choose "
                              "another --save_path")

    def _part_intact(self, part) -> bool:
        path = self.staging / part.name
        if not path.is_file() or path.is_symlink() or path.stat().st_size != part.size:
            return False
        with open(path, "rb") as f:
            return f.read(len(part.header)) == part.header

    def places(self, unit_id: str) -> list[Place]:
        return self.layout.units[unit_id]

    def unit_intact(self, record: UnitRecord) -> bool:
        """Whether the part files still hold a finished unit's bytes (its CRC-32), for a resumed run."""
        places = self.layout.units.get(record.unit_id)
        return places is not None and [p.key for p in places] == list(record.keys) \
            and self._files.crc32(places) == record.crc32

    def add_unit(self, record: UnitRecord) -> None:
        """Register a finished unit; one whose bytes came through the object store is written to its places now."""
        places = self.layout.units.get(record.unit_id) if self.layout is not None else None
        if places is None or [p.key for p in places] != list(record.keys):
            raise OutputError(f"unit {record.unit_id} is not the one the checkpoint layout holds; a bug, or a "
                              "journal of another run")
        if record.payload is not None:  # the worker's disk is not ours
            with writing(self.staging):
                write_payload(self._files, places, record.payload)
        self._quant_types.update(zip(record.keys, record.quant_types))

    def add_optional(self, relpath: str, tensors: dict[str, torch.Tensor]) -> None:
        """A side file such as optional/quarot.safetensors; it is neither indexed nor described per tensor."""
        path = self.staging / relpath
        if Path(relpath).is_absolute() or ".." in Path(relpath).parts or relpath in self._optional_files:
            raise ValueError(f"optional file {relpath} must be a new path relative to the save path")
        path.parent.mkdir(parents=True, exist_ok=True)
        _save({name: _cpu_copy(tensor) for name, tensor in tensors.items()}, path)
        self._optional_files.append(relpath)

    def set_optional_description(self, optional: dict) -> None:
        """The description's "optional" field, which tells vLLM where side files such as the QuaRot rotation live."""
        self._optional_description = optional

    # --- publishing ---------------------------------------------------------------------------------------------

    @property
    def moving(self) -> bool:
        """An interrupted run had finished every file and was moving them into save_path."""
        return (self.private_dir / MOVE_FILE).exists()

    def publish(
        self,
        source_model_dir: str | Path,
        *,
        recipe_path: str | Path | None = None,
        finish: Optional[Callable[[Path], None]] = None,
    ) -> dict:
        """Finish every file in staging (every unit of the layout added), then move them into save_path, the
        description last. ``finish`` is called on the finished staging folder before anything moves (it may add
        files; it raises to stop the publishing)."""
        if self.moving:
            return self.resume_publish()
        if self.layout is None or not self._quant_types:
            raise OutputError(f"no tensors were added for {self.save_path}; nothing to publish")
        order = self.layout.weight_map()
        missing = [key for key in order if key not in self._quant_types]
        if missing:
            raise OutputError(f"{len(missing)} tensors of the checkpoint were never written ({missing[:3]}); a bug")
        # in the layout's (the plan's) order, not the order units finished in: the same bytes for any worker count
        self._quant_types = {**{key: self._quant_types[key] for key in order}, **self._quant_types}
        source = Path(source_model_dir)
        self._finish_parts()
        self._write_config(source)
        self._copy_source_files(source)
        if recipe_path is not None:
            _copy(Path(recipe_path), self.staging / Path(recipe_path).name)
        for name, content in self.output_format.description_files(self._quant_types,
                                                                   self._optional_description).items():
            _write_json(self.staging / name, content)
        if finish is not None:
            finish(self.staging)
        if self.overwrite:
            self._remove_old_checkpoint()
        entries = sorted(p.name for p in self.staging.iterdir() if p.name not in (PRIVATE_DIR, FILES_FILE)
                         and not p.name.startswith("."))
        _write_json(self.staging / FILES_FILE, {"files": entries + [FILES_FILE]})
        moves = sorted(entries + [FILES_FILE], key=lambda name: (name == self.output_format.MARKER_FILE, name))
        _write_json(self.private_dir / MOVE_FILE, {"files": moves})  # from here on, a resumed run only moves
        return self.resume_publish()

    def resume_publish(self) -> dict:
        """Move the finished files into save_path (those an interrupted run had not moved yet), the description last,
        then drop the staging folder and the lock."""
        moves = json.loads((self.private_dir / MOVE_FILE).read_text())["files"]
        marker = self.output_format.MARKER_FILE
        if not all(isinstance(name, str) and is_plain_name(name) for name in moves) or moves[-1] != marker:
            raise OutputError(f"{self.private_dir / MOVE_FILE} is corrupt; rerun without --resume, with --overwrite")
        for name in moves:
            if (self.staging / name).exists():
                os.replace(self.staging / name, self.save_path / name)
                failpoints.reach("publish")
            elif not (self.save_path / name).exists():
                raise OutputError(f"{name} is neither in {self.staging} nor in {self.save_path}: the interrupted "
                                  "run cannot be finished; rerun without --resume, with --overwrite")
        shutil.rmtree(self.private_dir, ignore_errors=True)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.lock.release()
        index = json.loads((self.save_path / self.output_format.INDEX_FILE).read_text())
        types = self.output_format.published_types(self.save_path)
        logger.info("published %d tensors (%.2f GiB) to %s", len(types), index["metadata"]["total_size"] / GiB,
                    self.save_path)
        files = sorted(str(p.relative_to(self.save_path)) for name in moves
                       for p in [self.save_path / name, *(self.save_path / name).rglob("*")] if p.is_file())
        return {"tensors": len(types), "bytes": index["metadata"]["total_size"],
                "counts": dict(Counter(types.values())), "files": files}

    def _finish_parts(self) -> None:
        """Every part is complete once its units are: make them durable and readable, and write the index."""
        with writing(self.staging):
            for part in self.layout.parts:
                path = self.staging / part.name
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())  # a published checkpoint must survive a crash right after its description
                path.chmod(0o644)
                logger.info("wrote part %s (%.2f GiB)", part.name, part.size / GiB)
        index = {"metadata": {"total_size": self.layout.total_bytes}, "weight_map": self.layout.weight_map()}
        _write_json(self.staging / self.output_format.INDEX_FILE, index)

    def _write_config(self, source: Path) -> None:
        config = read_config(source / "config.json")
        _write_json(self.staging / "config.json", self.output_format.rewrite_config(config, self._quant_types))

    def _copy_source_files(self, source: Path) -> None:
        """Tokenizer, processor and templates; never a float index, which would make vLLM skip the quantized parts."""
        for path in sorted(source.iterdir()):
            if (
                path.is_file()
                and path.suffix in COPIED_SUFFIXES
                and path.name != "config.json"
                and not path.name.endswith("index.json")
            ):
                _copy(path, self.staging / path.name)

    def _remove_old_checkpoint(self) -> None:
        """--overwrite: the old checkpoint's files (and nothing else: checked when the run started) go, the old
        description first, so the old checkpoint stops looking finished."""
        old = sorted((p for p in self.save_path.iterdir() if p.name not in (STAGING_DIR, LOCK_FILE)),
                     key=lambda p: p.name != self.output_format.MARKER_FILE)
        foreign = self._foreign(old)
        if foreign:
            raise OutputError(f"save path {self.save_path} now holds files that are not part of a checkpoint "
                              f"({foreign[:10]}); nothing was replaced: move them away and rerun with --resume")
        for path in old:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    def _remove_created(self) -> None:
        """Folders this writer created, when they are still empty: a failed start leaves no debris."""
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:
                break

    def close(self) -> None:
        """Give up save_path without publishing (what was staged stays for a --resume)."""
        self._files.close()
        if self.lock is not None:
            self.lock.release()
        if not any(p.is_file() for p in self.staging.rglob("*")):
            shutil.rmtree(self.staging, ignore_errors=True)
        self._remove_created()

    def abort(self) -> None:
        """Drop everything written so far; save_path keeps whatever it held before."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self.close()
