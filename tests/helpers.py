"""Shared test helpers (the fixtures are in conftest.py): an in-memory tensor sink, an independent HF reference
forward, checkpoint reading, and the helpers that several test modules use, a section each."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Qwen3VLMoeForConditionalGeneration

from dist_quant.calib.dataset import CalibSample
from dist_quant.calib.inputs import build_model_inputs
from dist_quant.checkpoint.writer import DESCRIPTION_FILE, STAGING_DIR
from dist_quant.cli import main
from dist_quant.recipe import DEFAULT_RECIPE, load_recipe
from dist_quant.runtime.local import quantize_single_card
from dist_quant.synthetic import make_calibration_set, make_tiny_model, make_tiny_text_model


class MemorySink:
    """Collects what a worker writes, for tests that need no files."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.types: dict[str, str] = {}

    def add(self, key, tensor, quant_type):
        assert key not in self.tensors, f"{key} written twice"
        self.tensors[key] = tensor
        self.types[key] = quant_type


def load_hf_model(model_dir) -> Qwen3VLMoeForConditionalGeneration:
    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def hf_kwargs(sample, model) -> dict:
    """Keyword arguments of the HF forward for one of our samples (5.x also wants the image-token mask)."""
    kwargs = {"input_ids": sample.input_ids, "attention_mask": sample.attention_mask}
    if sample.pixel_values is not None:
        kwargs.update(pixel_values=sample.pixel_values, image_grid_thw=sample.image_grid_thw)
        if "mm_token_type_ids" in inspect.signature(Qwen3VLMoeForConditionalGeneration.forward).parameters:
            # transformers 5.x
            kwargs["mm_token_type_ids"] = (sample.input_ids == model.config.image_token_id).to(torch.int32)
    return kwargs


