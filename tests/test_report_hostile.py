"""report.html from files that someone else wrote (a checkpoint shared on a hub or a file server): markup planted in
every field of every file the page reads never becomes an element or a request, in a real browser too; the page's
Content-Security-Policy stops a script or a fetch even where escaping were to fail; malformed files are named on the
page instead of a traceback; `report` refuses folders that are not published checkpoints, another checkpoint's eval
and outputs it cannot write; the advice follows the loader check."""

import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from dist_quant.checkpoint.fingerprint import checkpoint_fingerprint
from dist_quant.cli import main
from dist_quant.htmlreport import REPORT_FILE, build_report, svg
from helpers import SVG_NS, RequestTrap, chromium, deadline, report_quant

# every element and attribute the page itself uses: anything else in it came from a file
ELEMENTS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "table", "tbody", "tr", "th", "td", "ul",
            "li", "div", "svg", "g", "rect", "path", "text", "line", "polyline", "circle"}
ATTRIBUTES = {"lang", "charset", "http-equiv", "content", "name", "class", "xmlns", "role", "aria-label", "width",
              "height", "viewbox", "x", "y", "x1", "y1", "x2", "y2", "d", "fill", "stroke", "stroke-width", "points",
              "r", "cx", "cy", "font-size", "text-anchor"}


NAME_MARK = "\"'><img src=x onerror=fetch(1)><b>name"  # for file and folder names (no slash, short)


def payload(port: int, where: str) -> str:
    url = f"http://127.0.0.1:{port}/{where}"
    return (f"<b>{where}</b>\"'><img src=\"{url}/img\" onerror=\"fetch('{url}/js')\"><script>fetch('{url}/script')"
            f"</script><svg onload=\"fetch('{url}/svg')\"></svg><style>@import url({url}/css);</style>")


class Elements(HTMLParser):
    """Every element and attribute of a page, as an HTML parser reads it."""

    def __init__(self, html: str):
        super().__init__()
        self.tags, self.attributes = set(), set()
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attributes |= {name for name, _ in attrs}


def foreign(html: str) -> tuple[set, set]:
    parsed = Elements(html)
    return parsed.tags - ELEMENTS, {a for a in parsed.attributes if a not in ATTRIBUTES and not a.startswith("data-")}


@pytest.fixture(scope="module")
def single(report_model, report_calib, tmp_path_factory):
    """The report tests' run (conftest.py's report_model and report_calib), this module's own copy."""
    return report_quant(report_model, report_calib, tmp_path_factory.mktemp("hostile") / "q")


def plant(folder, port: int) -> dict:
    """Markup in every string field, key and name of every file the page reads; returns the eval report planted
    likewise (bound to the planted checkpoint)."""
    def mark(where):
        return payload(port, where)

    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["hidden_act_note"] = mark("config")
    for key in ("num_hidden_layers", "num_experts", "num_experts_per_tok", "hidden_size"):
        config.setdefault("text_config", {})[f"{key}_shown"] = mark(key)
    config["architectures"] = [mark("architectures")]
    (folder / "config.json").write_text(json.dumps(config))
    run = json.loads((folder / "quant_run.json").read_text())
    run["fingerprint"].update({k: mark(k) for k in ("device", "dist_quant", "torch", "compute_threads",
                                                       "expert_group_size")})
    (folder / "quant_run.json").write_text(json.dumps(run))
    coverage = json.loads((folder / "calibration_coverage.json").read_text())
    coverage["layers"] = {**coverage["layers"], mark("layer-key"): {"tokens_per_expert": [mark("count")]}}
    (folder / "calibration_coverage.json").write_text(json.dumps(coverage))
    timeline = json.loads((folder / "quant_timeline.json").read_text())
    for i, unit in enumerate(timeline["units"]):
        unit.update(id=mark(f"id{i}"), name=mark(f"name{i}"), kind=mark(f"kind{i}"))
        unit.setdefault("phases", {})[mark(f"phase{i}")] = 0.5
        unit["host"] = mark("host")
    (folder / "quant_timeline.json").write_text(json.dumps(timeline))
    description = json.loads((folder / "quant_model_description.json").read_text())
    description[next(k for k in description if k.endswith("norm.weight"))] = mark("type")
    (folder / "quant_model_description.json").write_text(json.dumps(description))
    (folder / "qwen3_vl_moe_w8a8.yaml").rename(folder / f"{NAME_MARK}.yaml")
    return {"rows": [{"name": mark(f"row{i}"), "cosine": 0.99, "rel_error": 0.01 * (i + 1)} for i in range(3)],
            "kl_divergence": 0.01, "top1_agreement": 0.97, "tokens": 10, "samples": 1, "quant_path": mark("path"),
            "checkpoint_fingerprint": checkpoint_fingerprint(folder)}


