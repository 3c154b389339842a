"""``dist-quant``: the command line, with msModelSlim's flag names for ``quant``.

Start-up is kept light: this module imports no torch, transformers, Ray or PIL (tests/test_startup.py), so that
``--help``, ``presets`` and the parsing of every command answer at once; each command imports what it needs inside
its handler.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence

from dist_quant.calib import DEFAULT_MAX_SAMPLE_TOKENS
from dist_quant.checkpoint.formats import SAVE_FORMATS
from dist_quant.errors import DistQuantError, printable
from dist_quant.presets import (
    DEFAULT_QUANT_TYPE,
    MODEL_TYPES,
    QUANT_TYPES,
    default_model_type,
    find_preset,
    format_presets,
    model_type_mismatch,
)
from dist_quant.runtime.cost import Hardware
from dist_quant.runtime.device import DEFAULT_COMPUTE_THREADS, DEVICES
from dist_quant.runtime.plan import DEFAULT_CALIB_TOKENS, DEFAULT_EXPERT_GROUP_SIZE
from dist_quant.runtime.timing import format_times

QUANT_EXAMPLE = """example:
  dist-quant quant --model_path /models/Qwen3-VL-235B-A22B-Instruct --save_path /models/Qwen3-VL-235B-w8a8 \\
      --device npu --model_type Qwen3-VL-235B-A22B --quant_type w8a8 --trust_remote_code True
