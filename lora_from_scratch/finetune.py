"""Fine-tuning a GPT-2 on a text of one's own, four ways, and putting the result back on the base model.

LoRA (Hu et al., 2021, section 4.2, "Practical Benefits"): one frozen base model, a small file per
task. Here a task is a plain text file: it is tokenized, its last tenth is held out, and training
draws random blocks of ``block_size + 1`` tokens from the rest (inputs = the first T, targets = the
same shifted by one: next-token prediction). The held-out slice is cut into non-overlapping blocks
and scored before and after (mean cross-entropy per token, and its exponential, the perplexity).

- ``split_tokens``, ``random_blocks``, ``held_out_blocks``: the text as training and held-out blocks;
- ``text_loss``: held-out loss under ``no_grad`` (dropout off, no backward caches kept);
- ``train_on_text``: AdamW with warm-up and cosine decay, a tqdm bar, one step = ``train.train_step``;
- ``sample``: a continuation of a prompt (``GPT.generate``), cut at the end-of-text token (an id the
  tokenizer lacks is shown as U+FFFD);
- ``attach_adapter``: put a fine-tuned adapter back on its base model, from our adapter file
  (``checkpoint.save_adapter``: LoRA, QLoRA or QA-LoRA; the base is quantized the way ``methods.adapt``
  does with its defaults) or from a PEFT folder (``peft_io``, applied over the float base as
  PEFT applies it over transformers' GPT-2).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from .backend import like, to_numpy
from .functional import check_ids, cross_entropy
from .nn import no_grad
from .optim import warmup_cosine
from .train import TrainConfig, TrainingDiverged, make_optimizer, train_step

HELD_OUT_FRACTION = 0.1
ADAPTER_FILE = "adapter.safetensors"  # what ``finetune`` writes: our adapter file (checkpoint.save_adapter)
PEFT_FOLDER = "peft"  # and, for LoRA and QLoRA, PEFT's adapter folder
SUMMARY_FILE = "finetune.json"


def min_tokens(block_size: int) -> int:
    """The shortest text ``split_tokens`` accepts: one block to train on and one held out."""
    return 2 * (block_size + 1)


def split_tokens(ids, block_size: int, held_out_fraction: float = HELD_OUT_FRACTION):
    """(training ids, held-out ids): the last ``held_out_fraction`` of the text (at least one block) held out."""
    ids = np.asarray(ids, dtype=np.int64)  # (N,)
    n = len(ids)
    if n < min_tokens(block_size):
        raise ValueError(f"the text is {n} tokens long; block size {block_size} needs at least "
                         f"{min_tokens(block_size)} (one block to train on and one held out)")
    k = max(block_size + 1, int(n * held_out_fraction))
    return ids[:n - k], ids[n - k:]  # (N - k,), (k,)


def random_blocks(rng, ids, batch_size: int, block_size: int):
    """(idx, targets), each (B, T) int64 on the host: B random windows of T + 1 tokens, targets shifted by one."""
    starts = rng.integers(0, len(ids) - block_size, size=batch_size)  # (B,)
    windows = np.stack([ids[s:s + block_size + 1] for s in starts])  # (B, T + 1)
    return windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)


def held_out_blocks(ids, block_size: int, max_blocks: int = 16):
    """(idx, targets), each (N, T): consecutive non-overlapping windows of the held-out ids, at most ``max_blocks``."""
    n = min(max_blocks, (len(ids) - 1) // block_size)
    if n < 1:
        raise ValueError(f"the held-out slice ({len(ids)} tokens) is shorter than one block of {block_size + 1}")
    idx = np.stack([ids[i * block_size:(i + 1) * block_size] for i in range(n)])  # (N, T)
    targets = np.stack([ids[i * block_size + 1:(i + 1) * block_size + 1] for i in range(n)])  # (N, T)
    return idx, targets


def text_loss(model, blocks, batch_size: int = 4) -> float:
    """Mean cross-entropy per token of ``model`` on ``(idx, targets)`` blocks (eval mode, under ``no_grad``)."""
    idx, targets = blocks
    check_ids(idx, model.config.vocab_size)
    reference = model.wte.weight.data
    was_training, total = model.training, 0.0
    model.eval()
    try:
        with no_grad():
            for i in range(0, len(idx), batch_size):
                x, y = like(reference, idx[i:i + batch_size]), like(reference, targets[i:i + batch_size])  # (b, T)
                total += float(cross_entropy(model(x), y)[0]) * y.size  # the batch's mean, weighted by its tokens
    finally:
        model.train(was_training)
    return total / targets.size


def perplexity(loss: float) -> float:
    """exp(loss): the number of equally likely tokens the model is as unsure as (inf past float range)."""
    return math.exp(loss) if loss < 700 else math.inf


def train_on_text(model, ids, steps: int, batch_size: int, block_size: int, lr: float, seed: int = 0,
                  progress: bool = True, warmup_steps: int | None = None) -> list:
    """Train ``model``'s trainable parameters on random blocks of ``ids``; returns the loss of every step.

    AdamW (weight decay on matrices, ``train.make_optimizer``), linear warm-up over the first tenth
    of the steps then cosine decay to a tenth of ``lr``, gradient clipping at 1. A NaN or inf loss
    stops it with ``TrainingDiverged`` (the step is not applied).
    """
    from tqdm.auto import tqdm

    check_ids(np.asarray(ids), model.config.vocab_size)
    opt = make_optimizer(model, TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed))
    warmup = max(1, steps // 10) if warmup_steps is None else warmup_steps
    rng, reference, losses = np.random.default_rng(seed), opt.params[0].data, []
    model.train()
    bar = tqdm(range(steps), disable=not progress, desc="finetune", unit="step", dynamic_ncols=True)
    for step in bar:
        opt.lr = warmup_cosine(step, steps, warmup, lr)
        idx, targets = random_blocks(rng, ids, batch_size, block_size)  # (B, T) each, checked above
        loss, norm = train_step(model, opt, like(reference, idx), like(reference, targets), grad_clip=1.0)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            bar.close()
            raise TrainingDiverged(f"loss {loss}, gradient norm {norm} at step {step} (lr {opt.lr:.3g}); try a "
                                   "smaller --lr")
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}")
    return losses


def sample(model, tokenizer, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
           seed: int | None = None) -> str:
    """The text ``model`` continues ``prompt_ids`` with (``GPT.generate``, under ``no_grad``), cut at end-of-text."""
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            idx = like(model.wte.weight.data, np.asarray([prompt_ids], dtype=np.int64))  # (1, T)
            out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)  # (1, T + n)
    finally:
        model.train(was_training)
    new = [int(i) for i in to_numpy(out)[0, len(prompt_ids):]]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in new:
        new = new[:new.index(tokenizer.eos_token_id)]
    return decode_known(tokenizer, new)


def decode_known(tokenizer, ids) -> str:
    """``tokenizer.decode(ids)``, with each id the vocabulary lacks shown as U+FFFD.

    A model's vocabulary can be larger than its tokenizer's (rows padded for speed, or random
    weights over GPT-2's 50,257 ids with a smaller vocabulary); such ids have no text.
    """
    pieces, run = [], []
    for i in ids:
        if i in tokenizer.decoder:
            run.append(i)
        else:
            pieces += [tokenizer.decode(run), "\ufffd"]
            run = []
    return "".join(pieces) + tokenizer.decode(run)


# ---------------------------------------------------------------- an adapter back on its base
def adapter_kind(path: str) -> str:
    """What ``attach_adapter`` would read at ``path``: ``"ours"`` (our adapter file), ``"peft"`` (a PEFT folder).

    A folder written by ``finetune`` holds both for LoRA and QLoRA: ours is taken, since it keeps the
    method (a QLoRA adapter goes back on the NF4 base it was trained on). ValueError or
    FileNotFoundError otherwise, naming what the path holds.
    """
    from .peft_io import CONFIG_NAME as PEFT_CONFIG

    if not os.path.exists(path):
        raise FileNotFoundError(f"no adapter at {path}")
    if os.path.isfile(path):
        return "ours"
    if os.path.isfile(os.path.join(path, ADAPTER_FILE)):
        return "ours"
    if os.path.isfile(os.path.join(path, PEFT_CONFIG)):
        return "peft"
    if os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path} holds a whole model (full fine-tuning), not an adapter: pass it as --model")
    raise ValueError(f"{path} holds neither {ADAPTER_FILE} nor {PEFT_CONFIG}: not an adapter")


def adapter_file(path: str) -> str:
    """Our adapter file at ``path``: the path itself, or ``adapter.safetensors`` in a ``finetune`` folder."""
    return os.path.join(path, ADAPTER_FILE) if os.path.isdir(path) else path


def _adapter_plan(path: str) -> tuple[str, int, float, list]:
    """(method, rank, alpha, layer paths) of our adapter file, from its metadata."""
    from .checkpoint import ADAPTER_FORMAT, read_checkpoint

    _, meta = read_checkpoint(path)
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not a lora_from_scratch adapter file (metadata keys: {sorted(meta)})")
    try:
        layers = json.loads(meta["layers"])
        kinds = {spec["kind"] for spec in layers.values()}
        first = next(iter(layers.values()))
        rank, alpha = int(first["r"]), float(first["alpha"])
    except (KeyError, TypeError, ValueError, StopIteration, json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{path}: its 'layers' metadata does not describe adapters ({e!r})") from None
    if len(kinds) != 1 or not kinds <= {"lora", "qlora", "qalora"}:
        raise ValueError(f"{path}: adapters of kinds {sorted(map(str, kinds))}; one of lora, qlora, qalora expected")
    return kinds.pop(), rank, alpha, list(layers)


def attach_adapter(model, path: str) -> str:
    """Put the adapter at ``path`` on ``model`` (a base model just loaded); returns the method it gives.

    Our adapter file (or a ``finetune`` folder): the base is adapted with that file's method, rank
    and layers (``methods.adapt`` with its default quantization, as ``finetune`` trains), then the
    file's A and B are loaded (``checkpoint.load_adapter``). A PEFT folder: ``peft_io.load_peft_adapter``
    (LoRA over the float base). Every adapter parameter is left frozen.
    """
    from .adapter import parse_path
    from .checkpoint import load_adapter
    from .methods import adapt
    from .peft_io import load_peft_adapter

    if adapter_kind(path) == "peft":
        load_peft_adapter(model, path)
        model.freeze()
        return "lora"
    file = adapter_file(path)
    method, rank, alpha, layers = _adapter_plan(file)
    targets = [f"blocks.{i}.{t.name}" for i, t in map(parse_path, layers)]  # blocks.0.attn.q -> blocks.0.q
    adapt(model, method, r=rank, alpha=alpha, targets=targets, seed=0)
    load_adapter(model, file)
    model.freeze()
    return method
