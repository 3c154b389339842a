"""The checkpoints of a few small models are byte-identical to the ones recorded in tests/data/golden.json (see
tests/golden.py): every tensor, the description, the index, the part files, config.json and the side files. On
another transformers than the recorded one (5.x), every tensor and every file but those that transformers itself
writes into the source model (golden.TRANSFORMERS_FILES)."""

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from golden import CASES, DATA, PINNED_ENV, RECORDED_TRANSFORMERS, TRANSFORMERS_FILES


def test_checkpoints_match_the_recorded_digests():
    tests = Path(__file__).parent  # golden.py's helpers, and the dist_quant of this checkout
    env = {**os.environ, **PINNED_ENV, "PYTHONPATH": os.pathsep.join((str(tests), str(tests.parent)))}
    env.pop("DIST_QUANT_KILL_AT", None)
    done = subprocess.run([sys.executable, str(tests / "golden.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got, recorded = json.loads(done.stdout), json.loads((DATA / "golden.json").read_text())
    assert sorted(got) == sorted(recorded) == sorted(name for name, _, _ in CASES)
    unpinned = () if version("transformers") == RECORDED_TRANSFORMERS else TRANSFORMERS_FILES
    for case in recorded:
        for what in ("files", "tensors"):
            expected = {k: v for k, v in recorded[case][what].items() if what == "tensors" or k not in unpinned}
            found = {k: v for k, v in got[case][what].items() if what == "tensors" or k not in unpinned}
            assert found.keys() == expected.keys(), (case, what)
            changed = sorted(k for k in expected if found[k] != expected[k])
            assert not changed, f"{case}: {len(changed)} {what} changed, e.g. {changed[:5]}"