"""


def _bool(text: str) -> bool:
    """msModelSlim passes booleans as words (``--trust_remote_code True``)."""
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _positive_int(text: str) -> int:
    """Counts and sizes: a whole number of at least 1 (a negative group size once wrote a checkpoint without
    experts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def _quant_parser(sub) -> None:
    p = _command(sub, "quant",
                 "quantize a Qwen3-VL-MoE or Qwen3-MoE checkpoint (ascendv1 or compressed-tensors format)",
                 "Quantize a Qwen3-VL-MoE or Qwen3-MoE checkpoint with a recipe and write a checkpoint that "
                 "vLLM Ascend and MindIE load (ascendv1, the default), or that vLLM loads on GPUs "
                 "(--save_format compressed-tensors).",
                 QUANT_EXAMPLE)
    p.add_argument("--model_path", required=True, help="float Hugging Face model directory")
    p.add_argument("--save_path", required=True, help="output directory (created; must not be inside model_path)")
    p.add_argument("--device", default="npu", choices=DEVICES, help="device to compute on (default npu)")
    _recipe_options(p)
    p.add_argument("--dataset", default=None,
                   help="calibration samples: an index.json[l] (image+text, or text for a text-only model), an "
                        "image folder, or a folder with one json[l]; "
                        "overrides the recipe's dataset")
    p.add_argument("--save_format", default=None, choices=sorted(SAVE_FORMATS),
                   help="the checkpoint format, overriding the recipe's save: type: ascendv1 (msModelSlim's, for "
                        "vLLM Ascend and MindIE) or compressed-tensors (for vLLM on GPUs; vLLM Ascend too when "
                        "every activation is symmetric)")
    p.add_argument("--trust_remote_code", type=_bool, default=False, help="True to allow the model dir's own code")
    p.add_argument("--overwrite", action="store_true", help="replace the content of a non-empty save_path")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run into the same save_path (same model, recipe and calibration set)")
    p.add_argument("--workers", type=_positive_int, default=1,
                   help="Ray actors, one per card (1 without --ray_address: single-card mode, no Ray)")
    p.add_argument("--ray_address", default=None,
                   help="join a running Ray cluster: 'auto' or HOST:PORT (default: start a local runtime)")
    p.add_argument("--expert_group_size", type=_positive_int, default=DEFAULT_EXPERT_GROUP_SIZE,
                   help="experts per unit of work (does not change the checkpoint)")
    _compute_threads_option(p, "intra-op threads of every worker process (default %(default)s); the checkpoint is "
                               "bit-identical for one value whatever ran it, but may differ in the last bit between "
                               "values")
    p.add_argument("--max_sample_tokens", type=_positive_int, default=DEFAULT_MAX_SAMPLE_TOKENS,
                   help="cap on the tokens of one calibration sample (default %(default)s); longer prompts are cut, "
                        "with a warning")
    p.add_argument("--max_samples", type=_positive_int, default=None,
                   help="calibrate on the first N samples of the calibration set only (default: all of them)")
    p.add_argument("--dry_run", action="store_true",
                   help="check the model and the recipe, list which scheme each linear gets, and stop (writes "
                        "nothing)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _recipe_options(p: argparse.ArgumentParser) -> None:
    """The preset flags and --config_path, as quant and plan both take them (``_recipe`` reads them)."""
    p.add_argument("--model_type", default=None, choices=MODEL_TYPES,
                   help="with --quant_type, selects a bundled recipe (see `dist-quant presets`; default: the preset "
                        "of the model folder's config.json, by its model_type and shape)")
    p.add_argument("--quant_type", default=None, choices=QUANT_TYPES,
                   help=f"quantization scheme (default {DEFAULT_QUANT_TYPE})")
    p.add_argument("--config_path", default=None,
                   help="your own recipe YAML (msModelSlim's modelslim_v1 or multimodal_vlm_modelslim_v1 format); "
                        "overrides the preset")


def _compute_threads_option(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--compute_threads", type=_positive_int, default=DEFAULT_COMPUTE_THREADS, help=help)


def _model_config(args) -> Optional[dict]:
    """The model folder's config.json, or None where it cannot be read as a mapping (the command's own reading of
    config.json names what is wrong with it)."""
    from dist_quant.checkpoint.model_folder import JSON_FILE_ERRORS, load_json_file

    try:
        config = load_json_file(Path(args.model_path) / "config.json")
    except JSON_FILE_ERRORS:
        return None
    return config if isinstance(config, dict) else None


def _recipe(args):
    """The recipe --config_path names, else the one the preset flags select; without --model_type, the preset of
    the model's config.json (its family and shape), so a Qwen3-MoE never needs a Qwen3-VL name. A --quant_type
    given beside --config_path must agree with the recipe's schemes (the recipe decides: a disagreement is a
    mistake)."""
    from dist_quant.recipe import load_recipe

    if args.config_path and args.quant_type is None:
        return load_recipe(args.config_path)
    preset = find_preset(args.model_type or default_model_type(_model_config(args)),
                         args.quant_type or DEFAULT_QUANT_TYPE)
    if not args.config_path:
        return load_recipe(preset.recipe)
    recipe = load_recipe(args.config_path)
    wanted, given = (sorted({q.quant_type for q in r.linear_quants}) for r in (load_recipe(preset.recipe), recipe))
    if wanted != given:
        raise DistQuantError(f"--quant_type {args.quant_type} quantizes to {', '.join(wanted)}, but --config_path "
                             f"{args.config_path} quantizes to {', '.join(given)}: the recipe decides, so drop "
                             "--quant_type or pass a recipe of that type")
    return recipe


def _warn_model_type(args) -> None:
    """A --model_type given for a model folder whose config.json is another model's: said, not refused."""
    if args.model_type is None:
        return
    config = _model_config(args)
    problem = model_type_mismatch(args.model_type, config) if config is not None else None
    if problem:
        logging.getLogger("dist_quant").warning("warning: %s", problem)


PLAN_EXAMPLE = """example:
  dist-quant plan --model_path /models/Qwen3-VL-235B-A22B-Instruct --workers 16 --quant_type w4a8
"""


def _command(sub, name: str, summary: str, description: str, example: str) -> argparse.ArgumentParser:
    """A subcommand whose --help shows its description and an example."""
    return sub.add_parser(name, help=summary, description=description, epilog=example,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _plan_parser(sub) -> None:
    p = _command(sub, "plan", "units, actors, memory estimate and time projection, from config.json alone",
                 "Plan a distributed quantization from config.json alone: units of work, their "
                 "assignment to actors, bytes each actor reads, its peak memory estimate and "
                 "whether it fits one card, and a projection of the wall time for the recipe's schemes (the host's "
                 "ssz / GPTQ rounding included), with the same --model_type/--quant_type/--config_path as quant.",
                 PLAN_EXAMPLE)
    p.add_argument("--model_path", required=True, help="model directory (only config.json is read)")
    p.add_argument("--workers", type=_positive_int, default=1, help="number of actors (one per card)")
    _recipe_options(p)
    _compute_threads_option(p, "host threads each actor rounds on, as quant's option (default %(default)s): ssz's "
                               "and GPTQ's rounding runs on the host and divides by them")
    p.add_argument("--expert_group_size", type=_positive_int, default=DEFAULT_EXPERT_GROUP_SIZE,
                   help="experts per unit")
    p.add_argument("--calib_tokens", type=_positive_int, default=DEFAULT_CALIB_TOKENS,
                   help="calibration tokens assumed for the activation memory estimate")
    p.add_argument("--card_memory_gb", type=_positive_float, default=64, help="memory of one card (Atlas 800I A2: 64)")
    hw = Hardware()
    p.add_argument("--cards_per_node", type=_positive_int, default=hw.cards_per_node,
                   help="cards per node (A2: 8, A3: 16)")
    p.add_argument("--storage_read_gbps", type=_positive_float, default=hw.storage_read_gbps,
                   help="GB/s one node reads the source checkpoint at (for the time projection)")
    p.add_argument("--storage_write_gbps", type=_positive_float, default=hw.storage_write_gbps,
                   help="GB/s one node writes the output at (for the time projection)")
    p.add_argument("--matmul_tflops", type=_positive_float, default=hw.matmul_tflops,
                   help="float32 matmul TFLOPS of one card (for the time projection)")


def _cmd_plan(args) -> int:
    from dist_quant.checkpoint.model_folder import read_config
    from dist_quant.models.family import sizes_config_of
    from dist_quant.runtime.assignments import check_recipe_for_model
    from dist_quant.runtime.cost import project
    from dist_quant.runtime.plan import build_plan, format_plan

    config_file = Path(args.model_path) / "config.json"
    raw = read_config(config_file)
    config = sizes_config_of(raw, str(config_file))
    recipe = _recipe(args)
    _warn_model_type(args)
    check_recipe_for_model(recipe, config)
    plan = build_plan(config, raw, args.workers, group_size=args.expert_group_size,
                      part_file_size_gb=recipe.part_file_size_gb, calib_tokens=args.calib_tokens,
                      card_memory_gb=args.card_memory_gb, recipe=recipe)
    tc = config.get_text_config()
    title = (f"{args.model_path}: {tc.num_hidden_layers} layers,"
             f" {tc.num_experts} experts (top-{tc.num_experts_per_tok}),"
             f" hidden {tc.hidden_size}; {args.workers} worker(s), expert groups of {args.expert_group_size};"
             f" recipe {recipe.path.name}")
    print(format_plan(plan, title))
    hw = Hardware(cards_per_node=args.cards_per_node, storage_read_gbps=args.storage_read_gbps,
                  storage_write_gbps=args.storage_write_gbps, matmul_tflops=args.matmul_tflops)
    projection = project(plan, config, raw, args.calib_tokens, hw, compute_threads=args.compute_threads)
    print(projection.describe(args.workers))
    return 0 if all(plan.fits(a) for a in plan.actors) else 1


EVAL_EXAMPLE = """example:
  dist-quant eval --model_path /models/Qwen3-VL-30B-A3B-Instruct --quant_path /models/Qwen3-VL-30B-A3B-w8a8 \\
      --dataset /data/calib/index.jsonl --output report.json
"""


def _eval_parser(sub) -> None:
    p = _command(sub, "eval", "compare a quantized checkpoint with its float model (vLLM Ascend's int8 math)",
                 "Run the quantized checkpoint with the integer math vLLM Ascend executes next to "
                 "the float model, layer by layer, and report per-layer cosine similarity and "
                 "relative error, the KL divergence of the final logits and the top-1 agreement.",
                 EVAL_EXAMPLE)
    p.add_argument("--model_path", required=True, help="the float model directory")
    p.add_argument("--quant_path", required=True, help="the quantized checkpoint directory")
    p.add_argument("--dataset", default=None,
                   help="held-out samples (same forms as for quant), not the ones the checkpoint was "
                        "calibrated on; default: the recipe's calibration set (optimistic figures, with a warning)")
    p.add_argument("--config_path", default=None, help="recipe whose dataset/default_text to use")
    p.add_argument("--max_samples", type=_positive_int, default=None, help="evaluate on the first N samples only")
    p.add_argument("--device", default="cpu", choices=DEVICES,
                   help="device to compute on (default cpu; npu imports torch_npu, as quant does)")
    p.add_argument("--output", default=None,
                   help="also write the report as JSON to this file (with the checkpoint's path and fingerprint)")
    p.add_argument("--report", default=None,
                   help="also draw the checkpoint's report page with this accuracy part, to this HTML file "
                        "(e.g. QUANT_PATH/report.html)")
    p.add_argument("--trust_remote_code", type=_bool, default=False, help="True to allow the model dir's own code")


def _cmd_eval(args) -> int:
    from dist_quant.calib.inputs import build_model_inputs
    from dist_quant.checkpoint.model_folder import read_config
    from dist_quant.evaluate import evaluate, is_calibration_set
    from dist_quant.models.family import family_of
    from dist_quant.presets import DEFAULT_QUANT_TYPE, default_model_type, find_preset
    from dist_quant.recipe import load_recipe
    from dist_quant.runtime.driver import calibration_samples

    config_file = Path(args.model_path) / "config.json"
    raw_config = read_config(config_file)
    # the recipe says which calibration set the checkpoint was fitted on: the model's default preset's by default
    recipe = load_recipe(args.config_path or find_preset(default_model_type(raw_config), DEFAULT_QUANT_TYPE).recipe)
    dataset, samples, images = calibration_samples(args.dataset, recipe, family_of(raw_config, str(config_file)))
    held_out = args.dataset is not None and not is_calibration_set(dataset, recipe, images)
    if not held_out:
        print(f"warning: evaluating on the calibration samples ({dataset}): the checkpoint was fitted on them, so "
              "these figures are optimistic; pass --dataset with samples it was not calibrated on", file=sys.stderr)
    samples = samples[:args.max_samples]
    inputs = build_model_inputs(args.model_path, samples, images=images, trust_remote_code=args.trust_remote_code)
    report = evaluate(args.model_path, args.quant_path, inputs,
                      progress=lambda name: print(f"  compared {name}", file=sys.stderr, flush=True),
                      device=args.device, dataset=str(dataset.resolve()), held_out=held_out)
    print(report.table())
    if args.output:
        Path(args.output).write_text(report.to_json())
        print(f"report written to {args.output}")
    if args.report:
        from dist_quant.htmlreport import write_report

        print(f"page drawn to {write_report(args.quant_path, json.loads(report.to_json()), args.report)}")
    return 0


REPORT_EXAMPLE = """example:
  dist-quant report /models/Qwen3-VL-235B-A22B-w8a8 --eval eval.json   # eval.json: dist-quant eval --output
"""


def _report_parser(sub) -> None:
    p = _command(sub, "report", "draw report.html from the files next to a checkpoint",
                 "Draw the checkpoint's report page again (quant draws it when it publishes): a summary, the "
                 "calibration coverage of every expert, the run's timeline per actor, what to do next, and with "
                 "--eval the accuracy part (a `dist-quant eval --output` JSON). One self-contained HTML file.",
                 REPORT_EXAMPLE)
    p.add_argument("checkpoint", help="the quantized checkpoint directory")
    p.add_argument("--eval", default=None, help="a `dist-quant eval --output` JSON file to add the accuracy part")
    p.add_argument("--output", default=None, help="where to write the page (default: CHECKPOINT/report.html)")


def _cmd_report(args) -> int:
    from dist_quant.checkpoint.formats import published_format
    from dist_quant.htmlreport import REPORT_FILE, write_report

    _checkpoint_folder(args.checkpoint)
    if published_format(args.checkpoint) is None:
        raise DistQuantError(f"{args.checkpoint} holds no published quantized checkpoint (no ascendv1 description, "
                             "no compressed-tensors config): pass the folder `dist-quant quant` wrote")
    output = Path(args.output) if args.output else Path(args.checkpoint) / REPORT_FILE
    if output.is_dir() or not output.parent.is_dir():
        raise DistQuantError(f"cannot write the page to {output}: "
                             + ("it is a folder; name a file" if output.is_dir() else "its folder does not exist"))
    evaluation = _bound_evaluation(args.eval, args.checkpoint) if args.eval else None
    print(f"page drawn to {write_report(args.checkpoint, evaluation, output)}")
    return 0


def _bound_evaluation(path: str, checkpoint: str) -> dict:
    """The eval report in ``path``, refused unless it measured ``checkpoint`` (its fingerprint: the same files)."""
    from dist_quant.checkpoint.fingerprint import checkpoint_fingerprint
    from dist_quant.htmlreport import inputs

    where = Path(path)
    evaluation, problem = inputs.read(where.parent, where.name, inputs.clean_evaluation)
    if evaluation is None:
        raise DistQuantError(f"cannot use {path} ({problem or 'it does not exist'}); pass a "
                             "`dist-quant eval --output` file")
    recorded = evaluation.get("checkpoint_fingerprint")
    if recorded is None:
        raise DistQuantError(f"{path} does not say which checkpoint it measured (an eval report from before "
                             f"dist-quant recorded it): run `dist-quant eval --quant_path {checkpoint} --output ...` "
                             "again")
    if recorded != checkpoint_fingerprint(checkpoint):
        raise DistQuantError(f"{path} measured another checkpoint ({inputs.text(evaluation.get('quant_path', '?'))}) "
                             f"than {checkpoint}: their files differ; evaluate this one with `dist-quant eval`")
    return evaluation


CHECK_EXAMPLE = """example:
  dist-quant check /models/Qwen3-VL-235B-A22B-w8a8 --serve_dtype bfloat16 --tp 16
"""


def _check_parser(sub) -> None:
    p = _command(sub, "check", "check a checkpoint against the serving engine's loader rules before serving it",
                 "Apply the rules vLLM Ascend's loader applies to an ascendv1 (msModelSlim) checkpoint: "
                 "config.json keys that take over the description, the key prefixes, the description entry of "
                 "every layer vLLM builds, fused layers sharing one type, every parameter each method creates "
                 "with its dtype and shape for the serving dtype and tensor-parallel size. Prints a table of "
                 "rule / verdict / first offending key; exits 1 on any violation. Works on checkpoints written "
                 "by msModelSlim too; `quant` runs it on its own output before publishing.",
                 CHECK_EXAMPLE)
    p.add_argument("checkpoint", help="the quantized checkpoint directory")
    p.add_argument("--serve_dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="vLLM's --dtype (default: what --dtype auto picks: bfloat16 for a bfloat16 model, "
                        "float16 for any other)")
    p.add_argument("--tp", type=_positive_int, default=1, help="vLLM's --tensor-parallel-size")


def _checkpoint_folder(path: str) -> None:
    if not Path(path).is_dir():
        raise DistQuantError(f"{path} is not a directory: pass the quantized checkpoint's folder")


def _cmd_check(args) -> int:
    from dist_quant.check import SERVE_DTYPES, check_checkpoint, format_report

    _checkpoint_folder(args.checkpoint)
    serve_dtype = SERVE_DTYPES[args.serve_dtype] if args.serve_dtype else None
    report = check_checkpoint(args.checkpoint, serve_dtype, args.tp)
    print(format_report(report))
    return 0 if report.ok else 1


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _cmd_quant(args) -> int:
    recipe = _recipe(args)
    _warn_model_type(args)
    if args.save_format is not None:
        recipe = dataclasses.replace(recipe, saver=SAVE_FORMATS[args.save_format])
    if args.dry_run:
        return _dry_run(args.model_path, recipe, args.dataset)
    common = dict(dataset=args.dataset, device=args.device, overwrite=args.overwrite, progress=not args.quiet,
                  trust_remote_code=args.trust_remote_code, expert_group_size=args.expert_group_size,
                  resume=args.resume, compute_threads=args.compute_threads, max_sample_tokens=args.max_sample_tokens,
                  max_samples=args.max_samples)
    distributed = args.workers > 1 or args.ray_address is not None
    if not distributed:
        from dist_quant.runtime.local import quantize_single_card

        summary = quantize_single_card(args.model_path, args.save_path, recipe, **common)
    else:
        from dist_quant.runtime.ray_driver import quantize_distributed

        summary = quantize_distributed(args.model_path, args.save_path, recipe, workers=args.workers,
                                       ray_address=args.ray_address, **common)
    if summary.already_complete:
        print(f"{summary.save_path} already holds the finished checkpoint of this run; nothing to do")
        return 0
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(summary.counts.items()))
    print(f"quantized {args.model_path} -> {summary.save_path}")
    print(f"  time {summary.seconds:.1f} s, {summary.units} units, {summary.tensors} tensors ({counts}), "
          f"{_human_bytes(summary.bytes_written)} written")
    print(f"  time by phase (summed over units, may overlap): {format_times(summary.phases)}")
    print(f"  calibration coverage: {summary.experts_without_tokens} expert(s) received no calibration token "
          "(details in calibration_coverage.json; log in quant_run.log)")
    if distributed:  # ray_driver.DistributedSummary
        for actor in summary.actors:
            print(f"  actor {actor.index} on {actor.host}: {actor.units} units, busy {actor.busy_seconds:.1f} s, "
                  f"read {_human_bytes(actor.bytes_read)}, wrote {_human_bytes(actor.bytes_written)}")
        print(f"  Ray start-up {summary.ray_start_seconds:.1f} s (included in the time above)")
    return 0


def _dry_run(model_path: str, recipe, dataset: Optional[str]) -> int:
    """The model checked against its weights, the recipe against the model and the calibration samples against
    what the model reads (images and text, or text), as quant does before any work; then the scheme of every
    linear, grouped by name."""
    from dist_quant.runtime.assignments import format_assignments, linear_assignments
    from dist_quant.runtime.driver import checked_start

    (_, _, config), dataset_path, samples, _ = checked_start(model_path, recipe, dataset)
    print(f"recipe {recipe.path} on {model_path} (saved as {recipe.saver}), {len(samples)} calibration samples "
          f"from {dataset_path}:")
    print(format_assignments(linear_assignments(recipe, config)))
    print("--dry_run: nothing was written")
    return 0


def _presets_parser(sub) -> None:
    _command(sub, "presets", "list the bundled recipes that --model_type/--quant_type select",
             "List the one-click presets: each --model_type/--quant_type pair and its recipe.",
             "example:\n  dist-quant presets")


def _cmd_presets(args) -> int:
    print(format_presets())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dist-quant", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Distributed W8A8 quantization of Qwen3-VL-MoE and Qwen3-MoE for Ascend NPUs "
                    "(msModelSlim-compatible output).",
        epilog="examples:\n"
               "  dist-quant presets\n"
               "  dist-quant plan --model_path /models/Qwen3-VL-235B-A22B-Instruct --workers 16\n"
               "  dist-quant quant --model_path M --save_path S --device npu --model_type Qwen3-VL-235B-A22B "
               "--quant_type w8a8 --workers 8\n"
               "  dist-quant eval --model_path M --quant_path S\n"
               "  dist-quant check S --tp 8\n"
               "  dist-quant report S\n"
               "Run `dist-quant COMMAND --help` for each command's options.")
    sub = parser.add_subparsers(dest="command", required=True)
    _quant_parser(sub)
    _plan_parser(sub)
    _eval_parser(sub)
    _check_parser(sub)
    _report_parser(sub)
    _presets_parser(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm's scancel, a node being drained, ``kill``): handled like Ctrl-C, so the work is kept."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated("SIGTERM")


def continue_command(argv: Sequence[str]) -> str:
    """The exact command that continues an interrupted run: the same arguments, with --resume."""
    args = list(argv)
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["dist-quant", *args])


def _interrupted(interrupt: KeyboardInterrupt, argv: Sequence[str]) -> int:
    from dist_quant.runtime.driver import RunInterrupted

    how = "SIGTERM" if "SIGTERM" in str(interrupt) else "Ctrl-C"
    if argv and argv[0] == "quant":
        if isinstance(interrupt, RunInterrupted) and interrupt.kept_units:
            what = f"{interrupt.kept_units} finished unit(s) are kept in {interrupt.staging}"
        else:
            what = "no unit had finished yet, nothing was kept"
        print(f"dist-quant: interrupted ({how}): {what}; continue with: {continue_command(argv)}", file=sys.stderr)
    else:
        print(f"dist-quant: interrupted ({how})", file=sys.stderr)
    return 143 if how == "SIGTERM" else 130


class _Printable(logging.Filter):
    """Log lines on the terminal without control characters (warnings quote recipe values and file names)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = printable(record.getMessage()), None
        return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _Printable) for f in handler.filters):
            handler.addFilter(_Printable())
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _in_main_thread() else None
    try:
        commands = {"quant": _cmd_quant, "plan": _cmd_plan, "eval": _cmd_eval, "check": _cmd_check,
                    "report": _cmd_report, "presets": _cmd_presets}
        return commands[args.command](args)
    except DistQuantError as exc:
        print(f"dist-quant: error: {printable(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        return _interrupted(interrupt, argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
