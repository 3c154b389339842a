"""Read safetensors headers without loading tensors: where each tensor's bytes lie in its file.

The format: an 8-byte little-endian header length N, N bytes of JSON ({key: {"dtype", "shape", "data_offsets"}} plus
an optional "__metadata__"), then the data; data_offsets count from the end of the header. The checkpoint reader
reads tensors (or rows of them) from these byte ranges, and the loader check (check/folder.py) the published parts'
tensors. Also here: the guarded file opening and JSON parsing that every reader of untrusted files shares.

The safetensors library judges whether a file is valid (:func:`tensor_slices` opens each one with ``safe_open``);
the header is parsed here as well because the library's Python API gives no byte offsets, and what is checked here
is only what must hold before the library may open the file, and the words for a refusal.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

from safetensors import SafetensorError, safe_open

HEADER_ALIGNMENT = 8  # safetensors pads the JSON header with spaces so the data starts 8-byte aligned
METADATA_KEY = "__metadata__"
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit (HeaderTooLarge)
MAX_OFFSET = 2**64 - 1  # offsets and sizes are u64 in the format
MAX_LIBRARY_WORDS = 400  # characters of the library's message shown when no rule here words a refusal


class TensorSlice(NamedTuple):
    """Where one tensor's bytes lie: begin and end are absolute byte positions in source, not header offsets."""

    key: str
    source: Path
    dtype: str
    shape: Sequence[int]
    begin: int
    end: int


class HeaderError(ValueError):
    """A safetensors file the safetensors library refuses. ``detail`` quotes nothing of a file whose header is not a
    JSON object (it can be anything: a wrong path may point at a private key), and of one whose header is, at most
    clipped key names or the library's own clipped message; ``truncated`` tells a short download from a corrupt one."""

    def __init__(self, path: str | Path, detail: str, truncated: bool = False):
        super().__init__(f"{path} is not a safetensors file: {detail}")
        self.path, self.detail, self.truncated = path, detail, truncated


