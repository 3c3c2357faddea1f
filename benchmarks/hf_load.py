"""The peak memory of loading a GPT-2 folder (``hf_io.load_hf_gpt2(directory)``), against the model's bytes.

A folder of GPT-2 small's shape (12 layers, width 768, 12 heads, vocabulary 50,257, context 1,024;
random weights drawn by our own GPT, written with ``hf_io.save_hf_gpt2`` in the layout of
transformers' ``save_pretrained``), or any folder given with ``--model``, is loaded in a fresh
Python process, three times over, each measured apart:

- the resident memory's high-water mark (``VmHWM`` in ``/proc/self/status``) minus the resident
  memory just before the call: what the operating system sees (target <= 1.3x the model's bytes);
- tracemalloc's peak during the call: every NumPy array and Python object allocated (target <= 1.3x);
- for comparison, the way it was done before: draw a random GPT of the same config, then copy the
  weights in (``load_state_dict``), measured the same way.

The model's bytes are the loaded parameters' ``nbytes`` (float32). Linux only (``/proc``).

    python benchmarks/hf_load.py [--model DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

CHILD = r"""
import json, sys, time, tracemalloc
sys.path.insert(0, sys.argv[1])
from lora_from_scratch.hf_io import load_hf_gpt2
from lora_from_scratch.model import GPT

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

directory, mode = sys.argv[2], sys.argv[3]
if mode == "traced":
    tracemalloc.start()
before, t0 = status("VmRSS"), time.perf_counter()
if mode == "random-then-copy":
    from lora_from_scratch.hf_folder import read_gpt2_config
    model = GPT(read_gpt2_config(directory), seed=0)
    model.load_state_dict(load_hf_gpt2(directory).state_dict())
else:
    model = load_hf_gpt2(directory)
seconds = time.perf_counter() - t0
peak = tracemalloc.get_traced_memory()[1] if mode == "traced" else status("VmHWM") - before
print(json.dumps({"peak": peak, "seconds": seconds, "model": sum(p.nbytes for p in model.parameters())}))
"""


def measure(directory: str, mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, ROOT, directory, mode], capture_output=True, text=True,
                          env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    if proc.returncode:
        raise SystemExit(f"the {mode} measurement failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    from lora_from_scratch.hf_io import save_hf_gpt2
    from lora_from_scratch.model import GPT, GPTConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a folder written by save_pretrained (default: a random one)")
    ap.add_argument("--quick", action="store_true", help="GPT-2 small's width and vocabulary with 2 layers")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hf-load-") as tmp:
        directory = args.model
        if directory is None:
            cfg = GPTConfig(vocab_size=50257, block_size=1024, n_layer=2 if args.quick else 12, n_head=12, n_embd=768)
            directory = os.path.join(tmp, "gpt2")
            save_hf_gpt2(GPT(cfg, seed=0), directory)
            print(f"a random GPT-2 of {cfg.n_layer} layers, width {cfg.n_embd}, vocabulary {cfg.vocab_size}, "
                  f"context {cfg.block_size} (the shape of GPT-2 small{' but 2 layers' if args.quick else ''})")
        else:
            print(f"the folder {directory}")
        results = {mode: measure(directory, mode) for mode in ("rss", "traced", "random-then-copy")}
    model = results["rss"]["model"]
    print(f"model: {model / 2**20:.0f} MiB of float32 parameters")
    for mode, what in (("rss", "load_hf_gpt2(dir), resident memory"), ("traced", "load_hf_gpt2(dir), tracemalloc"),
                       ("random-then-copy", "random GPT, then copy, resident memory")):
        r = results[mode]
        print(f"  {what:42s} peak {r['peak'] / 2**20:7.0f} MiB = {r['peak'] / model:.2f}x the model "
              f"({r['seconds']:.1f} s)")
    print(f"loader peak / model bytes: {results['rss']['peak'] / model:.2f} resident, "
          f"{results['traced']['peak'] / model:.2f} traced   (target <= 1.3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
