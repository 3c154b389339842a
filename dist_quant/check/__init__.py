"""``dist-quant check CKPT``: a checkpoint against the rules its serving engines' loaders apply, before serving.

Each rule is what an engine's loader does (its source is cited next to it), stated as a check on the folder: files,
config.json, the description, tensor keys, dtypes and shapes. One module per checkpoint format and the engines that
load it (``ascend``: msModelSlim's ascendv1 format as vLLM Ascend loads it). A rule ends ``ok``, ``FAIL`` (with the
first offending key, and how many there are) or ``n/a`` (nothing it applies to, or a rule it depends on failed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dist_quant.check.folder import Folder, read_folder
from dist_quant.errors import CheckpointError, printable

# the dtypes vLLM serves in (--serve_dtype), by name: no torch here, so that a check answers in well under a second
SERVE_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


@dataclass(frozen=True)
class Rule:
    id: str
    text: str  # the rule, as a statement about the checkpoint
    source: str  # where the loader does it: repository, file, function (docs/ascend-loader-rules.md has the lines)
    engine: str = ""  # a rule of one engine only: failing it leaves the others (empty: a rule of every engine)
    warning: bool = False  # not a loader rule but a consistency one: reported, never blocks


@dataclass
class Verdict:
    rule: Rule
    violations: list[str] = field(default_factory=list)  # one line per offending key or field
    applies: bool = True

    @property
    def status(self) -> str:
        if self.violations:
            return "warn" if self.rule.warning else "FAIL"
        return "ok" if self.applies else "n/a"


@dataclass
class Report:
    path: Path
    format: str  # the checkpoint format, in words
    serve_dtype: str  # a SERVE_DTYPES name
    tp: int
    verdicts: list[Verdict]
    engines: list[str]  # the engines the checkpoint loads on, when every rule passes

    @property
    def ok(self) -> bool:
        """No rule of every engine fails and some engine loads it (warnings do not count)."""
        return not any(v.violations for v in self.verdicts if not v.rule.engine and not v.rule.warning) \
            and bool(self.engines)

    def failed(self) -> list[str]:
        return [v.rule.id for v in self.verdicts if v.violations]


def run_rules(checker, rules: dict[str, Rule]) -> list[Verdict]:
    """Each rule's ``checker.rule_<id>()``: its violations, or None where it does not apply."""
    verdicts = []
    for rule_id, rule in rules.items():
        violations = getattr(checker, f"rule_{rule_id}")()
        verdicts.append(Verdict(rule, list(violations or []), violations is not None))
    return verdicts


def default_serve_dtype(folder: Folder) -> str:
    """What vLLM's ``--dtype auto`` serves the model in: bfloat16 for a bfloat16 config, float16 for any other (a
    float32 model is served in float16). The family of config.json's model_type says where its dtype is stated;
    for a model_type dist-quant has no family for (a rule says so), the first ``dtype``/``torch_dtype`` of its
    ``text_config`` or its top level, bfloat16 where none is."""
    from dist_quant.models.family import sizes_for

    config = folder.config or {}
    try:
        name = sizes_for(config.get("model_type")).source_dtype_name(config)
    except CheckpointError:
        text = config.get("text_config")
        stated = [section.get(key) for section in (text, config) if isinstance(section, dict)
                  for key in ("dtype", "torch_dtype")]
        name = next((value for value in stated if value), "bfloat16")
    return "bfloat16" if name == "bfloat16" else "float16"


def check_checkpoint(path: str | Path, serve_dtype: Optional[str] = None, tp: int = 1) -> Report:
    """Every rule of the checkpoint's format on the folder ``path``, served in ``serve_dtype`` (a SERVE_DTYPES name;
    None: what vLLM serves the model in by default) with a tensor-parallel size of ``tp``."""
    import importlib

    from dist_quant.checkpoint import formats

    if tp < 1:
        raise ValueError(f"tensor parallel size must be >= 1, got {tp}")
    if serve_dtype is not None and serve_dtype not in SERVE_DTYPES:
        raise ValueError(f"serving dtype must be one of {list(SERVE_DTYPES)}, got {serve_dtype!r}")
    folder = read_folder(path)
    dtype = serve_dtype if serve_dtype is not None else default_serve_dtype(folder)
    fmt = formats.published_format(path) or formats.DEFAULT  # an unfinished folder: the default format's rules
    rules = importlib.import_module(fmt.CHECK_RULES)
    verdicts, engines = rules.check(folder, dtype, tp)
    return Report(Path(path), rules.FORMAT, dtype, tp, verdicts, engines)


def refuse_unservable(path: str | Path) -> Report:
    """``quant``'s last step before publishing: the finished folder ``path`` checked with the default serving dtype
    and no tensor parallelism; a failure raises OutputError (a checkpoint that would not load is never published)."""
    from dist_quant.errors import OutputError

    report = check_checkpoint(path)
    if not report.ok:
        raise OutputError("the finished checkpoint breaks its serving engine's loader rules, so it was not published "
                          "(a dist-quant bug: please report it with quant_run.log):\n" + format_report(report))
    return report


def summary_line(report: Report) -> str:
    """One line for a run's log."""
    failed = report.failed()
    return (f"check: {report.format}: loads on {', '.join(report.engines)} "
            f"({', '.join(failed) + ' (warnings or other engines)' if failed else 'every rule passes'})")


def _cell(text: str, width: Optional[int] = 110) -> str:
    """Text for a table cell; cut to ``width`` (None: never, as for the rule itself, which must read whole)."""
    text = " ".join(printable(text).replace("|", "/").split())
    return text if width is None or len(text) <= width else text[:width - 3] + "..."


def format_report(report: Report) -> str:
    lines = [f"{report.path}: {report.format}; serving dtype {report.serve_dtype}, tensor parallel size {report.tp}",
             "",
             "| rule | verdict | first offending key (count) | source |", "|---|---|---|---|"]
    for v in report.verdicts:
        example = f"{v.violations[0]} ({len(v.violations)})" if v.violations else ""
        status = f"{v.status} ({v.rule.engine} only)" if v.violations and v.rule.engine else v.status
        lines.append(f"| {v.rule.id}: {_cell(v.rule.text, None)} | {status} | {_cell(example)} | {v.rule.source} |")
    passed = sum(1 for v in report.verdicts if not v.violations)
    lines.append("")
    if not report.failed():
        lines.append(f"all {passed} rules pass: loads on {', '.join(report.engines)}")
    elif report.ok:
        lines.append(f"loads on {', '.join(report.engines)}; {', '.join(report.failed())} (warnings, or rules of "
                     "other engines) do not stop it")
    else:
        lines.append(f"{len(report.verdicts) - passed} of {len(report.verdicts)} rules fail "
                     f"({', '.join(report.failed())}): it will not load as it should")
    return "\n".join(lines)


__all__ = ["Report", "Rule", "SERVE_DTYPES", "Verdict", "check_checkpoint", "format_report", "refuse_unservable",
           "summary_line"]
