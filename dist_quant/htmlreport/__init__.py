"""``report.html``: one self-contained page next to a checkpoint (inline SVG and CSS; no script, font or file fetched:
it opens offline) for the questions a person has before deploying: what was made, which experts never saw a
calibration token, where the time went and which actor was the straggler, and, with ``dist-quant eval``, which
layers lost the most.

Everything is read from the files the run publishes (config.json, the format's description, the index,
quant_run.json, calibration_coverage.json, quant_timeline.json, the recipe) and an optional eval report
(``EvalReport`` as JSON): ``dist-quant report CKPT`` draws it again at any time.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import statistics
import tempfile
from collections import Counter
from html import escape
from pathlib import Path
from typing import Optional

from dist_quant.checkpoint.formats import published_format
from dist_quant.errors import CheckpointError
from dist_quant.htmlreport import inputs, svg
from dist_quant.runtime.run_log import COVERAGE_FILE, TIMELINE_FILE

REPORT_FILE = "report.html"
GiB = 1024 ** 3

CSS = """
:root { --bg: #ffffff; --fg: #1f2328; --muted: #59636e; --panel: #f6f8fa; --line: #d0d7de; --lane: #eef1f4; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #0d1117; --fg: #e6edf3; --muted: #9198a1; --panel: #161b22; --line: #3d444d; --lane: #1c232c; }
}
body { background: var(--bg); color: var(--fg); font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
       margin: 24px auto; max-width: 1080px; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid var(--line); }
