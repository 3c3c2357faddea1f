"""NF4 quantize + dequantize of a 4096 x 4096 float32 matrix: ours (NumPy) against bitsandbytes' CPU path.

QLoRA (Dettmers et al., 2023), Sections 2-3: blockwise NF4 quantization, block size 64, and the
storage it costs (4.5 bits per parameter, 4.127 with double quantization).

Both implementations quantize and then dequantize the same matrix, timed alternately in one run
after a warm-up so that machine noise hits both alike; the script prints the median of each, the
ratio ours / bitsandbytes (target <= 1.0) and the bits per parameter measured from the stored
arrays' nbytes. It then times quantization alone and dequantization alone (of an already
quantized matrix) the same way. It also checks that the two produce the same packed bytes and
the same dequantized values.

Threads: torch (and so bitsandbytes' CPU path) gets ``--threads`` threads, by default the number
of CPU cores (``OMP_NUM_THREADS`` if set), which is also the number of threads NumPy's BLAS uses.
NumPy's element-wise kernels, which are all that ours uses, run on one thread.

    python benchmarks/nf4.py [--reps 7] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from lora_from_scratch.quant import bits_per_parameter, dequantize_4bit, quantize_4bit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    ap.add_argument("--quick", action="store_true", help="a 1024 x 1024 matrix, 3 repetitions")
    args = ap.parse_args()
    size, reps = (1024, 3) if args.quick else (4096, args.reps)

    import bitsandbytes.functional as bnbf
    import torch

    torch.set_num_threads(args.threads)
    x = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)  # (size, size)
    tx = torch.from_numpy(x)

    def ours():
        return dequantize_4bit(quantize_4bit(x, blocksize=64, quant_type="nf4"))  # (size, size)

    def bnb():
        packed, state = bnbf.quantize_4bit(tx, blocksize=64, compress_statistics=False, quant_type="nf4")
        return bnbf.dequantize_4bit(packed, state)  # (size, size)

    # Warm-up, and a check that both compute the same thing.
    q = quantize_4bit(x, blocksize=64, quant_type="nf4")
    packed, _ = bnbf.quantize_4bit(tx, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert np.array_equal(q.packed, packed.numpy().reshape(-1)), "packed bytes differ from bitsandbytes'"
    assert np.array_equal(ours(), bnb().numpy()), "dequantized values differ from bitsandbytes'"

    def ours_quantize():
        return quantize_4bit(x, blocksize=64, quant_type="nf4")

    def bnb_quantize():
        return bnbf.quantize_4bit(tx, blocksize=64, compress_statistics=False, quant_type="nf4")

    bnb_packed, bnb_state = bnb_quantize()

    def ours_dequantize():
        return dequantize_4bit(q)  # (size, size)

    def bnb_dequantize():
        return bnbf.dequantize_4bit(bnb_packed, bnb_state)  # (size, size)

    cases = {
        "quantize + dequantize": (ours, bnb),
        "quantize alone": (ours_quantize, bnb_quantize),
        "dequantize alone": (ours_dequantize, bnb_dequantize),
    }
    medians = {name: _alternate(fns, reps) for name, fns in cases.items()}

    plain = bits_per_parameter(q)
    double = bits_per_parameter(quantize_4bit(x, blocksize=64, quant_type="nf4", double_quant=True))
    print(
        f"NF4, block size 64, {size} x {size} float32, {reps} reps; "
        f"torch threads {args.threads}, NumPy element-wise kernels 1 thread"
    )
    for name, (mo, mb) in medians.items():
        print(f"{name}:")
        print(f"  ours          median: {mo * 1e3:8.1f} ms")
        print(f"  bitsandbytes  median: {mb * 1e3:8.1f} ms")
        print(f"  ratio ours/bitsandbytes: {mo / mb:.2f}   (target <= 1.0)")
    print(f"bits per parameter: {plain:.4f} without double quantization, {double:.4f} with it")


def _alternate(fns, reps: int) -> tuple[float, float]:
    """Median seconds of (ours, bitsandbytes), the two timed alternately ``reps`` times."""
    times = ([], [])
    for _ in range(reps):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


if __name__ == "__main__":
    main()
