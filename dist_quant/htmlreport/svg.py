"""The report's drawings as inline SVG: pure functions from data to markup (no script, no font, no external file).

Colours: counts on the colour-blind-safe "viridis" ramp (dark to light, readable in grey); unit kinds in the
Okabe-Ito palette; experts without a calibration token crossed out in the text colour, so they show in light and
dark mode alike. Every mark carries ``data-*`` attributes with its values and a ``<title>`` (the hover text).
"""

from __future__ import annotations

import math
from html import escape
from typing import Optional, Sequence

# viridis at 9 stops (matplotlib's), interpolated linearly
VIRIDIS = ("#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725")
KIND_COLOURS = {"images": "#E69F00", "vision": "#56B4E9", "embed": "#009E73", "layer": "#0072B2",
                "experts": "#D55E00", "head": "#CC79A7", "carried": "#000000"}  # Okabe-Ito


def _mix(a: str, b: str, t: float) -> str:
    ca, cb = (tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in (a, b))
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(ca, cb))


def viridis(t: float) -> str:
    """The ramp's colour at t in [0, 1]."""
    t = min(max(t, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    return _mix(VIRIDIS[i], VIRIDIS[i + 1], t - i)


def _svg(width: float, height: float, body: list[str], label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{escape(label)}" '
            f'width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">'
            + "".join(body) + "</svg>")


def _text(x: float, y: float, text: str, anchor: str = "start", size: int = 11, cls: str = "ink") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" class="{cls}">'
            f"{escape(text)}</text>")


def coverage_heatmap(tokens: dict[int, Sequence[int]]) -> str:
    """Layers (rows) x experts (columns): calibration tokens routed to each expert, log-scaled colour, experts with
    none crossed out; each row ends with the layer's total."""
    layers = sorted(tokens)
    experts = max((len(v) for v in tokens.values()), default=0)
    cell_w = max(4.0, min(28.0, 900.0 / max(experts, 1)))
    cell_h = max(4.0, min(28.0, 700.0 / max(len(layers), 1)))
    left, top, right = 64.0, 22.0, 90.0
    peak = max((c for v in tokens.values() for c in v), default=0)
    scale = math.log1p(peak) or 1.0
    body = [_text(left, 14, f"experts 0-{experts - 1} →", size=11)]
    label_every = max(1, math.ceil(10 / cell_h))
    for row, layer in enumerate(layers):
        y = top + row * cell_h
        if row % label_every == 0:
            body.append(_text(left - 6, y + min(cell_h, 11) - 1, f"layer {layer}", "end", size=11))
        for expert, count in enumerate(tokens[layer]):
            x = left + expert * cell_w
            none = count == 0
            fill = "none" if none else viridis(math.log1p(count) / scale)
            title = f"layer {layer}, expert {expert}: {count} calibration tokens" + (" (none)" if none else "")
            body.append(f'<g data-layer="{layer}" data-expert="{expert}" data-tokens="{count}"><title>{escape(title)}'
                        f'</title><rect x="{x:.2f}" y="{y:.2f}" width="{cell_w:.2f}" height="{cell_h:.2f}" '
                        f'fill="{fill}" class="{"none" if none else "cell"}"/>')
            if none:
                body.append(f'<path d="M{x:.2f} {y:.2f}l{cell_w:.2f} {cell_h:.2f}m0 {-cell_h:.2f}l{-cell_w:.2f} '
                            f'{cell_h:.2f}" class="cross"/>')
            body.append("</g>")
        total = sum(tokens[layer])
        body.append(f'<g data-layer-total="{layer}" data-tokens="{total}">'
                    + _text(left + experts * cell_w + 6, y + min(cell_h, 11) - 1, f"{total}",
                            size=int(min(11, cell_h + 1))) + "</g>")
    height = top + len(layers) * cell_h + 34
    one = math.log1p(1) / scale
    stops = {}  # the legend: token counts at up to five points of the log scale, from 1 token to the most
    for t in (one, one + (1 - one) / 4, one + (1 - one) / 2, one + 3 * (1 - one) / 4, 1):
        stops.setdefault(max(1, round(math.expm1(t * scale))), math.log1p(max(1, round(math.expm1(t * scale)))) / scale)
    for i, (count, t) in enumerate(stops.items()):
        x = left + i * 110
        body.append(f'<rect x="{x}" y="{height - 20}" width="14" height="12" fill="{viridis(t)}"/>'
                    + _text(x + 18, height - 10, f"{count} token{'s' if count != 1 else ''}"))
    x = left + len(stops) * 110
    body.append(f'<rect x="{x}" y="{height - 20}" width="14" height="12" class="none"/>'
                f'<path d="M{x} {height - 20}l14 12m0 -12l-14 12" class="cross"/>' + _text(x + 18, height - 10, "none"))
    width = left + experts * cell_w + right
    return _svg(max(width, left + 6 * 110 + 60), height, body, "calibration tokens per expert and layer")


def timeline(units: list[dict], workers: int) -> str:
    """One lane per actor (or the single card), a bar per unit that ran, coloured by kind, its phases in the
    hover text; time runs left to right from the first unit's start, gaps are idle time."""
    ran = [u for u in units if not u.get("kept")]
    lanes = sorted({u["actor"] for u in ran} | set(range(workers)))  # an actor with nothing to do has a lane
    origin = min((u["start"] for u in ran), default=0.0)
    end = max((u["start"] + u["seconds"] - origin for u in ran), default=1.0) or 1.0
    left, top, lane_h, width = 80.0, 24.0, 26.0, 900.0
    px = width / end
    body = []
    for i, lane in enumerate(lanes):
        y = top + i * lane_h
        name = f"actor {lane}" if workers > 1 else "single card"
        body.append(_text(left - 6, y + 16, name, "end") + f'<rect x="{left}" y="{y + 2:.1f}" width="{width}" '
                    f'height="{lane_h - 4}" class="lane"/>')
    lane_of = {lane: i for i, lane in enumerate(lanes)}
    for u in ran:
        y = top + lane_of[u["actor"]] * lane_h
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in u.get("phases", {}).items() if v >= 0.005)
        title = f"{u['name']} ({u['kind']}): {u['seconds']:.2f} s from {u['start']:.2f} s" + (
            f"; {phases}" if phases else "")
        body.append(f'<g data-unit="{escape(u["id"])}" data-actor="{u["actor"]}" data-start="{u["start"]}" '
                    f'data-seconds="{u["seconds"]}"><title>{escape(title)}</title>'
                    f'<rect x="{left + (u["start"] - origin) * px:.2f}" y="{y + 3:.1f}" '
                    f'width="{max(u["seconds"] * px, 1.0):.2f}" height="{lane_h - 6}" '
                    f'fill="{KIND_COLOURS.get(u["kind"], "#999999")}" class="bar"/></g>')
    axis_y = top + len(lanes) * lane_h + 4
    step = _nice_step(end / 8)
    t = 0.0
    while t <= end + 1e-9:
        x = left + t * px
        body.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{axis_y}" class="grid"/>'
                    + _text(x, axis_y + 12, f"{t:g} s", "middle", 10))
        t += step
    legend_y = axis_y + 30
    for i, (kind, colour) in enumerate(KIND_COLOURS.items()):
        x = left + i * 110
        body.append(f'<rect x="{x}" y="{legend_y - 10}" width="14" height="12" fill="{colour}"/>'
                    + _text(x + 18, legend_y, kind))
    return _svg(left + width + 20, legend_y + 10, body, "run timeline per actor")