.muted { color: var(--muted); } table { border-collapse: collapse; margin: 8px 0; }
td, th { border: 1px solid var(--line); padding: 3px 8px; text-align: left; } th { background: var(--panel); }
.figure { overflow-x: auto; background: var(--panel); border: 1px solid var(--line); padding: 8px; }
svg .ink { fill: var(--fg); } svg .lane { fill: var(--lane); } svg .grid { stroke: var(--line); stroke-width: 1; }
svg .none { fill: var(--bg); stroke: var(--fg); stroke-width: 0.4; }
svg .cross { stroke: var(--fg); stroke-width: 0.8; }
svg .bar { stroke: var(--bg); stroke-width: 0.5; }
.advice li { margin: 4px 0; } .ok { color: #1a7f37; } .warn { color: #bc4c00; }
@media (prefers-color-scheme: dark) { .ok { color: #3fb950; } .warn { color: #f0883e; } }
"""
# The second wall behind escaping: the page runs no script, fetches nothing (no image, font, frame or form target)
# and applies no style but its own sheet, whatever markup a file might smuggle in.
CSP = ("default-src 'none'; style-src 'sha256-" + base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()
       + "'; img-src 'none'; base-uri 'none'; form-action 'none'")


def _types(folder: Path, fmt) -> tuple[dict[str, str], Optional[str]]:
    """Each tensor's quant type as the format reads it back, and what went wrong when it could not."""
    if fmt is None:
        return {}, None
    try:
        return {inputs.text(k): inputs.text(v) for k, v in fmt.published_types(folder).items()}, None
    except RecursionError:
        return {}, "the description is nested too deeply to read"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return {}, f"the tensors' quant types cannot be read ({type(error).__name__})"
    except CheckpointError:  # compressed-tensors: its module names follow a model family dist-quant does not have
        return {}, "the tensors' quant types cannot be read (config.json's model_type is not a model dist-quant knows)"


def _table(header: Optional[list[str]], rows: list[list[str]]) -> str:
    head = "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def actor_totals(timeline: dict) -> list[dict]:
    """Per lane: units, busy seconds, idle seconds (from the first unit's start to the last one's end, minus busy),
    bytes read, peak RSS."""
    ran = [u for u in timeline.get("units", []) if not u.get("kept")]
    span = max((u["start"] + u["seconds"] for u in ran), default=0.0) - min((u["start"] for u in ran), default=0.0)
    totals = []
    for actor in sorted({u["actor"] for u in ran}):
        mine = [u for u in ran if u["actor"] == actor]
        busy = sum(u["seconds"] for u in mine)
        totals.append({"actor": actor, "units": len(mine), "busy": busy, "idle": max(span - busy, 0.0),
                       "bytes_read": sum(u.get("bytes_read", 0) for u in mine),
                       "peak_rss": max(u.get("peak_rss", 0) for u in mine)})
    return totals


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def advice(coverage: Optional[dict], timeline: Optional[dict], evaluation: Optional[dict], check=None,
           evaluable: bool = True) -> list[tuple[str, str]]:
    """(class, sentence) of what to do next where something looks wrong; where nothing does, one line saying which
    checks ran. ``check``: the folder's check Report (its loader rules); ``evaluable``: ``dist-quant eval`` reads
    the checkpoint's format."""
    found, passed = [], []
    if check is not None:
        if not check.ok:
            found.append(("warn", f"dist-quant check finds that it breaks its serving engine's loader rules "
                          f"({', '.join(check.failed())}): do not serve it; `dist-quant check` prints each rule "
                          "and the first offending key."))
        else:
            passed.append(f"it passes the loader rules of {', '.join(check.engines)}")
    if evaluation is not None:
        rows = evaluation.get("rows") or []
        broken = [r["name"] for r in rows if not (_finite(r.get("rel_error")) and _finite(r.get("cosine")))]
        broken += [k for k in ("kl_divergence", "top1_agreement") if not _finite(evaluation.get(k))]
        if broken:
            found.append(("warn", f"the comparison with the float model is not finite in {', '.join(broken[:5])}: "
                          "the checkpoint computes NaN or infinite values there; do not serve it (check the "
                          "source weights and the calibration inputs, then quantize again)."))
    if coverage:
        if coverage["experts_without_tokens"]:
            layers = [layer for layer, tokens in coverage["layers"].items() if 0 in tokens]
            found.append(("warn", f"{coverage['experts_without_tokens']} of {coverage['experts']} experts "
                          f"(in {len(layers)} layers) saw no calibration token and were quantized from their "
                          "weights alone: calibrate with more samples, or more varied ones (other scenes, topics, "
                          "languages, code), until the crossed-out cells of the coverage map are gone."))
        else:
            passed.append("every expert saw calibration tokens")
    totals = actor_totals(timeline or {})
    if len(totals) > 1:
        busy = [t["busy"] for t in totals]
        worst = max(totals, key=lambda t: t["busy"])
        if worst["busy"] > 1.25 * statistics.mean(busy):
            found.append(("warn", f"actor {worst['actor']} was the straggler: busy {worst['busy']:.1f} s against "
                          f"{statistics.mean(busy):.1f} s on average; smaller expert groups "
                          "(--expert_group_size) spread the work more evenly."))
        else:
            passed.append("the actors were evenly loaded")
    if evaluation is not None and not any("not finite" in text for _, text in found):
        rows = [r for r in evaluation.get("rows") or [] if _finite(r.get("rel_error"))]
        if rows:
            worst = max(rows, key=lambda r: r["rel_error"])
            median = statistics.median(r["rel_error"] for r in rows)
            if worst["rel_error"] > 2 * median and worst["rel_error"] > 0.05:
                found.append(("warn", f"{worst['name']} loses the most (relative error {worst['rel_error']:.3f}, "
                              f"the median is {median:.3f}): with W8A8 attention, its calibration ranges are the "
                              "knob (more images, or leave that layer's attention FLOAT with an `exclude` in its "
                              "linear_quant); with W4A8 experts, `weight.method: gptq` (the w4a8 preset's) rounds "
                              "them with their own inputs, and more calibration images give it more of them."))
            else:
                passed.append("no layer stands out in the comparison with the float model")
        if _finite(evaluation.get("top1_agreement")) and evaluation["top1_agreement"] < 0.9:
            found.append(("warn", f"top-1 agreement with the float model is {100 * evaluation['top1_agreement']:.1f}%"
                          ": check the outlier suppression (QuaRot and iterative smoothing in the recipe)."))
    if not found:
        checked = "; ".join(passed) if passed else "no check could run (the run's files are missing)"
        found.append(("ok", f"nothing looks wrong: {checked}."))
    if evaluation is None:
        found.append(("muted", "Run `dist-quant eval --report` (on images other than the calibration ones) to add "
                      "the accuracy part." if evaluable else "`dist-quant eval` reads ascendv1 checkpoints only: "
                      "measure this one's accuracy on the engine that serves it, against the float model."))
    return found


def build_report(folder: str | Path, evaluation: Optional[dict] = None, check=None) -> str:
    """The page for the checkpoint in ``folder`` (with the accuracy part when ``evaluation``, a clean eval report, is
    given; ValueError when it is malformed); a run's staging folder is shown as the checkpoint it becomes. ``check``:
    the folder's check Report when the caller has it (quant, which has just run it), else it is run here."""
    from dist_quant.check import check_checkpoint
    from dist_quant.checkpoint.writer import STAGING_DIR

    folder = Path(folder)
    shown = folder.parent if folder.name == STAGING_DIR else folder
    fmt = published_format(folder)
    problems = []

    def read(name: str, clean):
        value, problem = inputs.read(folder, name, clean)
        problems.extend([problem] if problem else [])
        return value

    model = read("config.json", inputs.clean_model) or {}
    run = read("quant_run.json", inputs.clean_run) or {}
    coverage = read(COVERAGE_FILE, inputs.clean_coverage)
    timeline = read(TIMELINE_FILE, inputs.clean_timeline)
    index = (read(fmt.INDEX_FILE, inputs.clean_index) if fmt is not None else None) or {}
    types, problem = _types(folder, fmt)
    problems.extend([problem] if problem else [])
    recipe = sorted(inputs.text(p.name) for p in folder.glob("*.yaml"))
    report = check if check is not None else check_checkpoint(folder)
    ran = [u for u in (timeline or {}).get("units", []) if not u["kept"]]
    wall = max((u["start"] + u["seconds"] for u in ran), default=0.0)  # since the run started
    summary = [
        ["model", f"{model.get('model_type', '?')}: {model.get('num_hidden_layers', '?')} layers, "
                  f"{model.get('num_experts', '?')} experts (top-{model.get('num_experts_per_tok', '?')}), hidden "
                  f"{model.get('hidden_size', '?')}"],
        ["recipe", ", ".join(recipe) or "?"],
        ["format", f"{report.format}; loads on {', '.join(report.engines) or 'no engine (see dist-quant check)'}"],
        ["tensors by type", ", ".join(f"{t}: {n}" for t, n in sorted(Counter(types.values()).items()))
                            + " (FLOAT counts norms and embeddings too)"],
        ["size", f"{index.get('total_size', 0) / GiB:.2f} GiB in {index.get('parts', 0)} part file(s), "
                 f"{len(types)} tensors"],
        ["wall time", (f"{wall:.1f} s to the last unit" if ran else "every unit was kept from an earlier run")
                      + f" on {(timeline or {}).get('workers', '?')} worker(s)"],
        ["device, threads", f"{run.get('device', '?')}, {run.get('compute_threads', '?')} compute thread(s), "
                            f"expert groups of {run.get('expert_group_size', '?')}"],
        ["versions", f"dist-quant {run.get('dist_quant', '?')}, torch {run.get('torch', '?')}"],
    ]
    parts = [f"<h1>{escape(inputs.text(shown.name))}</h1><p class='muted'>{escape(inputs.text(str(shown)))}</p>",
             "<h2>Summary</h2>", _table(None, summary)]
    if problems:
        parts.append("<p class='warn'>Not drawn from a malformed file: " + escape("; ".join(problems)) + ".</p>")
    parts.append("<h2>What to do next</h2><ul class='advice'>" + "".join(
        f"<li class='{cls}'>{escape(text)}</li>"
        for cls, text in advice(coverage, timeline, evaluation, report, fmt is None or fmt.NAME == "ascendv1"))
        + "</ul>")
    if coverage and coverage["layers"]:
        parts += ["<h2>Expert coverage</h2>",
                  f"<p>Calibration tokens routed to each expert (hover a cell); crossed-out cells got none: "
                  f"{coverage['experts_without_tokens']} of {coverage['experts']} experts. The numbers on the right "
                  "are each layer's total.</p>",
                  f"<div class='figure'>{svg.coverage_heatmap(coverage['layers'])}</div>"]
    if timeline and ran:
        totals = actor_totals(timeline)
        kept = [u for u in timeline["units"] if u["kept"]]
        startup = min(u["start"] for u in ran)
        parts += ["<h2>Run timeline</h2>",
                  "<p>One lane per actor; a bar per unit, coloured by kind (hover for its phases); gaps are idle "
                  f"time. Time runs from the first unit's start; the {startup:.1f} s before it went to starting "
                  "up (reading the calibration inputs, and on Ray the runtime and the actors)."
                  + (f" {len(kept)} unit(s) were kept from an interrupted run and are not drawn." if kept
                     else "") + "</p>",
                  f"<div class='figure'>{svg.timeline(timeline['units'], timeline['workers'])}</div>",
                  _table(["actor", "units", "busy s", "idle s", "read GiB", "peak RSS GiB"],
                         [[t["actor"], t["units"], f"{t['busy']:.1f}", f"{t['idle']:.1f}",
                           f"{t['bytes_read'] / GiB:.2f}", f"{t['peak_rss'] / GiB:.2f}"] for t in totals])]
    if evaluation is not None:
        parts += _accuracy(inputs.clean_evaluation(evaluation))
    body = "\n".join(parts)
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            "<meta name='color-scheme' content='light dark'>"
            f"<title>dist-quant report: {escape(inputs.text(shown.name))}</title><style>{CSS}</style></head>"
            f"<body>{body}<p class='muted'>Drawn by dist-quant from the files next to the checkpoint; "
            "`dist-quant report` draws it again.</p></body></html>\n")


def _accuracy(evaluation: dict) -> list[str]:
    """The accuracy part: the final logits' KL and top-1, and per piece its relative error and cosine."""
    rows = evaluation["rows"]
    names = [r["name"] for r in rows]
    worst = sorted((i for i in range(len(rows)) if _finite(rows[i]["rel_error"])),
                   key=lambda i: -rows[i]["rel_error"])[:3]
    worst_names = ", ".join(f"{rows[i]['name']} ({rows[i]['rel_error']:.3g})" for i in worst)
    parts = ["<h2>Accuracy (dist-quant eval)</h2>",
             f"<p>Final logits: KL(float ‖ quantized) = {evaluation['kl_divergence']:.3g} nats/token, "
             f"top-1 agreement {100 * evaluation['top1_agreement']:.1f}% over {evaluation['tokens']} tokens of "
             f"{evaluation['samples']} samples."
             + (f" Largest relative errors (after the vision merger and each layer, against the float "
                f"model): {escape(worst_names)}." if worst_names else "") + "</p>"]
    if rows:
        errors = svg.line_chart(names, {"rel error": [r["rel_error"] for r in rows]}, "relative error", log=True,
                                highlight=set(worst))
        cosines = svg.line_chart(names, {"cosine": [r["cosine"] for r in rows]}, "cosine similarity",
                                 highlight=set(worst))
        parts += [f"<div class='figure'>{errors}</div>", f"<div class='figure'>{cosines}</div>"]
    return parts


def write_report(folder: str | Path, evaluation: Optional[dict] = None, path: Optional[str | Path] = None,
                 check=None) -> Path:
    """Draw the page and write it in one step (a temporary file renamed into place: never half a page)."""
    target = Path(path) if path is not None else Path(folder) / REPORT_FILE
    page = build_report(folder, evaluation, check).encode("utf-8")
    # a new file of our own (O_EXCL): never written through a symlink or FIFO someone planted in a shared folder;
    # the rename then replaces whatever report.html was (a symlink itself, not what it points to)
    fd, partial = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(page)
        os.chmod(partial, 0o644)
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return target
