"""dist-quant: distributed W8A8 quantization of Qwen3-VL-MoE checkpoints for Ascend NPUs."""

__version__ = "0.1.0"