def read_checkpoint(save: Path) -> tuple[dict, dict, dict]:
    """(tensors of every part, description, index) of a published checkpoint."""
    index = json.loads((save / "quant_model_weights.safetensors.index.json").read_text())
    tensors = {}
    for part in sorted(set(index["weight_map"].values())):
        with safe_open(save / part, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors, json.loads((save / "quant_model_description.json").read_text()), index


def assert_same_checkpoint(save: Path, reference: tuple[dict, dict, dict]) -> None:
    """Tensor by tensor (torch.equal), description for description, index for index."""
    tensors, description, index = read_checkpoint(save)
    assert description == reference[1] and index == reference[2]
    assert tensors.keys() == reference[0].keys()
    different = [k for k in tensors if not torch.equal(tensors[k], reference[0][k])]
    assert not different, different[:5]


@contextlib.contextmanager
def deadline(seconds: int):
    """A hang fails the test instead of the suite: SIGALRM interrupts even an open() blocked on a FIFO."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, options: str):
    """A real small or read-only file system at ``folder`` (tmpfs, mounted with ``options``), or None where this
    machine cannot mount one (mount needs root with CAP_SYS_ADMIN)."""
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                                       capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


# --- paths and recipes shared by several test modules ----------------------------------------------------------------

FAMILY_TYPES = ("qwen3_vl_moe", "qwen3_moe")  # the model families, as config.json's model_type names them
LAYERS = {"qwen3_vl_moe": "model.language_model.layers", "qwen3_moe": "model.layers"}  # decoder layers' key prefix


def text_config(model: Path) -> dict:
    """The decoder's fields of a model folder's config.json (Qwen3-VL-MoE nests them in text_config)."""
    raw = json.loads((Path(model) / "config.json").read_text())
    return raw.get("text_config", raw)


def moe_layers(model: Path) -> list[int]:
    """The layers with routed experts, from config.json's mlp_only_layers (the tiny models have no sparse step)."""
    tc = text_config(model)
    return [i for i in range(tc["num_hidden_layers"]) if i not in tc.get("mlp_only_layers", [])]
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
PLAIN_RECIPE = TESTS / "data" / "plain_w8a8.yaml"  # family-neutral: its vision globs select nothing in a text model


# --- the CLI refusing bad input (tests/test_bad_inputs.py and the hostile-input files) -------------------------------

WEIGHTS = "model.safetensors"
Q_PROJ = "model.language_model.layers.0.self_attn.q_proj.weight"


def assert_nothing_finished(save: Path) -> None:
    """No description, no weights at the top; the staging folder is gone unless kept for a --resume (its journal)."""
    if save.exists():
        assert not (save / DESCRIPTION_FILE).exists()
        assert not list(save.glob("*.safetensors"))
        staging = save / STAGING_DIR
        assert not staging.exists() or (staging / "run" / "journal.jsonl").is_file(), sorted(staging.rglob("*"))


def quant_args(model: Path, save: Path, dataset: Path, *extra: str) -> list[str]:
    """The plain recipe is the quickest; a later --config_path in ``extra`` replaces it."""
    return ["quant", "--model_path", str(model), "--save_path", str(save), "--device", "cpu", "--dataset",
            str(dataset), "--quiet", "--config_path", str(PLAIN_RECIPE), *extra]


def refused(capsys, model: Path, save: Path, dataset: Path, *extra: str) -> str:
    """Run the CLI, expect it to refuse with exit code 2 and leave nothing finished-looking; returns the message."""
    rc = main(quant_args(model, save, dataset, *extra))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("dist-quant: error: "), err
    assert_nothing_finished(save)
    return err


def rewrite_tensor(model: Path, key: str, change) -> Path:
    path = model / WEIGHTS
    tensors = load_file(path)
    tensors[key] = change(tensors[key])
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def calib_copy(calib_index: Path, tmp_path: Path) -> Path:
    """A private copy of the session's calibration set; returns its index.jsonl."""
    return Path(shutil.copytree(calib_index.parent, tmp_path / "calib")) / calib_index.name


# --- checkpoints for `dist-quant check` and their mutants (tests/test_check.py, test_check_hostile.py, ...) ----------

DESCRIPTION = "quant_model_description.json"
LAYER0 = "model.language_model.layers.0"  # Qwen3-VL-MoE's first layer (the fixture good is its checkpoint)
CHECK_TEXTS = ("The quick brown fox jumps over the lazy dog near the river bank.",
               "def add(a, b):\n    return a + b  # adds two numbers", "Seven times eight is fifty-six.")


def text_calibration_set(folder: Path, texts=CHECK_TEXTS) -> Path:
    """A text calibration set (one {"text": ...} line a sample) in a new ``folder``; returns its calib.jsonl."""
    folder.mkdir(parents=True)
    path = folder / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


@dataclass(frozen=True)
class Family:
    """What the check tests write by hand about a family's checkpoints: how to make a tiny one, its recipes, and the
    key names and config fields its mutations touch."""

    model_type: str
    make_model: Callable  # (folder, **model_args) -> the model folder
    make_calibration: Callable  # folder -> a calibration set for it
    layer0: str  # the first decoder layer's module (a MoE layer)
    float_linear: str  # a FLOAT linear vLLM builds and looks up (R7's mutation drops its entry)
    foreign_key: str  # a key under none of the module prefixes its vLLM model loads
    other_model_type: str  # a model_type in neither vLLM Ascend's packed table nor dist-quant's families
    hijack: Callable  # config.json -> it, with a quantization_config where vLLM reads one

    def recipe(self, quant_type: str) -> Path:
        return DEFAULT_RECIPE.parent / f"{self.model_type}_{quant_type}.yaml"


_FP8 = {"quant_method": "fp8"}
FAMILIES = {f.model_type: f for f in (
    Family("qwen3_vl_moe", make_tiny_model, lambda folder: make_calibration_set(folder, num_images=2), LAYER0,
           "model.visual.merger.linear_fc1", "model.layers.0.extra.weight", "qwen3_vl",
           lambda c: c["text_config"].update(quantization_config=_FP8)),
    Family("qwen3_moe", make_tiny_text_model, text_calibration_set, "model.layers.0", "model.layers.0.mlp.gate",
           "layers.0.extra.weight", "qwen3", lambda c: c.update(quantization_config=_FP8)),
)}
VARIANTS = {  # name: (source dtype, quant type, model arguments)
    "good": ("bfloat16", "w8a8", {"mlp_only_layers": (2,)}),  # a dense-MLP layer: its gate/up are a fused group too
    "fp32": ("float32", "w8a8", {"num_layers": 2}),
    "w4a8": ("bfloat16", "w4a8", {"num_layers": 2}),
}
_built: dict[tuple[str, str], Path] = {}


def quantized(tmp_path_factory, family: Family, variant: str) -> Path:
    """A checkpoint dist-quant quantized from a tiny model of the family (each made once per session)."""
    if (family.model_type, variant) not in _built:
        dtype, quant_type, model_args = VARIANTS[variant]
        root = tmp_path_factory.mktemp(f"{family.model_type}_{variant}")
        model = family.make_model(root / "model", dtype=dtype, **model_args)
        quantize_single_card(str(model), str(root / "q"), load_recipe(family.recipe(quant_type)),
                             dataset=str(family.make_calibration(root / "calib")), progress=False)
        _built[family.model_type, variant] = root / "q"
    return _built[family.model_type, variant]


def mutate(good, tmp_path, description=None, config=None, tensors=None):
    """A copy of the checkpoint ``good`` (either format) with its description, config.json or tensors changed in
    place by the functions given (tensors: one dict of every part's tensors; each key stays in its part, a new key
    goes to the first part; the index follows)."""
    folder = tmp_path / "mutated"
    shutil.copytree(good, folder)
    for name, change in ((DESCRIPTION, description), ("config.json", config)):
        if change is not None:
            content = json.loads((folder / name).read_text())
            change(content)
            (folder / name).write_text(json.dumps(content))
    if tensors is not None:
        parts = sorted(folder.glob("*.safetensors"))
        held = {part: load_file(str(part)) for part in parts}
        merged = {k: t for part in parts for k, t in held[part].items()}
        home = {k: part for part in parts for k in held[part]}
        tensors(merged)
        for part in parts:
            kept = {k: t for k, t in merged.items() if home.get(k, parts[0]) == part}
            save_file(kept, str(part))
        index_file, = folder.glob("*.safetensors.index.json")
        index = json.loads(index_file.read_text())
        index["weight_map"] = {k: home.get(k, parts[0]).name for k in merged}
        index_file.write_text(json.dumps(index))
    return folder


def rename(old, new):
    def change(d):
        d[new] = d.pop(old)
    return change


def set_types(prefix, quant_type):
    def change(d):
        for key in d:
            if key.startswith(prefix + "."):
                d[key] = quant_type
    return change


def drop(*keys):
    def change(d):
        for key in keys:
            del d[key]
    return change


def add(key, value):
    def change(d):
        d[key] = value
    return change


def changed(key, fn):
    def change(d):
        d[key] = fn(d[key])
    return change


# --- quantizing through the CLI (tests/test_evaluate.py, test_outliers.py) -------------------------------------------

def quantize(model, calib_index, save, recipe=None):
    """`dist-quant quant` on the CPU with the preset of the model (or ``recipe``); returns ``save``."""
    args = ["quant", "--model_path", str(model), "--save_path", str(save), "--device", "cpu",
            "--dataset", str(calib_index), "--quiet"]
    assert main(args + (["--config_path", str(recipe)] if recipe else [])) == 0
    return save


def float_only(recipe_path, tmp_path):
    """The recipe with its linear_quant processors selecting nothing: every tensor stays FLOAT."""
    recipe = yaml.safe_load(Path(recipe_path).read_text())
    for processor in recipe["spec"]["process"]:
        if processor["type"] == "linear_quant":
            processor["include"] = ["nothing"]
    path = tmp_path / f"float_{Path(recipe_path).stem}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# --- report.html (tests/test_report.py, test_report_hostile.py) ------------------------------------------------------

REPORT_GROUP = 2  # expert group size of the report tests' runs
SVG_NS = "{http://www.w3.org/2000/svg}"


def report_quant(model, calib, save, *extra):
    """`dist-quant quant` of the report tests: the model's preset, expert groups of REPORT_GROUP; returns ``save``."""
    assert main(["quant", "--model_path", str(model), "--save_path", str(save), "--device", "cpu", "--dataset",
                 str(calib), "--quiet", "--expert_group_size", str(REPORT_GROUP), *extra]) == 0
    return save


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        if os.environ.get("DIST_QUANT_BROWSER_REQUIRED"):
            pytest.fail("chromium is required (.ci/run installs the Debian package) but is not installed")
        pytest.skip("no chromium here: apt-get install chromium (CI installs it)")
    return found


class RequestTrap:
    """A proxy that answers nothing and records every connection: with it as the browser's proxy, any request
    that leaves the file shows up here."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.port = self.server.getsockname()[1]
        self.seen: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            conn.settimeout(2)
            try:
                self.seen.append(conn.recv(4096))
            except OSError:
                self.seen.append(b"?")
            conn.close()


# --- the launch/ scripts and Ray heads (tests/test_launch.py, test_ray_auth.py) --------------------------------------

LAUNCH = ROOT / "launch"
PATH = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
BASH = shutil.which("bash")
RAY = shutil.which("ray", path=PATH)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def short_temp_dir(prefix: str) -> str:
    # Ray's socket paths (TEMP/session_<date>/sockets/plasma_store) must stay under 108 characters.
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def run_script(script: str, *args, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run launch/SCRIPT with bash in ``env``; stdout and stderr together in .stdout."""
    return subprocess.run([BASH, str(LAUNCH / script), *map(str, args)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


# --- float64 references of the QuaRot and smoothing math (tests/test_quarot_math.py, test_smooth_math.py) -----------

EPS = 1e-6


def rms_norm(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + EPS) * g


def gqa_attention(x, wq, wk, wv, bv, wo, num_heads, num_kv_heads, head_dim):
    """Non-causal softmax attention where q head h reads kv head h // (num_heads / num_kv_heads)."""
    q = (x @ wq.T).reshape(-1, num_heads, head_dim)
    k = (x @ wk.T).reshape(-1, num_kv_heads, head_dim)
    v = (x @ wv.T + bv).reshape(-1, num_kv_heads, head_dim)
    group = num_heads // num_kv_heads
    heads = []
    for h in range(num_heads):
        kv = h // group
        probs = torch.softmax(q[:, h] @ k[:, kv].T / head_dim**0.5, dim=-1)
        heads.append(probs @ v[:, kv])
    return torch.cat(heads, dim=-1) @ wo.T


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def text_turn_inputs(model_dir, text: str):
    """Inputs for one text-only user turn of an image+text model, as the quantizer makes them."""
    return build_model_inputs(model_dir, [CalibSample(image=None, text=text)], images=True)[0]


def ascend_roles(scheme, weight, bias, spec) -> dict[str, torch.Tensor]:
    """One linear as the ascendv1 format stores it, by role: its scheme's quantization, encoded by the format."""
    from dist_quant.checkpoint.formats.ascendv1_encoding import ENCODINGS

    return ENCODINGS[scheme.name].encode(scheme.quantize(weight, bias, spec), spec)


def ascend_served(quant_type: str, roles: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The module vLLM Ascend's method for ``quant_type`` runs on the stored ``roles``."""
    from dist_quant.checkpoint.formats.ascendv1_encoding import ENCODINGS

    return ENCODINGS[quant_type].serve(roles)


def source_weight(model, module):
    """nn.Linear-orientation float weight of a module name, including unfused experts of the HF fused tensors."""
    if ".experts." in module:
        prefix, expert, proj = module.rsplit(".", 2)
        experts = model.get_submodule(prefix)
        inter = model.config.text_config.moe_intermediate_size
        gate_up, down = experts.gate_up_proj[int(expert)], experts.down_proj[int(expert)]
        if gate_up.shape[-1] == 2 * inter:  # transformers 4.57 holds x @ W: (hidden, 2I), (I, hidden)
            gate_up, down = gate_up.T, down.T  # now (2I, hidden), (hidden, I), as 5.x holds them
        return {"gate_proj": gate_up[:inter], "up_proj": gate_up[inter:], "down_proj": down}[proj].detach()
    return model.get_submodule(module).weight.detach()