class NotARegularFile(OSError):
    """A FIFO, device, socket or directory where a file is expected: opening a FIFO blocks forever, a device reads
    without end."""


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def open_regular(path: str | Path) -> BinaryIO:
    """``path`` opened for binary reading, refused with NotARegularFile unless it is a regular file (after symlinks).

    Opened non-blocking, so a FIFO cannot hang the open, then checked on the open descriptor, so nothing can be
    swapped in between the check and the read. Hand-written: Python's open() and the safetensors library open any
    path, and block forever on a FIFO."""
    if os.path.exists(path):
        _refuse_irregular(path, os.stat(path).st_mode)  # a socket cannot even be opened: say what it is
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        _refuse_irregular(path, os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _refuse_irregular(path: str | Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise NotARegularFile(errno.EINVAL, f"is {kind}, not a regular file", str(path))


MAX_TEXT_BYTES = 1024**3  # configs, indexes, templates and recipes are kilobytes; a calibration index megabytes


def read_text(path: str | Path, limit: int | None = None) -> str:
    """A regular file's whole content as UTF-8 (UnicodeDecodeError otherwise); a file over ``limit`` bytes (default
    MAX_TEXT_BYTES) is refused (OSError) before it is read into memory."""
    limit = MAX_TEXT_BYTES if limit is None else limit
    with open_regular(path) as file:
        size = os.fstat(file.fileno()).st_size
        if size > limit:
            raise OSError(errno.EFBIG, f"is {size} bytes, more than the {limit} a text file read here may hold",
                          str(path))
        return file.read().decode("utf-8")


class DuplicateKeyError(ValueError):
    """A JSON object that names a key twice: every parser keeps a different one (Python the last), so the file
    means two things."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    result = {}
    for key, value in pairs:
        if key in result:
            name = key if len(key) <= 80 else key[:80] + "..."
            raise DuplicateKeyError(f"the key {name!r} appears twice in one object")
        result[key] = value
    return result


def parse_json(text: str | bytes) -> object:
    """JSON with duplicate keys refused (DuplicateKeyError); RecursionError for absurdly deep nesting."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def _read_header(path: str | Path, file: BinaryIO) -> tuple[dict, int]:
    """Refuses (HeaderError), before reading it, a header length that the file cannot hold or the safetensors library
    would not read, and a header that is not a JSON object with unique keys. Hand-written because the header is read
    here into memory, and a name given twice refused: the library silently keeps one of the two entries, so the file
    would mean different things to different readers."""
    size = os.fstat(file.fileno()).st_size
    prefix = file.read(8)
    if len(prefix) < 8:
        raise HeaderError(path, "it holds fewer than 8 bytes", truncated=True)
    (length,) = struct.unpack("<Q", prefix)
    # checked before reading: they may claim exabytes. The claimed length is not printed: it is the file's first 8
    # bytes, and the file may be anything (a private key) given by mistake
    if length > size - 8:
        raise HeaderError(path, "its first 8 bytes give a header length past the end of the file")
    if length > MAX_HEADER_BYTES:
        raise HeaderError(path, f"its first 8 bytes give a header length over the {MAX_HEADER_BYTES} bytes the "
                                "safetensors library reads")
    header_bytes = file.read(length)
    if len(header_bytes) < length:
        raise HeaderError(path, "it ended while its header was read", truncated=True)
    if not header_bytes.startswith(b"{"):
        raise HeaderError(path, "its header does not start with a JSON object")
    try:
        header = parse_json(header_bytes.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise HeaderError(path, f"its header is not UTF-8 text (invalid byte at offset {8 + error.start})") from None
    except json.JSONDecodeError as error:
        raise HeaderError(path, f"its header is not valid JSON ({error.msg} at byte {8 + error.pos})") from None
    except DuplicateKeyError as error:
        raise HeaderError(path, f"its header is ambiguous: {error}") from None
    except RecursionError:
        raise HeaderError(path, "its header is nested too deeply to be a safetensors header") from None
    if not isinstance(header, dict):
        raise HeaderError(path, "its header is not a JSON object")
    return header, 8 + length


def _short(key: str) -> str:
    return key if len(key) <= 120 else key[:120] + "..."


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_OFFSET


def _entry_span(path: str | Path, key: str, info: object) -> tuple[int, int]:
    """(begin, end) of one header entry, once its shape and offsets are what the library's TensorInfo holds."""
    name = _short(key)
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise HeaderError(path, f"entry {name!r} is not an object with dtype, shape and data_offsets")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise HeaderError(path, f"entry {name!r} has a shape that is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)):
        raise HeaderError(path, f"entry {name!r} has data_offsets that are not two non-negative integers")
    begin, end = offsets
    if begin > end:
        raise HeaderError(path, f"entry {name!r} ends (byte {end}) before it begins (byte {begin})")
    return begin, end


def explain_refusal(path: str | Path, header: dict, data_bytes: int) -> None:
    """Raise HeaderError naming the entries at fault, for the faults worded here, once the safetensors library has
    refused the file. Hand-written because the library's own messages (safetensors 0.8) name one tensor or none
    ("invalid offset for tensor `a`" for two tensors sharing bytes), quote the values at fault, and say "file not
    fully covered" both for a short download and for bytes after the last tensor. The other faults (an unknown
    dtype, a size that does not match dtype and shape) are left to the library's words.
    ``data_bytes``: the file size minus 8 minus the header length."""
    metadata = header.get(METADATA_KEY)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                                         for k, v in metadata.items())):
        raise HeaderError(path, f"its {METADATA_KEY} is not a map of strings to strings")
    spans = sorted((*_entry_span(path, key, info), key) for key, info in header.items() if key != METADATA_KEY)
    position, previous = 0, None
    for begin, end, key in spans:  # overlaps first: they are what makes a tensor read another one's bytes
        if begin < position:
            raise HeaderError(path, f"entries {_short(previous)!r} and {_short(key)!r} share data bytes "
                                    f"{begin}-{min(end, position)}: one of them would be read from the other's bytes")
        position, previous = end, key
    position = 0
    for begin, end, key in spans:
        if begin > position:
            raise HeaderError(path, f"no entry describes data bytes {position}-{begin} (before {_short(key)!r}): the "
                                    "header and the data do not belong together")
        position = end
    if position > data_bytes:
        raise HeaderError(path, f"its header describes {position} bytes of tensor data, the file holds "
                                f"{data_bytes}", truncated=True)
    if position < data_bytes:
        raise HeaderError(path, f"it holds {data_bytes - position} bytes after its last tensor (the header "
                                f"describes {position} bytes of data, the file holds {data_bytes})")


def _library_refusal(path: str | Path, file: BinaryIO) -> str | None:
    """The safetensors library's message when it refuses the file ``file`` has open, None when it accepts it.

    The library opens files by name, so it is given /proc's name for the open descriptor: a FIFO swapped in at
    ``path`` since :func:`open_regular` checked it would hang the library's open (``path`` where /proc is not
    mounted). framework="numpy": no torch storage is mapped over the file."""
    name = f"/proc/self/fd/{file.fileno()}"
    try:
        with safe_open(name if os.path.exists(name) else str(path), framework="numpy"):
            return None
    except SafetensorError as error:
        words = str(error).strip()
        return words if len(words) <= MAX_LIBRARY_WORDS else words[:MAX_LIBRARY_WORDS] + "..."


def tensor_slices(path: str | Path) -> dict[str, TensorSlice]:
    """Each tensor of a safetensors file by key, in the header's order, once the safetensors library accepts the file
    (HeaderError otherwise). The library maps the file and reads only its header: well under a millisecond."""
    with open_regular(path) as file:
        header, data_start = _read_header(path, file)
        refusal = _library_refusal(path, file)
        if refusal is not None:
            explain_refusal(path, header, os.fstat(file.fileno()).st_size - data_start)
            raise HeaderError(path, f"the safetensors library refuses it: {refusal}")
    source = Path(path)
    slices = {}
    for key, info in header.items():
        if key != METADATA_KEY:
            begin, end = info["data_offsets"]
            slices[key] = TensorSlice(key, source, info["dtype"], info["shape"], data_start + begin, data_start + end)
    return slices

