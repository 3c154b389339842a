"""The checkpoints of a few small models are byte-identical to the ones recorded in tests/data/golden.json (see
tests/golden.py): every tensor, the description, the index, the part files, config.json and the side files."""

import json
import os
import subprocess
import sys
from pathlib import Path

from golden import CASES, DATA, PINNED_ENV


def test_checkpoints_match_the_recorded_digests():
    env = {**os.environ, **PINNED_ENV, "PYTHONPATH": str(Path(__file__).parent)}
    env.pop("DIST_QUANT_KILL_AT", None)
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "golden.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got, recorded = json.loads(done.stdout), json.loads((DATA / "golden.json").read_text())
    assert sorted(got) == sorted(recorded) == sorted(name for name, _, _ in CASES)
    for case in recorded:
        for what in ("files", "tensors"):
            assert got[case][what].keys() == recorded[case][what].keys(), (case, what)
            changed = sorted(k for k in recorded[case][what] if got[case][what][k] != recorded[case][what][k])
            assert not changed, f"{case}: {len(changed)} {what} changed, e.g. {changed[:5]}"
