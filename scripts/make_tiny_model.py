"""Write a tiny random Qwen3-VL-MoE model directory (and a calibration set) for tests and demos, offline."""

from __future__ import annotations

import argparse
from pathlib import Path

from dist_quant.synthetic import DTYPES, EXPERT_LAYOUTS, make_calibration_set, make_tiny_model


def int_list(text: str) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2); '' -> ()."""
    return tuple(int(item) for item in text.split(",") if item.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path, help="folder to write the model into")
    parser.add_argument("--layers", type=int, default=4, help="text decoder layers")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer")
    parser.add_argument("--top-k", type=int, default=2, help="experts chosen per token")
    parser.add_argument("--hidden", type=int, default=64, help="text hidden size")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    parser.add_argument("--head-dim", type=int, default=16, help="attention head size")
    parser.add_argument("--moe-intermediate", type=int, default=48, help="expert intermediate size")
    parser.add_argument("--intermediate", type=int, default=96, help="dense MLP intermediate size")
    parser.add_argument("--mlp-only-layers", type=int_list, default=(), help="comma-separated dense layers, e.g. 0,3")
    parser.add_argument("--vision-depth", type=int, default=4, help="vision blocks")
    parser.add_argument("--vision-hidden", type=int, default=32, help="vision hidden size")
    parser.add_argument("--vision-heads", type=int, default=2, help="vision attention heads")
    parser.add_argument("--deepstack", type=int_list, default=(0, 1, 2), help="comma-separated vision block indexes")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--layout", choices=EXPERT_LAYOUTS, default="hub", help="stacked expert tensor layout")
    parser.add_argument("--shard-size", help='write a sharded checkpoint, e.g. "200KB"')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--outliers", type=float, default=0.0,
                        help="plant a few activation outlier channels this many times larger (e.g. 30)")
    parser.add_argument("--calib-images", type=int, default=4, help="images written to OUT_DIR/calib (0: none)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model_dir = make_tiny_model(
        args.out_dir,
        num_layers=args.layers,
        num_experts=args.experts,
        top_k=args.top_k,
        hidden_size=args.hidden,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        moe_intermediate_size=args.moe_intermediate,
        intermediate_size=args.intermediate,
        mlp_only_layers=args.mlp_only_layers,
        vision_depth=args.vision_depth,
        vision_hidden=args.vision_hidden,
        vision_heads=args.vision_heads,
        deepstack=args.deepstack,
        dtype=args.dtype,
        seed=args.seed,
        layout=args.layout,
        shard_size=args.shard_size,
        outliers=args.outliers,
    )
    print(f"model: {model_dir}")
    if args.calib_images:
        index = make_calibration_set(model_dir / "calib", num_images=args.calib_images, seed=args.seed)
        print(f"calibration set: {index}")


if __name__ == "__main__":
    main()