@pytest.fixture(scope="module")
def planted(single, tmp_path_factory):
    trap = RequestTrap()
    folder = tmp_path_factory.mktemp("planted") / NAME_MARK
    shutil.copytree(single, folder)
    evaluation = plant(folder, trap.port)
    (folder.parent / "eval.json").write_text(json.dumps(evaluation))
    assert main(["report", str(folder), "--eval", str(folder.parent / "eval.json")]) == 0
    return folder, trap


def test_planted_markup_stays_text(planted):
    folder, _ = planted
    html = (folder / REPORT_FILE).read_text()
    assert foreign(html) == (set(), set())
    assert "<b>" not in html and "&lt;b&gt;row0&lt;/b&gt;" in html  # drawn as text where the field is text
    for drawing in re.findall(r"<svg .*?</svg>", html, flags=re.S):
        ET.fromstring(drawing)  # every drawing is still well-formed XML


def test_malformed_coverage_and_timeline_are_named_not_drawn(planted):
    html = (planted[0] / REPORT_FILE).read_text()
    assert "calibration_coverage.json is malformed" in html and "quant_timeline.json is malformed" not in html


def browser_flags(tmp_path, trap) -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path / 'p'}",
            f"--proxy-server=http://127.0.0.1:{trap.port}", "--proxy-bypass-list=<-loopback>",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,MediaRouter,Translate",
            "--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000", "--dump-dom"]


def page_requests(trap) -> list[bytes]:
    return [r for r in trap.seen if b"127.0.0.1" in r.split(b"\r\n", 1)[0]]


