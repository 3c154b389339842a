"""Calibration data: the set (dataset.py), the model inputs built from it (inputs.py), the input ranges (ranges.py).

Light on purpose (the command line reads the defaults below to build its parser)."""

# Tokens one calibration sample may hold. Its float32 attention mask takes 4*S^2 bytes and every attention layer S^2
# scores per head, so a 1 MB prompt (~250k tokens) would need hundreds of GB; 4096 tokens (a 64 MB mask) hold an
# image of about 4 megapixels at Qwen3-VL's 32x32 pixels per token plus a long question. Longer texts are cut.
DEFAULT_MAX_SAMPLE_TOKENS = 4096

# The bundled calibration set for models that read text only (dist_quant/calib_data/calibText: our own English and
# Chinese paragraphs); image+text models default to the bundled photos, calibImages.
DEFAULT_TEXT_DATASET = "calibText"
