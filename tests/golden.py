"""Golden digests: SHA-256 of every tensor and file of a few small checkpoints, recorded before a refactor and asserted
after it (tests/test_golden.py), so that "the checkpoint did not change" is checked, not assumed.

Run as a script it prints the digests of every case as JSON (``python tests/golden.py > tests/data/golden.json``
re-records them: only when a change of the checkpoint is intended, and said so in the commit). It runs each case in
this process with the CPU code paths pinned (see PINNED_ENV), so that the digests do not depend on which x86 CPU
the suite runs on: MKL's and oneDNN's kernels and torch's own vectorised loops otherwise pick their instruction
set, and with it the order of float sums, per machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "default",  # torch's own kernels: the scalar (non-AVX) build of each loop
    "MKL_CBWR": "COMPATIBLE",  # MKL: the same code path on every x86 CPU (Intel or AMD)
    "ONEDNN_MAX_CPU_ISA": "SSE41",  # oneDNN (the vision tower's Conv3d)
    "OMP_NUM_THREADS": "1",
}
DATA = Path(__file__).parent / "data"
# (name, make_tiny_model arguments, recipe: None for the bundled one, else a file of tests/data)
CASES = [
    ("bundled_bf16", dict(num_layers=3, num_experts=6, top_k=2, mlp_only_layers=(1,), deepstack=(0, 1),
                          dtype="bfloat16", outliers=20.0), None),
    ("plain_fp16", dict(num_layers=2, num_experts=4, top_k=2, dtype="float16"), "plain_w8a8.yaml"),
    ("msmodelslim_fp32", dict(num_layers=2, num_experts=4, top_k=2, layout="transposed", shard_size="300KB"),
     "msmodelslim_style.yaml"),
]
SKIPPED_FILES = ("quant_run.log", "quant_run.json", "quant_timeline.json", "report.html")  # timings, the run's paths
# The digests are recorded with the transformers of constraints.txt. Other versions must give the same tensors and
# the same files, except those the running transformers writes into the tiny source model (synthetic.py's
# save_pretrained of the config, generation config, tokenizer and image processor), which the checkpoint copies or
# rewrites: transformers 5.x writes rope_parameters, num_local_experts and its own version string into config.json,
# other tokenizer and processor fields, and no special_tokens_map.json (docs/reproducibility.md). The list of the
# checkpoint's files (quant_model_files.json) names them.
RECORDED_TRANSFORMERS = "4.57.1"
TRANSFORMERS_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "special_tokens_map.json",
                      "tokenizer.json", "tokenizer_config.json", "quant_model_files.json")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checkpoint_digests(save: Path) -> dict:
    """{"files": {name: sha256}, "tensors": {key: sha256 of dtype, shape and bytes}} of a published checkpoint."""
    from safetensors import safe_open

    files, tensors = {}, {}
    for path in sorted(p for p in save.rglob("*") if p.is_file()):
        name = str(path.relative_to(save))
        if name in SKIPPED_FILES or name.startswith("."):
            continue
        files[name] = _sha(path.read_bytes())
        if name.startswith("quant_model_weights") and name.endswith(".safetensors"):
            with safe_open(path, "pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key).contiguous()
                    raw = t.view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b""
                    tensors[key] = _sha(f"{t.dtype}{tuple(t.shape)}".encode() + raw)
    return {"files": files, "tensors": tensors}


def run_case(work: Path, name: str, model_args: dict, recipe_file) -> dict:
    from dist_quant.recipe import load_recipe
    from dist_quant.runtime.local import quantize_single_card
    from dist_quant.synthetic import make_calibration_set, make_tiny_model

    model = make_tiny_model(work / name / "model", **model_args)
    calib = make_calibration_set(work / name / "images", num_images=2)
    recipe = load_recipe(DATA / recipe_file if recipe_file else None)
    save = work / name / "q"
    quantize_single_card(str(model), str(save), recipe, dataset=str(calib), progress=False, expert_group_size=2)
    return checkpoint_digests(save)


def all_digests() -> dict:
    missing = {k: v for k, v in PINNED_ENV.items() if os.environ.get(k) != v}
    if missing:
        raise SystemExit(f"run with the pinned environment {PINNED_ENV} (missing {missing})")
    with tempfile.TemporaryDirectory() as work:
        return {name: run_case(Path(work), name, args, recipe) for name, args, recipe in CASES}


if __name__ == "__main__":
    sys.stdout.write(json.dumps(all_digests(), indent=1, sort_keys=True) + "\n")