def test_headless_chromium_builds_no_planted_element_and_sends_no_request(planted, tmp_path):
    browser = chromium()
    folder, trap = planted
    run = subprocess.run([browser, *browser_flags(tmp_path, trap), (folder / REPORT_FILE).as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert "<body" in run.stdout, run.stderr[-2000:]
    assert foreign(run.stdout) == (set(), set())
    assert page_requests(trap) == []


def test_the_content_security_policy_stops_markup_that_escaping_missed(single, tmp_path):
    """The second wall: markup put into the page past the escaping (by hand here) runs no script and fetches
    nothing."""
    browser = chromium()
    trap = RequestTrap()
    page = tmp_path / "page.html"
    html = (single / REPORT_FILE).read_text()
    injected = payload(trap.port, "injected") + "<script>document.body.setAttribute('data-ran', 'yes')</script>"
    page.write_text(html.replace("<body>", "<body>" + injected, 1))
    run = subprocess.run([browser, *browser_flags(tmp_path, trap), page.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert "<body" in run.stdout, run.stderr[-2000:]
    assert not re.search(r"<body[^>]*data-ran", run.stdout)  # the script did not run
    assert page_requests(trap) == []  # neither the image, the script, the SVG nor the style fetched
    assert "Content Security Policy" in run.stderr  # and Chromium says why


MALFORMED = {
    "quant_run.json": [[1, 2], {"fingerprint": [1]}, "text"],
    "quant_timeline.json": [{"units": [{"actor": 0, "seconds": 1.0, "name": "x", "id": "x", "kind": "layer"}]},
                            {"units": [{"actor": "0", "start": 0, "seconds": 1}]},
                            {"units": [{"actor": 0, "start": float("nan"), "seconds": 1}]},
                            {"units": [{"actor": 0, "start": 1e308, "seconds": 1e308, "phases": {"x": "1"}}]},
                            {"units": [{"actor": 0, "start": 1.7e308, "seconds": 1.7e308}]},  # start + seconds: inf
                            {"workers": 10 ** 9, "units": []}, {"workers": 65536, "units": []},
                            {"units": [{"actor": i, "start": 0, "seconds": 1} for i in range(4097)]},  # lanes
                            {"units": [{"kept": True}] * 50_001}, {"units": {"a": 1}}, [], None],
    "calibration_coverage.json": [{"layers": {"x": {"tokens_per_expert": [1]}}},
                                  {"layers": {"0": {"tokens_per_expert": [-1]}}},
                                  {"layers": {"0": {"tokens_per_expert": [True]}}},
                                  {"layers": {"0": {"tokens_per_expert": [1.5]}}},
                                  {"layers": {"0": {"tokens_per_expert": None}}},
                                  {"layers": {str(i): {"tokens_per_expert": [1] * 20000} for i in range(60)}},
                                  {"layers": {str(i): {"tokens_per_expert": [1] * 2048} for i in range(65)}},
                                  {"layers": [], "experts": "many"}],
    "quant_model_weights.safetensors.index.json": [{"metadata": [], "weight_map": {}},
                                                   {"metadata": {"total_size": "big"}, "weight_map": {}}],
    "config.json": [{"text_config": "x", "model_type": {"a": [1]}}],
}


@pytest.mark.parametrize("name,content", [(n, c) for n, cs in MALFORMED.items() for c in cs])
def test_a_malformed_run_file_is_named_on_the_page_not_a_traceback(single, tmp_path, name, content):
    folder = tmp_path / "q"
    shutil.copytree(single, folder)
    (folder / name).write_text(json.dumps(content))
    assert main(["report", str(folder)]) == 0
    html = (folder / REPORT_FILE).read_text()
    assert f"{name} is malformed" in html or name == "config.json"
    assert foreign(html) == (set(), set())


def test_deep_nesting_and_lone_surrogates_in_run_files(single, tmp_path):
    folder = tmp_path / "q"
    shutil.copytree(single, folder)
    (folder / "quant_timeline.json").write_text("[" * 200_000 + "]" * 200_000)
    run = json.loads((folder / "quant_run.json").read_text())
    run["fingerprint"]["device"] = "\ud800cpu"
    (folder / "quant_run.json").write_text(json.dumps(run))  # json writes the lone surrogate as \ud800
    assert main(["report", str(folder)]) == 0
    html = (folder / REPORT_FILE).read_text(encoding="utf-8")
    assert "quant_timeline.json is nested too deeply" in html and "?cpu" in html


def test_report_refuses_what_is_not_a_published_checkpoint(report_model, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (report_model, empty):
        assert main(["report", str(folder)]) == 2
        assert not (folder / REPORT_FILE).exists()
        assert "holds no published quantized checkpoint" in capsys.readouterr().err


def test_report_refuses_an_output_it_cannot_write(single, tmp_path, capsys):
    assert main(["report", str(single), "--output", str(tmp_path)]) == 2
    assert "it is a folder" in capsys.readouterr().err
    assert main(["report", str(single), "--output", str(tmp_path / "missing" / "r.html")]) == 2
    assert "its folder does not exist" in capsys.readouterr().err


def test_an_eval_of_another_checkpoint_is_refused(single, report_model, report_calib, tmp_path, capsys):
    other = report_quant(report_model, report_calib, tmp_path / "other", "--expert_group_size", "4")
    evaluation = {"rows": [{"name": "layer 0", "cosine": 0.5, "rel_error": 0.9}], "kl_divergence": 3.0,
                  "top1_agreement": 0.1, "tokens": 5, "samples": 1, "quant_path": str(other)}
    unbound = tmp_path / "unbound.json"
    unbound.write_text(json.dumps(evaluation))
    assert main(["report", str(single), "--eval", str(unbound), "--output", str(tmp_path / "a.html")]) == 2
    assert "does not say which checkpoint it measured" in capsys.readouterr().err
    bound = tmp_path / "other.json"
    bound.write_text(json.dumps({**evaluation, "checkpoint_fingerprint": checkpoint_fingerprint(other)}))
    assert main(["report", str(single), "--eval", str(bound), "--output", str(tmp_path / "b.html")]) == 2
    assert "measured another checkpoint" in capsys.readouterr().err
    assert main(["report", str(other), "--eval", str(bound), "--output", str(tmp_path / "c.html")]) == 0
    assert not (tmp_path / "a.html").exists() and not (tmp_path / "b.html").exists()


def test_the_advice_follows_the_loader_check(single, tmp_path):
    folder = tmp_path / "q"
    shutil.copytree(single, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"  # R4: vLLM Ascend would key the fused modules wrongly
    (folder / "config.json").write_text(json.dumps(config))
    html = build_report(folder)
    assert "breaks its serving engine&#x27;s loader rules (R4" in html and "nothing looks wrong" not in html
    from dist_quant.check import check_checkpoint
    from dist_quant.htmlreport import advice

    (kind, text), _ = advice(None, None, None, check_checkpoint(single))
    assert kind == "ok" and "passes the loader rules of vLLM Ascend" in text


def test_each_bar_sits_in_its_own_actors_lane():
    units = [{"id": f"u{i}", "name": f"u{i}", "kind": "layer", "actor": actor, "start": float(i), "seconds": 1.0}
             for i, actor in enumerate((0, 2, 1, 2, 0))]
    drawing = ET.fromstring(svg.timeline(units, workers=3))
    lanes = {}  # actor -> the lane's band, from its label and its background rectangle
    texts = [t for t in drawing.iter(f"{SVG_NS}text") if (t.text or "").startswith("actor ")]
    rects = [r for r in drawing.iter(f"{SVG_NS}rect") if r.get("class") == "lane"]
    for text, rect in zip(texts, rects):
        top = float(rect.get("y"))
        assert top <= float(text.get("y")) <= top + float(rect.get("height"))
        lanes[int(text.text.split()[1])] = (top, top + float(rect.get("height")))
    assert sorted(lanes) == [0, 1, 2]
    for mark in drawing.iter(f"{SVG_NS}g"):
        if "data-unit" in mark.attrib:
            bar = mark.find(f"{SVG_NS}rect")
            top, bottom = lanes[int(mark.get("data-actor"))]
            assert top <= float(bar.get("y")) and float(bar.get("y")) + float(bar.get("height")) <= bottom


def test_the_page_and_the_command_line_count_the_same_tensors(report_model, report_calib, tmp_path, capsys):
    save = report_quant(report_model, report_calib, tmp_path / "q")
    printed = re.search(r"(\d+) tensors \(([^)]*)\)", capsys.readouterr().out)
    html = (save / REPORT_FILE).read_text()
    shown = re.search(r"<td>tensors by type</td><td>([^<]*) \(FLOAT counts", html).group(1)
    assert shown == printed.group(2)
    assert f"{printed.group(1)} tensors</td>" in html



def test_the_page_is_written_through_no_planted_symlink_or_fifo(single, tmp_path):
    """A shared folder may hold a symlink or a FIFO where the page (or its temporary file) goes: the page is written
    to a new file of its own and renamed over report.html, so nothing outside is written and nothing blocks."""
    folder = tmp_path / "q"
    shutil.copytree(single, folder)
    victim = tmp_path / "victim"
    victim.write_text("mine")
    (folder / ".report.html.partial").symlink_to(victim)
    (folder / REPORT_FILE).unlink()
    (folder / REPORT_FILE).symlink_to(victim)
    os.mkfifo(folder / ".report.html.fifo.partial")
    with deadline(60):
        assert main(["report", str(folder)]) == 0
    assert victim.read_text() == "mine"
    assert not (folder / REPORT_FILE).is_symlink() and "<!DOCTYPE html>" in (folder / REPORT_FILE).read_text()
    assert not [p for p in folder.iterdir()
                if p.name.startswith(".report.html.") and p.is_file() and not p.is_symlink()]


@pytest.mark.parametrize("config", ["fifo", "deep"])
def test_a_folder_whose_config_is_a_fifo_or_nested_deeply_is_no_checkpoint(tmp_path, capsys, config):
    folder = tmp_path / "q"
    folder.mkdir()
    if config == "fifo":
        os.mkfifo(folder / "config.json")
    else:
        (folder / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    with deadline(60):
        assert main(["report", str(folder)]) == 2
    assert "holds no published quantized checkpoint" in capsys.readouterr().err


def test_an_eval_of_huge_errors_is_drawn_and_impossible_figures_are_refused(single, tmp_path, capsys):
    rows = [{"name": f"layer {i}", "cosine": -0.5, "rel_error": 1e308} for i in range(3)]
    html = build_report(single, {"rows": rows, "kl_divergence": 1e308, "top1_agreement": 0.0, "tokens": 1,
                                 "samples": 1})
    for drawing in re.findall(r"<svg .*?</svg>", html, flags=re.S):
        ET.fromstring(drawing)
    assert "1e308" in html
    fingerprint = checkpoint_fingerprint(single)
    for field, value, message in (("kl_divergence", -5, "its kl_divergence is -5, outside [0, inf]"),
                                  ("top1_agreement", 1e308, "its top1_agreement is 1e+308, outside [0, 1]"),
                                  ("rows", [{"name": "x", "cosine": 2.0, "rel_error": 0.1}], "row 0's cosine is 2"),
                                  ("rows", [{"name": "x", "cosine": 1.0, "rel_error": -1}], "row 0's rel_error is -1")):
        bad = tmp_path / f"{field}.json"
        bad.write_text(json.dumps({"rows": [], "kl_divergence": 0.1, "top1_agreement": 0.9, "tokens": 1, "samples": 1,
                                   "checkpoint_fingerprint": fingerprint, field: value}))
        assert main(["report", str(single), "--eval", str(bad), "--output", str(tmp_path / "p.html")]) == 2
        assert message in capsys.readouterr().err
