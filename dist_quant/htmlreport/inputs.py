"""The files report.html is drawn from, read as the page needs them. A checkpoint's files come from whoever shared it,
so every field is checked for its type and range here, and only numbers and plain text (escaped where it is drawn)
reach the page. A missing file reads as None; a malformed one as None and a problem the page names, never a
traceback.

The readers are pure functions from parsed JSON to clean values (``clean_*``; ValueError naming the field) plus one
bounded file reader.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

MAX_FILE_BYTES = 64 * 2 ** 20  # a 235B run's files are well under 1 MiB; a larger one is not a run file
MAX_TEXT = 200  # characters of any one string drawn (a name, a device): longer is cut with an ellipsis
# the page's size is the product of what the files list, so it is bounded here (each cell or bar is ~200 bytes)
MAX_HEATMAP_CELLS = 2 ** 17  # layers x experts drawn as a map (235B: 94 x 128 = 12,032; 397B: 60 x 512 = 30,720)
MAX_UNITS = 50_000  # timeline bars (235B on 16 experts a group: ~900 units)
MAX_LANES = 4096  # timeline lanes: actors (one per card)
MAX_SECONDS = 1e9  # ~31 years: a start or a duration beyond it is no run's (and start + seconds stays finite)
MAX_ROWS = 10_000  # eval rows (one per layer and the merger)
COSINE_SLACK = 1e-6  # a cosine of float64 rounding may pass 1 by a few ulps
MAX_INT = 2 ** 53  # the largest integer a browser (and JSON everywhere) holds exactly


ABSENT = object()


def read_json(folder: Path, name: str) -> tuple[Any, Optional[str]]:
    """(the parsed file, None), (ABSENT, None) when there is no such file, or (ABSENT, what is wrong with it): read
    as the model folder's JSON files are (a regular file only, opened so that a FIFO cannot block, bounded in size,
    duplicate keys refused)."""
    from dist_quant.checkpoint.model_folder import JSON_FILE_ERRORS
    from dist_quant.checkpoint.safetensors_stream import parse_json, read_text
    from dist_quant.errors import reason

    path = folder / name
    if not (path.exists() or path.is_symlink()):
        return ABSENT, None
    try:
        return parse_json(read_text(path, MAX_FILE_BYTES)), None
    except RecursionError:
        return ABSENT, f"{name} is nested too deeply to read"
    except JSON_FILE_ERRORS as error:
        return ABSENT, f"{name} cannot be read ({reason(error)})"


def text(value: Any) -> str:
    """Any JSON value as plain text of bounded length, valid UTF-8 (a lone surrogate in a JSON string cannot be
    written to the page)."""
    shown = value if isinstance(value, str) else json.dumps(value) if _simple(value) else type(value).__name__
    shown = shown.encode("utf-8", "replace").decode("utf-8")
    return shown if len(shown) <= MAX_TEXT else shown[:MAX_TEXT - 1] + "…"


def _simple(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float))


def count(value: Any, field: str) -> int:
    """A whole number in [0, 2**53] (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
        raise ValueError(f"{field} is not a count")
    return value


def seconds(value: Any, field: str) -> float:
    """A finite number of seconds, at least 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_SECONDS:
        raise ValueError(f"{field} is not a number of seconds from 0 to {MAX_SECONDS:g}")
    return float(value)


def number(value: Any, field: str, low: float = -math.inf, high: float = math.inf) -> float:
    """A number in [low, high]; NaN and infinities are kept (an eval that computed them must say so: the page warns),
    a finite value outside the range is refused (no measurement gives a negative KL or a top-1 of 150%)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} is not a number")
    if math.isfinite(value) and not low <= value <= high:
        raise ValueError(f"{field} is {value:g}, outside [{low:g}, {high:g}]")
    return float(value)


