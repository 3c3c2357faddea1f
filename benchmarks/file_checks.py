"""What the file checks cost and catch (``lora_from_scratch.files``), measured side by side.

1. A tiny file whose config claims GPT-2 small over a 1 x 1 tensor: the time and the traced memory
   peak to refuse it (it is refused from the header, before anything is built).
2. Flipped data bytes in a QLoRA checkpoint: how many loads are refused (the SHA-256 in the
   metadata), out of seeded random positions.
3. The checksum's price: ``load_checkpoint`` of the same model with and without the checksum key
   (an older file), alternating, and the SHA-256 alone.

    python benchmarks/file_checks.py [--quick]
"""

import argparse
import json
import os
import struct
import sys
import tempfile
import time
import tracemalloc

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lora_from_scratch import (
    checkpoint,  # noqa: E402
    files,  # noqa: E402
)
from lora_from_scratch.model import GPT, GPTConfig  # noqa: E402
from lora_from_scratch.qlora import apply_qlora  # noqa: E402


def tiny_file(folder: str) -> None:
    path = os.path.join(folder, "tiny.safetensors")
    config = {"vocab_size": 50257, "block_size": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768}
    save_file({"wte.weight": np.zeros((1, 1), np.float32)}, path,
              metadata={"format": checkpoint.FORMAT, "config": json.dumps(config)})
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        checkpoint.load_checkpoint(path)
        raise AssertionError("a file claiming GPT-2 small over a 1 x 1 tensor was loaded")
    except ValueError:
        seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"tiny file ({os.path.getsize(path)} bytes) claiming GPT-2 small: refused in {seconds * 1e3:.2f} ms, "
          f"traced peak {peak / 2**20:.3f} MiB")


def flips(folder: str, n: int) -> None:
    model = apply_qlora(GPT(GPTConfig(vocab_size=23, block_size=8, n_layer=2, n_head=2, n_embd=32), seed=0),
                        4, 8, ["q", "k"], seed=1)
    good = os.path.join(folder, "good.safetensors")
    checkpoint.save_checkpoint(model, good)
    raw = open(good, "rb").read()
    start = 8 + struct.unpack("<Q", raw[:8])[0]  # the data section follows the 8-byte length and the header
    rng = np.random.default_rng(90)
    bad = os.path.join(folder, "bad.safetensors")
    refused = 0
    for pos in rng.choice(np.arange(start, len(raw)), size=n, replace=False):
        damaged = bytearray(raw)
        damaged[pos] ^= int(rng.integers(1, 256))
        with open(bad, "wb") as f:
            f.write(bytes(damaged))
        try:
            checkpoint.load_checkpoint(bad)
        except ValueError:
            refused += 1
    print(f"flipped data bytes: {refused} of {n} refused")
    assert refused == n


def checksum_cost(folder: str, config: GPTConfig, repeats: int) -> None:
    model = GPT(config, seed=0)
    with_sum, without = os.path.join(folder, "with.safetensors"), os.path.join(folder, "without.safetensors")
    checkpoint.save_checkpoint(model, with_sum)
    tensors, meta = checkpoint.read_checkpoint(with_sum)
    meta.pop(files.CHECKSUM_KEY)
    save_file(tensors, without, metadata=meta)  # the same file as written before the checksum existed
    times = {with_sum: [], without: []}
    for _ in range(repeats):
        for path in (with_sum, without):  # alternating, so both see the same machine
            t0 = time.perf_counter()
            checkpoint.load_checkpoint(path)
            times[path].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    files.tensors_checksum(tensors, meta)
    sha = time.perf_counter() - t0
    a, b = np.median(times[with_sum]), np.median(times[without])
    print(f"load_checkpoint of {os.path.getsize(with_sum) / 2**20:.0f} MiB, median of {repeats}: with checksum "
          f"{a:.3f} s, without {b:.3f} s, ratio with/without {a / b:.2f}; SHA-256 alone {sha:.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model and fewer flips")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tiny_file(folder)
        flips(folder, 40 if args.quick else 200)
        config = (GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64) if args.quick
                  else GPTConfig(vocab_size=50257, block_size=256, n_layer=8, n_head=8, n_embd=256))
        checksum_cost(folder, config, 3)


if __name__ == "__main__":
    main()
