"""Calibration samples: (image, text) pairs read from an index file or an image folder.

Every sample is checked here, before any model is loaded, so a bad calibration set fails in seconds with the file
at fault named rather than hours into a run.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from dist_quant.checkpoint.safetensors_stream import DuplicateKeyError, open_regular, parse_json, read_text
from dist_quant.errors import CalibrationError, reason

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
INDEX_SUFFIXES = {".json", ".jsonl"}
MAX_IMAGE_MEGAPIXELS = 64  # the image processor shrinks images to a few megapixels: larger ones only cost memory
MAX_IMAGE_PIXELS = MAX_IMAGE_MEGAPIXELS * 10**6
TOO_LARGE_HINT = (f"the {MAX_IMAGE_MEGAPIXELS} megapixels a calibration image may have; downscale it, since the "
                  "model's image processor resizes every image to at most max_pixels anyway")


@dataclass(frozen=True)
class CalibSample:
    """One calibration prompt: an image (absolute path) and the user text asked about it."""

    image: Path
    text: str


def check_image(where: str, image: Path) -> None:
    """Decode the image now, so an unreadable, truncated or oversized file is reported before the model loads.

    verify() alone would pass a JPEG cut short; only decoding finds it. The pixel limit is checked before decoding.
    """
    if not os.path.exists(image):
        raise CalibrationError(f"{where}: calibration image {image} does not exist")
    try:
        file = open_regular(image)  # a FIFO would block PIL's open forever
    except OSError as e:
        raise CalibrationError(f"{where}: calibration image {image} cannot be read: {reason(e)}") from None
    try:
        with warnings.catch_warnings(), file:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is lower than PIL's
            with Image.open(file) as opened:
                width, height = opened.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise CalibrationError(f"{where}: calibration image {image} is {width}x{height} pixels, "
                                           f"larger than {TOO_LARGE_HINT}")
                opened.load()
    except Image.DecompressionBombError as e:
        raise CalibrationError(f"{where}: calibration image {image} is larger than {TOO_LARGE_HINT}. PIL: "
                               f"{reason(e)}") from None
    except (OSError, SyntaxError, ValueError, RecursionError) as e:
        raise CalibrationError(f"{where}: calibration image {image} cannot be read as an image: {reason(e)}") \
            from None


def check_inside(where: str, name: str, path: Path, folder: Path) -> None:
    """A calibration file, symlinks followed, must lie inside the dataset folder: a symlink (or '..') reaching out
    would calibrate on, and could report about, any file of the machine."""
    real, root = path.resolve(), folder.resolve()
    if not real.is_relative_to(root):
        raise CalibrationError(f"{where}: {name!r} is a symlink to {real}, outside the dataset folder {folder}; "
                               "copy the file into the dataset folder")


def check_unicode(where: str, what: str, value: str) -> None:
    """JSON's ``\\ud800`` escapes and YAML's ``"\\ud800"`` give Python strings holding a lone surrogate, which is
    not Unicode text: the tokenizer and the file system refuse it with an encoding traceback."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise CalibrationError(f"{where}: {what} holds a lone surrogate ({ascii(value[error.start])[1:-1]} at "
                               f"character {error.start}), which is not valid Unicode; fix or remove it") from None


def _describe(entry: object) -> str:
    """What an unusable index entry is, without quoting it (an entry can hold megabytes of text)."""
    if isinstance(entry, dict):
        return "an object without an \"image\" string"
    return {list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(type(entry), "a number")


def read_index_entries(index: Path) -> list[tuple[str, object]]:
    """Raw entries of an index.json (a JSON list) or index.jsonl (one object a line), each with where it came from."""
    try:
        content = read_text(index)
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"cannot read calibration index {index}: {reason(e)}") from None
    if index.suffix == ".jsonl":
        entries = []
        for line_number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            entries.append((f"{index} line {line_number}", _parse(f"{index} line {line_number}", line, False)))
        return entries
    data = _parse(str(index), content, True)
    if not isinstance(data, list):
        raise CalibrationError(f"{index} must hold a JSON list of {{\"image\": ..., \"text\": ...}} objects")
    return [(f"{index} entry {i}", entry) for i, entry in enumerate(data)]


