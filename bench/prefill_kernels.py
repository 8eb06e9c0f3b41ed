"""How a quantized layer should prefill: through its int8/int4 kernel, or a bfloat16
copy of its weights (quantize.py's `bf16_prefill`).

    python -m bench.prefill_kernels [--shape 1536x576] [--rows 1,8,20,43,128,256]

One SmolLM2-sized layer (out x in), random weights, 2 threads: for each row count
M (a prompt's tokens, or rows x chunk in a batched prefill), the time of one
product through torch's int4 kernel, its int8 kernel, the bfloat16 matrix product
with each one's bfloat16 copy, and float32, median of 20 after a warm-up, the
variants in turn. It also prints whether the CPU has native bfloat16 products
(`avx512_bf16`/`amx_bf16`), which is what decides the path at load.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch

from textstream.engines.transformers import quantize
from textstream.engines.transformers.quantize import Int4Linear, Int8Linear


def median_ms(work: Callable[[], object], reps: int = 20) -> float:
    work()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="1536x576", help="out x in (SmolLM2's gate/up)")
    parser.add_argument("--rows", default="1,8,20,43,128,256")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out_features, in_features = (int(n) for n in args.shape.split("x"))
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))
    int4, int8 = Int4Linear(weight, None, torch.bfloat16), Int8Linear(weight, None, torch.bfloat16)
    wide4 = int4.dequantized().contiguous()
    wide8 = int8.qweight.to(torch.bfloat16)
    print(f"native bfloat16 products (bf16_prefill): {quantize.bf16_prefill()}")
    print(f"layer {out_features}x{in_features}, {args.threads} threads, ms per product:")
    print("rows | int4 kernel | int8 kernel | bf16 copy (int4) | bf16 copy (int8) | float32")
    linear = torch.nn.functional.linear
    with torch.inference_mode():
        for rows in (int(n) for n in args.rows.split(",")):
            x = torch.randn(rows, in_features).to(torch.bfloat16)
            variants: list[Callable[[torch.Tensor], object]] = [
                int4,
                int8,
                lambda x: linear(x, wide4),
                lambda x: linear(x, wide8) * int8.scale,
                lambda x: linear(x.float(), weight),
            ]
            figures = [median_ms(functools.partial(variant, x)) for variant in variants]
            print(f"{rows:>4} | " + " | ".join(f"{f:.3f}" for f in figures))


if __name__ == "__main__":
    main()
