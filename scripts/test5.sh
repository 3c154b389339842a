#!/usr/bin/env bash
# The second line: the newest transformers 5.x in .venv5 (scripts/setup.sh with VENV and TRANSFORMERS) and the tests
# that hold the checkpoint to the baseline's: end to end, same bits, golden digests (the same tensors;
# docs/reproducibility.md), the model chain against transformers' forward, the closed-form counts, the config fields,
# the second family end to end, the family protocol, eval and --dry_run on both families, MXFP8 and W8A16 end to end,
# and Qwen3.5-MoE (transformers 5 only) end to end.
# Extra arguments go to pytest instead of that list.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv5 TRANSFORMERS="transformers>=5,<6" bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv5/bin/activate
python -c "import transformers; print('transformers', transformers.__version__)"
if [ $# -eq 0 ]; then
  set -- tests/test_quantize_e2e.py tests/test_same_bits.py tests/test_golden.py tests/test_model_chain.py \
    tests/test_counts.py tests/test_config_fields.py tests/test_qwen3_moe.py tests/test_family_protocol.py \
    tests/test_evaluate.py tests/test_dry_run.py tests/test_mxfp8_checkpoint.py tests/test_w8a16.py \
    tests/test_qwen3_5_moe.py
fi
python -m pytest -q "$@"