def _parse(where: str, text: str, whole_file: bool) -> object:
    """One JSON document of an index (the whole file, or one line of a .jsonl); errors say where, never what the
    text holds."""
    try:
        return parse_json(text)
    except json.JSONDecodeError as e:
        line = f" line {e.lineno}" if whole_file else ""
        raise CalibrationError(f"{where}{line} is not valid JSON: {e.msg}") from None
    except (DuplicateKeyError, RecursionError) as e:
        raise CalibrationError(f"{where} is not usable JSON: {reason(e)}") from None


def sample_from_entry(where: str, entry: object, folder: Path, default_text: str | None) -> CalibSample:
    """Resolve one index entry; image paths must stay inside the index's folder so a dataset is self-contained."""
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
        raise CalibrationError(f"{where}: expected an object with an \"image\" path, got {_describe(entry)}")
    name = entry["image"][:200]
    text = entry.get("text", default_text)
    if not isinstance(text, str):
        raise CalibrationError(f"{where}: no \"text\" string for {name!r}; add one or pass a default text")
    check_unicode(where, "its image path", entry["image"])
    check_unicode(where, "its text" if "text" in entry else "the default text", text)
    folder = folder.resolve()  # "a/../a" is the folder "a": compare real paths, not spellings
    if "\x00" in entry["image"]:
        raise CalibrationError(f"{where}: image path {name!r} holds a NUL character")
    image = Path(os.path.normpath(folder / entry["image"]))
    if not image.is_relative_to(folder):
        raise CalibrationError(f"{where}: image path {name!r} leaves the dataset folder {folder}")
    check_inside(where, name, image, folder)
    check_image(where, image)
    return CalibSample(image=image, text=text)


def samples_from_index(index: Path, default_text: str | None) -> list[CalibSample]:
    """Samples of an index file, in the file's order."""
    return [sample_from_entry(where, entry, index.parent, default_text) for where, entry in read_index_entries(index)]


def samples_from_image_folder(folder: Path, default_text: str | None) -> list[CalibSample]:
    """Every image of the folder, sorted by name, all with the same text."""
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    for image in images:
        check_inside(f"image folder {folder}", image.name, image, folder)
    if images and default_text is None:
        raise CalibrationError(
            f"image folder {folder} has no index file giving texts; pass a default text or add an index.jsonl"
        )
    if images:
        check_unicode(f"image folder {folder}", "the default text", default_text)
    for image in images:
        check_image(f"image folder {folder}", image)
    return [CalibSample(image=image.absolute(), text=default_text) for image in images]


def load_samples(dataset: str | Path, default_text: str | None = None) -> list[CalibSample]:
    """Load a calibration set in any of the three accepted forms, checking every image.

    `dataset` is an index.json/index.jsonl file, an image folder (every image gets `default_text`), or an image
    folder holding exactly one .json/.jsonl index (entries without text get `default_text`).
    """
    path = Path(dataset)
    if not path.exists():
        raise CalibrationError(f"calibration dataset {path} does not exist")
    if not path.is_file() and not path.is_dir():
        raise CalibrationError(f"calibration dataset {path} is neither a file nor a folder (a FIFO, socket or "
                               "device): pass an index.json[l] or an image folder")
    if path.is_file():
        if path.suffix not in INDEX_SUFFIXES:
            raise CalibrationError(f"calibration index {path} must be a .json or .jsonl file")
        samples = samples_from_index(path, default_text)
    else:
        indexes = sorted(p for p in path.iterdir() if p.suffix in INDEX_SUFFIXES and not p.is_dir())
        for index in indexes:
            check_inside(f"calibration folder {path}", index.name, index, path)
        if len(indexes) > 1:
            names = ", ".join(p.name for p in indexes)
            raise CalibrationError(f"calibration folder {path} holds several index files ({names}); keep one")
        if indexes:
            samples = samples_from_index(indexes[0], default_text)
        else:
            samples = samples_from_image_folder(path, default_text)
    if not samples:
        raise CalibrationError(f"calibration dataset {path} holds no samples")
    return samples