def _nice_step(raw: float) -> float:
    if raw <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _power_of_ten(exponent: float) -> str:
    """10 ** exponent as a tick label, also where it is beyond a float (an eval that measured 1e308)."""
    return f"{10 ** exponent:.2g}" if abs(exponent) < 300 else f"1e{exponent:.0f}"


def line_chart(names: list[str], series: dict[str, list[float]], ylabel: str, log: bool = False,
               highlight: Optional[set[int]] = None) -> str:
    """Values per piece (the vision merger, then each layer) as lines with points; the worst pieces' points are
    drawn larger."""
    left, top, width, height = 70.0, 26.0, 860.0, 220.0
    values = [v for vals in series.values() for v in vals if math.isfinite(v) and (v > 0 or not log)]
    lo, hi = (min(values), max(values)) if values else (1.0, 10.0)
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
    hi = hi if hi > lo else lo + 1.0
    n = max(len(names), 1)

    def x_of(i: int) -> float:
        return left + (i + 0.5) * width / n

    def y_of(v: float) -> float:
        """Inside the plot: a zero on a log scale sits on the bottom edge, a NaN or inf on the top edge."""
        if not math.isfinite(v):
            return top
        if log and v <= 0:
            return top + height
        v = math.log10(v) if log else v
        return top + height - (v - lo) / (hi - lo) * height

    body = [f'<rect x="{left}" y="{top}" width="{width}" height="{height}" class="lane"/>',
            _text(left, 12, ylabel, size=11)]
    for frac in (0, 0.5, 1):
        v = lo + frac * (hi - lo)
        y = top + height - frac * height
        body.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + width}" y2="{y:.1f}" class="grid"/>'
                    + _text(left - 4, y + 4, _power_of_ten(v) if log else f"{v:.4g}", "end", 10))
    styles = ("#0072B2", "#D55E00", "#009E73")
    for (label, vals), colour in zip(series.items(), styles):
        points = " ".join(f"{x_of(i):.1f},{y_of(v):.1f}" for i, v in enumerate(vals) if math.isfinite(v))
        body.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.6"/>')
        for i, v in enumerate(vals):
            r = 4.5 if highlight and i in highlight else 2.2
            bad = "" if math.isfinite(v) else ' stroke="#000000" stroke-width="2"'
            body.append(f'<circle cx="{x_of(i):.1f}" cy="{y_of(v):.1f}" r="{r}" fill="{colour}"{bad} '
                        f'data-piece="{escape(names[i])}" data-{label.replace(" ", "-")}="{v}">'
                        f'<title>{escape(names[i])}: {label} {v:.5g}</title></circle>')
    label_every = max(1, math.ceil(n / 16))
    for i, name in enumerate(names):
        if i % label_every == 0:
            body.append(_text(x_of(i), top + height + 14, name.replace("layer ", "L").replace(" (merger)", ""),
                              "middle", 10))
    for i, (label, colour) in enumerate(zip(series, styles)):
        body.append(f'<rect x="{left + i * 150}" y="{top + height + 24}" width="14" height="4" fill="{colour}"/>'
                    + _text(left + i * 150 + 18, top + height + 30, label))
    return _svg(left + width + 20, top + height + 40, body, ylabel)
