"""Calibration samples: (image, text) pairs and text-only samples, read from an index file or an image folder.

Every sample is checked here, before any model is loaded, so a bad calibration set fails in seconds with the file
at fault named rather than hours into a run.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from dist_quant.calib import DEFAULT_TEXT_DATASET
from dist_quant.checkpoint.safetensors_stream import DuplicateKeyError, open_regular, parse_json, read_text
from dist_quant.errors import CalibrationError, reason

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
INDEX_SUFFIXES = {".json", ".jsonl"}
# Where an index entry keeps its text: ours, and msModelSlim's in its LLM calibration sets (lab_calib/*.jsonl).
TEXT_FIELDS = ("text", "inputs_pretokenized")
MAX_IMAGE_MEGAPIXELS = 64  # the image processor shrinks images to a few megapixels: larger ones only cost memory
MAX_IMAGE_PIXELS = MAX_IMAGE_MEGAPIXELS * 10**6
TOO_LARGE_HINT = (f"the {MAX_IMAGE_MEGAPIXELS} megapixels a calibration image may have; downscale it, since the "
                  "model's image processor resizes every image to at most max_pixels anyway")
TEXT_SET_HINT = (f"use a text calibration set (an index.jsonl of {{\"text\": ...}} lines) such as the bundled "
                 f"{DEFAULT_TEXT_DATASET}")


@dataclass(frozen=True)
class CalibSample:
    """One calibration prompt: the user text and the image (absolute path) it asks about, or no image (None) for a
    text-only sample. ``where`` names its index entry for messages, and takes no part in comparisons."""

    image: Path | None
    text: str
    where: str = field(default="", compare=False)


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


def _describe(value: object) -> str:
    """What kind of JSON value an unusable entry or field is, without quoting it (it can hold megabytes of text)."""
    kinds = {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}
    return kinds.get(type(value), "a number")


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
        raise CalibrationError(f"{index} must hold a JSON list of {{\"text\": ...}} and/or "
                               "{\"image\": ..., \"text\": ...} objects")
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


def entry_text(where: str, entry: dict) -> str | None:
    """The entry's own text, from "text" or msModelSlim's "inputs_pretokenized" (not both); None when it has
    neither."""
    present = [name for name in TEXT_FIELDS if name in entry]
    if len(present) > 1:
        raise CalibrationError(f"{where}: has both \"text\" and \"inputs_pretokenized\"; keep one")
    if not present:
        return None
    text = entry[present[0]]
    if not isinstance(text, str):
        raise CalibrationError(f"{where}: its \"{present[0]}\" is {_describe(text)}, not a string")
    return text


def sample_from_entry(where: str, entry: object, folder: Path, default_text: str | None,
                      images: bool) -> CalibSample:
    """Resolve one index entry: an image with its text (or `default_text`), or a text alone (entries without an
    "image", or with "image": null). Image paths must stay inside the index's folder so a dataset is
    self-contained."""
    if not isinstance(entry, dict):
        raise CalibrationError(f"{where}: expected an object with an \"image\" path, a \"text\" or both, got "
                               f"{_describe(entry)}")
    text = entry_text(where, entry)
    image = entry.get("image")
    if image is None:
        return text_sample(where, text)
    if not isinstance(image, str):
        raise CalibrationError(f"{where}: its \"image\" is {_describe(image)}, not a path")
    name = image[:200]
    if not images:
        raise CalibrationError(f"{where}: has an image ({name!r}), but the model reads text only; {TEXT_SET_HINT}")
    what = "its text"
    if text is None:
        if not isinstance(default_text, str):
            raise CalibrationError(f"{where}: no \"text\" string for {name!r}; add one or pass a default text")
        text, what = default_text, "the default text"
    check_unicode(where, "its image path", image)
    check_unicode(where, what, text)
    folder = folder.resolve()  # "a/../a" is the folder "a": compare real paths, not spellings
    if "\x00" in image:
        raise CalibrationError(f"{where}: image path {name!r} holds a NUL character")
    path = Path(os.path.normpath(folder / image))
    if not path.is_relative_to(folder):
        raise CalibrationError(f"{where}: image path {name!r} leaves the dataset folder {folder}")
    check_inside(where, name, path, folder)
    check_image(where, path)
    return CalibSample(image=path, text=text, where=where)


def text_sample(where: str, text: str | None) -> CalibSample:
    """A sample without an image: its own text is all it has, so it must say something (the default text is for
    images)."""
    if text is None:
        raise CalibrationError(f"{where}: expected an object with an \"image\" path, a \"text\" or both (or "
                               "msModelSlim's \"inputs_pretokenized\" for the text), got an object with neither")
    check_unicode(where, "its text", text)
    if not text.strip():
        raise CalibrationError(f"{where}: its text is empty; a sample without an image needs a text to calibrate on")
    return CalibSample(image=None, text=text, where=where)


def samples_from_index(index: Path, default_text: str | None, images: bool) -> list[CalibSample]:
    """Samples of an index file, in the file's order."""
    return [sample_from_entry(where, entry, index.parent, default_text, images)
            for where, entry in read_index_entries(index)]


def samples_from_image_folder(folder: Path, default_text: str | None, images: bool) -> list[CalibSample]:
    """Every image of the folder, sorted by name, all with the same text."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    if files and not images:
        raise CalibrationError(f"calibration folder {folder} holds images ({files[0].name}, ...) and no index file, "
                               f"but the model reads text only; {TEXT_SET_HINT}")
    for image in files:
        check_inside(f"image folder {folder}", image.name, image, folder)
    if files and default_text is None:
        raise CalibrationError(
            f"image folder {folder} has no index file giving texts; pass a default text or add an index.jsonl"
        )
    if files:
        check_unicode(f"image folder {folder}", "the default text", default_text)
    for image in files:
        check_image(f"image folder {folder}", image)
    return [CalibSample(image=image.absolute(), text=default_text) for image in files]


def load_samples(dataset: str | Path, default_text: str | None = None, *, images: bool = True) -> list[CalibSample]:
    """Load a calibration set in any of the accepted forms, checking every image.

    `dataset` is an index.json/index.jsonl file, an image folder (every image gets `default_text`), or a folder
    holding exactly one .json/.jsonl index. An index entry is ``{"image": path, "text": ...}`` (without "text" it
    gets `default_text`) or a text alone: ``{"text": ...}``, or msModelSlim's LLM form ``{"inputs_pretokenized":
    ...}`` (other keys, such as its "id", are ignored). One index may mix both kinds, for image+text models.
    `images` says whether the model reads images: False (a text-only model) refuses any image, naming its entry.
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
        samples = samples_from_index(path, default_text, images)
    else:
        indexes = sorted(p for p in path.iterdir() if p.suffix in INDEX_SUFFIXES and not p.is_dir())
        for index in indexes:
            check_inside(f"calibration folder {path}", index.name, index, path)
        if len(indexes) > 1:
            names = ", ".join(p.name for p in indexes)
            raise CalibrationError(f"calibration folder {path} holds several index files ({names}); keep one")
        if indexes:
            samples = samples_from_index(indexes[0], default_text, images)
        else:
            samples = samples_from_image_folder(path, default_text, images)
    if not samples:
        raise CalibrationError(f"calibration dataset {path} holds no samples")
    return samples
