"""report.html: its drawings carry the numbers of the files they are drawn from (calibration_coverage.json,
quant_timeline.json, an eval report), one bar per unit of the plan, and a real browser (headless Chromium) renders
it offline: no console error, no request leaving the file, light and dark mode. The files' numbers, the bars and the
eval part are checked on a run of each model family (family_run); the drawing code itself on Qwen3-VL-MoE's."""

import json
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib

import pytest

from dist_quant.cli import main
from dist_quant.htmlreport import REPORT_FILE, svg
from dist_quant.models.family import sizes_config_of
from dist_quant.runtime.plan import plan_units
from dist_quant.synthetic import make_tiny_text_model
from helpers import FAMILY_TYPES, REPORT_GROUP, SVG_NS, RequestTrap, chromium, report_quant, text_calibration_set

# the fixtures report_model (16 experts, top-1: some see no token) and report_calib (one image) are in conftest.py


@pytest.fixture(scope="module")
def single(report_model, report_calib, tmp_path_factory):
    return report_quant(report_model, report_calib, tmp_path_factory.mktemp("single") / "q")


@pytest.fixture(scope="module", params=FAMILY_TYPES)
def family_run(request, tmp_path_factory):
    """(model, calibration set, checkpoint) of a run of each family with its preset: Qwen3-VL-MoE's is single;
    Qwen3-MoE's model has the same shape (3 layers, 16 experts, top-1, bfloat16) and one short text, so that some
    of its experts see no token too."""
    if request.param == "qwen3_vl_moe":
        return tuple(request.getfixturevalue(name) for name in ("report_model", "report_calib", "single"))
    root = tmp_path_factory.mktemp("report_text")
    model = make_tiny_text_model(root / "model", num_layers=3, num_experts=16, top_k=1, dtype="bfloat16")
    calib = text_calibration_set(root / "calib", texts=("Seven times eight is fifty-six.",))
    return model, calib, report_quant(model, calib, root / "q")


def drawings(html: str) -> list[ET.Element]:
    return [ET.fromstring(m) for m in re.findall(r"<svg .*?</svg>", html, flags=re.S)]


def marks(html: str, attribute: str) -> list[ET.Element]:
    return [g for s in drawings(html) for g in s.iter(f"{SVG_NS}g") if attribute in g.attrib]


def test_the_heatmap_cell_of_layer_l_expert_e_carries_its_count(family_run):
    single = family_run[2]
    coverage = json.loads((single / "calibration_coverage.json").read_text())
    assert coverage["experts_without_tokens"] > 0  # the fixture's purpose
    html = (single / REPORT_FILE).read_text()
    cells = {(int(g.get("data-layer")), int(g.get("data-expert"))): g for g in marks(html, "data-expert")}
    expected = {(int(layer), e): n for layer, entry in coverage["layers"].items()
                for e, n in enumerate(entry["tokens_per_expert"])}
    assert {k: int(g.get("data-tokens")) for k, g in cells.items()} == expected
    for (layer, expert), g in cells.items():
        crossed = g.find(f"{SVG_NS}path") is not None
        assert crossed == (expected[layer, expert] == 0), (layer, expert)
        assert f"layer {layer}, expert {expert}: {expected[layer, expert]} calibration tokens" in g.find(
            f"{SVG_NS}title").text
    totals = {int(g.get("data-layer-total")): int(g.get("data-tokens")) for g in marks(html, "data-layer-total")}
    assert totals == {int(layer): sum(e["tokens_per_expert"]) for layer, e in coverage["layers"].items()}
    assert f"{coverage['experts_without_tokens']} of {coverage['experts']} experts" in html


def test_the_timeline_has_one_bar_per_unit_of_the_plan(family_run):
    model, _, single = family_run
    html = (single / REPORT_FILE).read_text()
    config = sizes_config_of(json.loads((model / "config.json").read_text()))
    plan = plan_units(config, REPORT_GROUP, 1)
    bars = marks(html, "data-unit")
    assert [b.get("data-unit") for b in bars] == [u.id for u in plan]
    timeline = json.loads((single / "quant_timeline.json").read_text())
    for bar, unit in zip(bars, timeline["units"]):
        assert float(bar.get("data-seconds")) == unit["seconds"] and float(bar.get("data-start")) == unit["start"]
        assert unit["name"] in bar.find(f"{SVG_NS}title").text
    starts = [u["start"] for u in timeline["units"]]
    assert starts == sorted(starts) and all(u["seconds"] >= 0 for u in timeline["units"])  # one card: in order
    assert "single card" in html and "experts 0-15" in html


def test_two_ray_actors_get_two_lanes_and_a_totals_table(report_model, report_calib, cluster, tmp_path):
    save = report_quant(report_model, report_calib, tmp_path / "ray", "--workers", "2", "--ray_address",
                        cluster.address)
    html = (save / REPORT_FILE).read_text()
    timeline = json.loads((save / "quant_timeline.json").read_text())
    assert {u["actor"] for u in timeline["units"]} == {0, 1}
    assert {b.get("data-actor") for b in marks(html, "data-unit")} == {"0", "1"}
    assert "actor 0" in html and "actor 1" in html and html.count("<tr><td>") >= 2 + 8  # two actor rows


