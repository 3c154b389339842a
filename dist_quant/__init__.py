"""dist-quant: distributed W8A8 quantization of Qwen3-VL-MoE and Qwen3-MoE checkpoints for Ascend NPUs."""

import os

__version__ = "0.1.0"

# PyTorch's CPU allocator backs every tensor of 2 MiB or more with transparent huge pages when this is set (read once,
# at the first such allocation: c10/core/alloc_cpu.cpp). A quantizing worker allocates gigabytes of fresh float32
# weights per unit, and with 4 KiB pages the kernel's page faults cost more than the bf16->fp32 conversion itself
# (measured: 89 ms -> 18 ms for 200 MB of bf16; docs/benchmarks.md). It changes where memory lies, never a value.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
