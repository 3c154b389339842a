"""Errors a user can act on. Every message names the file, tensor or sample at fault and says what to do."""


class DistQuantError(Exception):
    """Base class for errors reported to the user without a traceback."""


class CheckpointError(DistQuantError):
    """The source checkpoint is missing, corrupt, or not what the model config describes."""


class CalibrationError(DistQuantError):
    """The calibration set is missing, empty, or holds a sample that cannot be used."""


class RecipeError(DistQuantError):
    """The recipe YAML is invalid."""


class OutputError(DistQuantError):
    """The output folder cannot be written as asked."""


def reason(error: BaseException) -> str:
    """What went wrong reading a file, in one line and without quoting the file: a parser's message can hold the
    bytes it choked on (``repr`` of a UnicodeDecodeError holds the whole input), and the file may be anything the
    user pointed at by mistake, a private key included."""
    import json
    import re

    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text (invalid byte at offset {error.start})"
    if isinstance(error, json.JSONDecodeError):
        return f"not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
    if isinstance(error, RecursionError):
        return "nested too deeply to parse"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = re.sub(r"""b(['"]).*?(?<!\\)\1""", "<bytes>", str(error))  # bytes literals quote the file
    text = " ".join(text.split())
    return (text[:200] + "...") if len(text) > 200 else text or type(error).__name__


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7f, *range(0x80, 0xa0)) if c not in (0x09, 0x0a)}


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: control characters (an escape sequence in a file name or a recipe value
    could rewrite the screen, hide the rest of a message or set the window title) shown as ``\\xNN``; tabs and
    newlines kept."""
    return text.translate(_CONTROL)


def show(value: object, width: int = 60) -> str:
    """A value from a file for a message: its repr, clipped after ``width`` characters (a hostile config or recipe
    can hold megabytes in one field, and an error is one line)."""
    text = repr(value)
    return text if len(text) <= width else text[:width] + "..."