def test_eval_adds_the_accuracy_part(family_run, tmp_path):
    model, calib, single = family_run
    page = tmp_path / "with_eval.html"
    out = tmp_path / "eval.json"
    assert main(["eval", "--model_path", str(model), "--quant_path", str(single), "--dataset", str(calib),
                 "--output", str(out), "--report", str(page)]) == 0
    evaluation = json.loads(out.read_text())
    html = page.read_text()
    points = {c.get("data-piece"): float(c.get("data-rel-error")) for s in drawings(html)
              for c in s.iter(f"{SVG_NS}circle") if "data-rel-error" in c.attrib}
    assert points == {r["name"]: r["rel_error"] for r in evaluation["rows"]}
    worst = max(evaluation["rows"], key=lambda r: r["rel_error"])["name"]
    assert f"{worst} (" in html and "top-1 agreement" in html
    assert main(["report", str(single), "--eval", str(out), "--output", str(tmp_path / "again.html")]) == 0
    assert (tmp_path / "again.html").read_text() == html


def test_the_report_command_draws_the_published_page_again(family_run, tmp_path):
    single = family_run[2]
    copy = tmp_path / "q"
    shutil.copytree(single, copy)
    published = (copy / REPORT_FILE).read_text().replace(str(single), str(copy))
    (copy / REPORT_FILE).unlink()
    assert main(["report", str(copy)]) == 0
    assert (copy / REPORT_FILE).read_text() == published


def test_readable_at_235b_and_at_a_tiny_model():
    big = svg.coverage_heatmap({layer: [layer * e % 7 for e in range(128)] for layer in range(94)})
    tiny = svg.coverage_heatmap({layer: [5] * 6 for layer in range(3)})
    for drawing, cells in ((big, 94 * 128), (tiny, 18)):
        root = ET.fromstring(drawing)
        assert int(root.get("width")) <= 1100 and int(root.get("height")) <= 900
        rects = [r for g in root.iter(f"{SVG_NS}g") if "data-expert" in g.attrib for r in g.iter(f"{SVG_NS}rect")]
        assert len(rects) == cells and min(float(r.get("width")) for r in rects) >= 4
        assert min(float(r.get("height")) for r in rects) >= 4


def test_the_page_is_self_contained(family_run):
    single = family_run[2]
    html = (single / REPORT_FILE).read_text()
    assert "<script" not in html.lower() and "@import" not in html and "url(" not in html
    assert not re.findall(r'(?:src|href)\s*=', html)
    assert set(re.findall(r"https?://[^\s\"'<>]+", html)) == {"http://www.w3.org/2000/svg"}  # the SVG namespace


# --- the real browser -------------------------------------------------------------------------------------------

# Chromium's own background traffic (update checks, clock sync), which some builds send whatever the flags say;
# the page's references are checked statically above (no src, href or url() at all)
BROWSER_OWN = re.compile(rb"^(CONNECT|GET|POST) (https?://)?[a-z0-9.-]*\.(googleapis\.com|google\.com|gvt1\.com)[:/ ]")