def _object(value: Any, field: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{field} is not a JSON object")
    return value


def _list(value: Any, field: str, most: int) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{field} is not a list")
    if len(value) > most:
        raise ValueError(f"{field} has more than {most} entries")
    return value


def clean_coverage(raw: Any) -> dict:
    """calibration_coverage.json: ``layers`` {layer number: tokens per expert}, ``experts`` and
    ``experts_without_tokens`` (counts)."""
    raw = _object(raw, "the file")
    layers = {}
    for key, entry in _object(raw.get("layers", {}), "layers").items():
        if not (key.isascii() and key.isdigit() and len(key) < 10):
            raise ValueError(f"layer key {text(key)!r} is not a layer number")
        tokens = _list(_object(entry, f"layer {key}").get("tokens_per_expert"), f"layer {key}'s tokens_per_expert",
                       MAX_HEATMAP_CELLS)
        layers[int(key)] = [count(c, f"a token count of layer {key}") for c in tokens]
    if sum(len(v) for v in layers.values()) > MAX_HEATMAP_CELLS:
        raise ValueError(f"it has more than {MAX_HEATMAP_CELLS} experts in all")
    return {"layers": layers, "experts": count(raw.get("experts", 0), "experts"),
            "experts_without_tokens": count(raw.get("experts_without_tokens", 0), "experts_without_tokens")}


def _unit(raw: Any, index: int) -> dict:
    where = f"unit {index}"
    raw = _object(raw, where)
    unit = {"id": text(raw.get("id", "")), "name": text(raw.get("name", "")), "kind": text(raw.get("kind", "")),
            "kept": raw.get("kept") is True}
    if unit["kept"]:
        return unit
    phases = _object(raw.get("phases", {}), f"{where}'s phases")
    unit.update(actor=count(raw.get("actor"), f"{where}'s actor"), start=seconds(raw.get("start"), f"{where}'s start"),
                seconds=seconds(raw.get("seconds"), f"{where}'s seconds"),
                bytes_read=count(raw.get("bytes_read", 0), f"{where}'s bytes_read"),
                peak_rss=count(raw.get("peak_rss", 0), f"{where}'s peak_rss"),
                phases={text(k): seconds(v, f"{where}'s phase {text(k)}") for k, v in list(phases.items())[:32]})
    return unit


def clean_timeline(raw: Any) -> dict:
    """quant_timeline.json: ``workers`` and ``units`` (each kept, or run by an actor from ``start`` for
    ``seconds``)."""
    raw = _object(raw, "the file")
    workers = count(raw.get("workers", 1), "workers")
    if not 1 <= workers <= MAX_LANES:
        raise ValueError(f"workers is {workers}, not between 1 and {MAX_LANES}")
    units = [_unit(u, i) for i, u in enumerate(_list(raw.get("units", []), "units", MAX_UNITS))]
    lanes = {u["actor"] for u in units if not u["kept"]}
    if len(lanes | set(range(workers))) > MAX_LANES:
        raise ValueError(f"it has more than {MAX_LANES} actors")
    return {"workers": workers, "units": units}


def clean_run(raw: Any) -> dict[str, str]:
    """quant_run.json's fingerprint, as text (the page only shows it)."""
    fingerprint = _object(_object(raw, "the file").get("fingerprint", {}), "fingerprint")
    return {key: text(value) for key, value in fingerprint.items() if _simple(value) or isinstance(value, str)}


def clean_index(raw: Any) -> dict:
    """The checkpoint's index: ``total_size`` (bytes) and how many part files its ``weight_map`` names."""
    raw = _object(raw, "the file")
    metadata = _object(raw.get("metadata", {}), "metadata")
    weight_map = _object(raw.get("weight_map", {}), "weight_map")
    return {"total_size": count(metadata.get("total_size", 0), "metadata.total_size"),
            "parts": len({text(v) for v in weight_map.values()})}


def clean_model(raw: Any) -> dict[str, str]:
    """config.json's few facts the summary shows, as text."""
    raw = _object(raw, "the file")
    text_config = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    shown = {"model_type": raw.get("model_type", "?")}
    for key in ("num_hidden_layers", "num_experts", "num_experts_per_tok", "hidden_size"):
        shown[key] = text_config.get(key, "?")
    if shown["num_experts"] == "?":  # transformers 5 writes num_local_experts
        shown["num_experts"] = text_config.get("num_local_experts", "?")
    return {key: text(value) for key, value in shown.items()}


def clean_evaluation(raw: Any) -> dict:
    """An eval report (``dist-quant eval --output``): ``rows`` of {name, cosine, rel_error}, the final logits'
    ``kl_divergence`` and ``top1_agreement``, ``tokens`` and ``samples``, and the checkpoint it measured
    (``quant_path``, ``checkpoint_fingerprint``)."""
    raw = _object(raw, "it")
    rows = []
    for i, row in enumerate(_list(raw.get("rows", []), "its rows", MAX_ROWS)):
        row = _object(row, f"row {i}")
        if not isinstance(row.get("name"), str):
            raise ValueError(f"row {i} has no name")
        rows.append({"name": text(row["name"]),
                     "cosine": number(row.get("cosine"), f"row {i}'s cosine", -1 - COSINE_SLACK, 1 + COSINE_SLACK),
                     "rel_error": number(row.get("rel_error"), f"row {i}'s rel_error", 0)})
    clean = {"rows": rows, "kl_divergence": number(raw.get("kl_divergence", 0.0), "its kl_divergence", 0),
             "top1_agreement": number(raw.get("top1_agreement", 0.0), "its top1_agreement", 0, 1)}
    for key in ("tokens", "samples"):
        clean[key] = count(raw.get(key, 0), f"its {key}")
    for key in ("quant_path", "checkpoint_fingerprint"):
        if key in raw:
            if not isinstance(raw[key], str):
                raise ValueError(f"its {key} is not text")
            clean[key] = raw[key]
    return clean


def read(folder: Path, name: str, clean) -> tuple[Optional[Any], Optional[str]]:
    """A run file read and cleaned: (value, None), (None, None) when absent, (None, problem) when malformed."""
    raw, problem = read_json(folder, name)
    if raw is ABSENT:
        return None, problem
    try:
        return clean(raw), None
    except ValueError as error:
        return None, f"{name} is malformed ({error})"
