"""Our byte-level BPE (pure Python with a word cache) against transformers' GPT2Tokenizer (compiled).

GPT-2's tokenizer (Radford et al., 2019, section 2.2): transformers' ``GPT2Tokenizer`` runs the
`tokenizers` library's Rust BPE; ours is ``lora_from_scratch.tokenizer.BPETokenizer``, about a
hundred lines of Python. Both read the same vocab.json + merges.txt: a byte-level BPE vocabulary
(GPT-2's pre-tokenizer) that `tokenizers` learns here from seeded text; both encode the same
~158 KB of text, generated from another seed (English-like words, numbers, code lines with tabs,
accented and non-Latin words, emoji, runs of spaces and newlines). Timed alternately, medians:

- ours (cold: the word cache emptied before each run, so every distinct word goes through BPE once)
  and ours (warm: the cache already holds the text's words) against transformers;
  target: cold <= 10x transformers' time;
- the token ids are checked equal before anything is timed.

    python benchmarks/tokenizer.py [--reps 5] [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lora_from_scratch.tokenizer import BPETokenizer  # noqa: E402

TARGET = 10.0
SYLLABLES = "ka lo ra mi ne to sa re de la ti on an in er th es al ver com pre tion ing ment ly".split()
FOREIGN = ["café", "naïve", "Ångström", "señor", "Привет", "мир", "καλημέρα", "東京", "日本語", "你好", "안녕하세요",
           "नमस्ते", "مرحبا", "שלום", "😀", "🚀✨", "👍🏽", "∑x²", "½"]
CODE = ["def f(x):", "\treturn x + 1", "\t\tif y is None:", "for i in range(10):", '    print(i, end=" ")',
        "{\"key\": [1, 2, 3]}", "x = a @ W.T + s * (a @ A.T) @ B.T  # (B, T, d)"]


def make_text(n_bytes, seed):
    """English-like prose (a few thousand distinct words, Zipf-like reuse), numbers, code, foreign words, emoji."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    weights = [1 / (k + 1) for k in range(len(words))]
    pieces, size = [], 0
    while size < n_bytes:
        r = rng.random()
        if r < 0.80:
            piece = " " + rng.choices(words, weights)[0]
        elif r < 0.86:
            piece = " " + str(rng.randint(0, 10 ** rng.randint(1, 9)))
        elif r < 0.90:
            piece = rng.choice([",", ".", "!", "?", ";", " -", " (", ")", "'s", "'ll"])
        elif r < 0.94:
            piece = " " + rng.choice(FOREIGN)
        elif r < 0.97:
            piece = "\n" + rng.choice(CODE) + "\n"
        else:
            piece = rng.choice(["\n\n", "  ", "   ", "\t", "\n"])
        pieces.append(piece)
        size += len(piece.encode())
    return "".join(pieces)


def train_vocabulary(directory, text, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.split("\n"), trainer)
    tok.model.save(directory)


def measure(n_bytes=158_000, vocab_size=10_000, reps=5):
    """{'ours_cold_s', 'ours_warm_s', 'hf_s', 'ratio_cold', 'ratio_warm', 'bytes', 'tokens', 'merges'}."""
    from transformers import GPT2Tokenizer

    text = make_text(n_bytes, seed=1)
    with tempfile.TemporaryDirectory() as directory:
        train_vocabulary(directory, make_text(n_bytes, seed=0), vocab_size)
        ours = BPETokenizer.from_pretrained(directory)
        hf = GPT2Tokenizer.from_pretrained(directory)
    ids = hf.encode(text)
    assert ours.encode(text) == ids, "our token ids differ from transformers' GPT2Tokenizer"
    times = {"ours_cold_s": [], "ours_warm_s": [], "hf_s": []}
    for _ in range(reps):
        ours.cache.clear()
        t0 = time.perf_counter()
        ours.encode(text)
        t1 = time.perf_counter()
        ours.encode(text)
        t2 = time.perf_counter()
        hf.encode(text)
        t3 = time.perf_counter()
        times["ours_cold_s"].append(t1 - t0)
        times["ours_warm_s"].append(t2 - t1)
        times["hf_s"].append(t3 - t2)
    out = {k: statistics.median(v) for k, v in times.items()}
    out.update(ratio_cold=out["ours_cold_s"] / out["hf_s"], ratio_warm=out["ours_warm_s"] / out["hf_s"],
               bytes=len(text.encode()), tokens=len(ids), merges=len(ours.ranks))
    return out


def report(r):
    print(f"text: {r['bytes'] / 1000:.0f} KB, {r['tokens']:,} tokens; vocabulary: {r['merges']:,} merges")
    print(f"transformers GPT2Tokenizer (Rust): {r['hf_s'] * 1e3:8.1f} ms")
    print(f"ours, cold word cache:             {r['ours_cold_s'] * 1e3:8.1f} ms")
    print(f"ours, warm word cache:             {r['ours_warm_s'] * 1e3:8.1f} ms")
    verdict = "ok" if r["ratio_cold"] <= TARGET else "OVER TARGET"
    print(f"ratio ours/transformers (tokenizer): {r['ratio_cold']:.2f}x cold, {r['ratio_warm']:.2f}x warm "
          f"(target <= {TARGET:.0f}x cold: {verdict})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="16 KB of text, a 2,000-symbol vocabulary, 2 runs")
    args = ap.parse_args()
    if args.quick:
        report(measure(n_bytes=16_000, vocab_size=2_000, reps=2))
    else:
        report(measure(reps=args.reps))


if __name__ == "__main__":
    main()