def png_size_and_corner(path) -> tuple[int, int, tuple[int, int, int]]:
    """Width, height and the top-left pixel's RGB of a PNG (8-bit RGB or RGBA, as Chromium writes), without PIL."""
    data = path.read_bytes()
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    chunks, pos = b"", 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            chunks += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    row = zlib.decompressobj().decompress(chunks)[:1 + 4 * width]  # filter byte, then the first row
    assert depth == 8 and colour in (2, 6)
    pixel = row[1:4]  # filter 0 or 1 (sub) leaves the first pixel as is
    return width, height, tuple(pixel)


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_headless_chromium_renders_it_offline_without_errors(single, tmp_path, scheme):
    browser = chromium()
    trap = RequestTrap()
    shot = tmp_path / f"{scheme}.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
             f"--proxy-server=http://127.0.0.1:{trap.port}", "--proxy-bypass-list=<-loopback>",
             "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'profile'}",
             # the browser's own traffic (clock sync, component and safe-browsing updates) is not the page's
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-domain-reliability", "--disable-client-side-phishing-detection", "--no-pings",
             "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,MediaRouter,Translate",
             f"--screenshot={shot}", "--window-size=1100,1400"]
    if scheme == "dark":
        flags.append("--blink-settings=preferredColorScheme=0")  # Blink's PreferredColorScheme::kDark
    run = subprocess.run([browser, *flags, (single / REPORT_FILE).as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert shot.exists(), run.stderr[-3000:]
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line
               or "Failed to load resource" in line]
    assert not console, console
    page_requests = [r for r in trap.seen if not BROWSER_OWN.search(r.split(b"\r\n", 1)[0])]
    assert page_requests == [], page_requests
    width, height, corner = png_size_and_corner(shot)
    assert (width, height) == (1100, 1400)
    light = corner == (255, 255, 255)
    assert light == (scheme == "light"), corner  # the page follows the colour scheme


def test_advice_warns_about_what_is_wrong_and_claims_only_what_was_checked():
    from dist_quant.htmlreport import advice
    from dist_quant.htmlreport.inputs import clean_coverage

    nan = float("nan")
    broken = {"rows": [{"name": "layer 0", "cosine": nan, "rel_error": nan}], "kl_divergence": nan,
              "top1_agreement": 0.95}
    (kind, text), = advice(None, None, broken)
    assert kind == "warn" and "not finite in layer 0, kl_divergence" in text and "do not serve it" in text
    (kind, text), (_, hint) = advice(None, None, None)
    assert kind == "ok" and "no check could run" in text and "dist-quant eval --report" in hint
    assert "ascendv1 checkpoints only" in advice(None, None, None, evaluable=False)[1][1]
    coverage = clean_coverage({"experts": 4, "experts_without_tokens": 0,
                               "layers": {"0": {"tokens_per_expert": [1, 2, 3, 4], "experts_without_tokens": []}}})
    (kind, text), _ = advice(coverage, None, None)
    assert kind == "ok" and "every expert saw calibration tokens" in text and "actors" not in text
    timeline = {"units": [{"actor": 0, "start": 0, "seconds": 10.0}, {"actor": 1, "start": 0, "seconds": 2.0}]}
    assert "actor 0 was the straggler" in advice(None, timeline, None)[0][1]
    worst = {"rows": [{"name": f"layer {i}", "cosine": 0.99, "rel_error": e} for i, e in enumerate((0.02, 0.02,
                                                                                                   0.3))],
             "kl_divergence": 0.1, "top1_agreement": 0.8}
    texts = [t for _, t in advice(None, None, worst)]
    assert any("layer 2 loses the most" in t for t in texts) and any("top-1 agreement" in t for t in texts)


def test_charts_keep_zeros_and_nans_inside_and_valid(single):
    from dist_quant.htmlreport import build_report

    evaluation = {"rows": [{"name": "vision (merger)", "cosine": 1.0, "rel_error": 0.0},
                           {"name": "layer 0", "cosine": float("nan"), "rel_error": 0.03},
                           {"name": "layer 1", "cosine": 0.99, "rel_error": float("inf")}],
                  "kl_divergence": 0.01, "top1_agreement": 0.97, "tokens": 10, "samples": 1}
    html = build_report(single, evaluation)
    for drawing in drawings(html):
        height = float(drawing.get("height"))
        for circle in drawing.iter(f"{SVG_NS}circle"):
            assert 0 <= float(circle.get("cy")) <= height
        for line in drawing.iter(f"{SVG_NS}polyline"):
            assert "nan" not in line.get("points") and "inf" not in line.get("points")
    assert "not finite in layer 0, layer 1" in html
    empty = build_report(single, {"rows": [], "kl_divergence": 0.02, "top1_agreement": 0.5})
    assert "KL(float ‖ quantized) = 0.02" in empty and "top-1 agreement with the float model is 50.0%" in empty


def test_a_run_whose_units_were_all_kept_says_so(single, tmp_path):
    copy = tmp_path / "q"
    shutil.copytree(single, copy)
    timeline = json.loads((copy / "quant_timeline.json").read_text())
    timeline["units"] = [{k: u[k] for k in ("id", "name", "kind", "layer")} | {"kept": True} for u in timeline["units"]]
    (copy / "quant_timeline.json").write_text(json.dumps(timeline))
    assert main(["report", str(copy)]) == 0
    html = (copy / REPORT_FILE).read_text()
    assert "every unit was kept from an earlier run" in html and not marks(html, "data-unit")


def test_the_legend_has_no_repeated_stops_and_bad_eval_files_are_refused(single, tmp_path):
    legend = ET.fromstring(svg.coverage_heatmap({0: [0, 1, 3], 1: [2, 0, 1]}))
    labels = [t.text for t in legend.iter(f"{SVG_NS}text") if t.text and "token" in t.text]
    assert labels == ["1 token", "2 tokens", "3 tokens"]
    lanes = ET.fromstring(svg.timeline([{"id": "x", "name": "x", "kind": "layer", "actor": 0, "start": 0.0,
                                         "seconds": 1.0}], workers=3))
    assert [t.text for t in lanes.iter(f"{SVG_NS}text") if t.text.startswith("actor")] == ["actor 0", "actor 1",
                                                                                           "actor 2"]
    bad = tmp_path / "eval.json"
    bad.write_text(json.dumps({"rows": [{"name": "layer 0"}]}))
    assert main(["report", str(single), "--eval", str(bad), "--output", str(tmp_path / "p.html")]) == 2
