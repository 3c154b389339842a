"""The numbers of int4 W4A8 that are needed without torch: the plan's time projection reads ssz's iteration count,
and the scheme's shape rule (which the recipe checks) the scale_bias chunks. int4.py computes with them."""

QMIN4, QMAX4 = -8, 7
SSZ_ITERATIONS = 50  # msModelSlim's SCALE_SEARCH_ITER_NUM (core/quantizer/impl/ssz.py)
SCALE_BIAS_CHUNKS = 16  # down_proj's scale_bias: one sum per 16th of the input, so each TP rank (tp | 16) has its own
