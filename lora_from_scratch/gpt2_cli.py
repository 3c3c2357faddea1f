"""The two commands that take a GPT-2 folder (what transformers' ``save_pretrained`` writes):

    python -m lora_from_scratch generate --model DIR --prompt TEXT [--adapter PATH] [--max-new-tokens N]
                                         [--temperature T] [--top-k K] [--seed S]
    python -m lora_from_scratch finetune --model DIR --text FILE --method {full,lora,qlora,qalora}
                                         [--steps N] [--rank R] [--alpha A] [--block-size T] [--batch-size B]
                                         [--lr LR] [--seed S] --out DIR

``generate`` prints the continuation of the prompt (greedy at temperature 0, else sampled, with
top-k if given), with the model alone or with an adapter put back on it: a folder ``finetune``
wrote, our adapter file in it, or its PEFT folder (``finetune.attach_adapter``).

``finetune`` trains on the text (LoRA, Hu et al., 2021, section 4; QLoRA, Dettmers et al., 2023;
QA-LoRA, Xu et al., 2023; or every weight), shows the held-out loss and perplexity and one sample
before and after, and writes ``--out`` (a new folder, made whole or not at all):

- LoRA, QLoRA, QA-LoRA: ``adapter.safetensors`` (our adapter file: the per-task file of LoRA's
  section 4.2) and, for LoRA and QLoRA, ``peft/``, a PEFT adapter folder that PEFT loads over
  transformers' GPT-2 (``peft_io``);
- full fine-tuning: the whole model as a ``save_pretrained`` folder (config.json,
  model.safetensors, vocab.json, merges.txt), which ``generate --model`` and transformers read;
- ``finetune.json``: the settings, the token counts, the losses, perplexities and samples.

Bad input (a missing folder or file, an unknown method, a bad number, a prompt longer than the
context, an existing ``--out``) is refused with one line and exit code 2, before any work.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile

COMMANDS = ("generate", "finetune")
DEFAULT_LR = {"full": 1e-4, "lora": 1e-3, "qlora": 1e-3, "qalora": 1e-3}
TOKENIZER_FILES = ("vocab.json", "merges.txt")


def _one_line_errors(parser):
    """Argument errors as one line (``error: ...``) and exit code 2, without the usage block."""
    parser.error = lambda message: parser.exit(2, f"error: {message}\n")
    return parser


def add_arguments(sub) -> None:
    """Add the ``generate`` and ``finetune`` sub-commands to ``sub`` (an argparse subparsers object)."""
    g = _one_line_errors(sub.add_parser("generate", help="continue a prompt with a GPT-2 folder (and an adapter)"))
    g.add_argument("--model", required=True, metavar="DIR", help="a folder written by save_pretrained")
    g.add_argument("--prompt", required=True, metavar="TEXT")
    g.add_argument("--adapter", default=None, metavar="PATH",
                   help="a folder written by finetune, its adapter.safetensors, or a PEFT adapter folder")
    g.add_argument("--max-new-tokens", type=int, default=50, metavar="N")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default): greedy")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K likeliest tokens")
    g.add_argument("--seed", type=int, default=None, metavar="S", help="the sampling seed")

    f = _one_line_errors(sub.add_parser("finetune", help="fine-tune a GPT-2 folder on a text file, four ways"))
    f.add_argument("--model", required=True, metavar="DIR", help="a folder written by save_pretrained")
    f.add_argument("--text", required=True, metavar="FILE", help="a UTF-8 text file")
    f.add_argument("--method", required=True, metavar="{full,lora,qlora,qalora}")
    f.add_argument("--steps", type=int, default=100, metavar="N")
    f.add_argument("--rank", type=int, default=8, metavar="R", help="adapter rank (not used by full)")
    f.add_argument("--alpha", type=float, default=16.0, metavar="A", help="scaling s = alpha / rank")
    f.add_argument("--block-size", type=int, default=None, metavar="T", help="tokens per block (default: "
                   "the model's context, at most 128)")
    f.add_argument("--batch-size", type=int, default=4, metavar="B")
    f.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-4 full, 1e-3 adapters)")
    f.add_argument("--seed", type=int, default=0, metavar="S")
    f.add_argument("--out", required=True, metavar="DIR", help="a new folder for the result")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    return generate_main(args) if args.command == "generate" else finetune_main(args)


# ---------------------------------------------------------------- checks (all before any work)
def _count(name: str, value, low: int = 1, high: int | None = None) -> int:
    if value is not None and (value < low or (high is not None and value > high)):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _real(name: str, value: float, positive: bool) -> float:
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")
    return value


def _folder(directory: str):
    """(GPTConfig, BPETokenizer) of a GPT-2 folder: its config, its weights' headers and its vocabulary checked."""
    from .hf_folder import folder_tensors, read_gpt2_config
    from .tokenizer import BPETokenizer

    cfg = read_gpt2_config(directory)
    folder_tensors(directory)  # the weights are there (headers only)
    missing = [name for name in TOKENIZER_FILES if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise FileNotFoundError(f"{directory} has no {' or '.join(missing)}: save the tokenizer there too "
                                "(GPT2Tokenizer.from_pretrained(...).save_pretrained(DIR))")
    tokenizer = BPETokenizer.from_pretrained(directory)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{directory}: the vocabulary has {tokenizer.vocab_size} tokens, the model only "
                         f"{cfg.vocab_size} (vocab_size in config.json)")
    return cfg, tokenizer


def _prompt_ids(tokenizer, prompt: str, block_size: int) -> list:
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("--prompt is empty")
    if len(ids) >= block_size:
        raise ValueError(f"the prompt is {len(ids)} tokens long; the model's context is {block_size} tokens, "
                         "and at least one new token must fit")
    return ids


# ---------------------------------------------------------------- generate
def generate_main(args) -> int:
    from .finetune import _adapter_plan, adapter_file, adapter_kind, attach_adapter, sample
    from .hf_io import load_hf_gpt2

    _count("--max-new-tokens", args.max_new_tokens)
    _real("--temperature", args.temperature, positive=False)
    cfg, tokenizer = _folder(args.model)
    _count("--top-k", args.top_k, 1, cfg.vocab_size)
    if args.adapter is not None and adapter_kind(args.adapter) == "ours":
        _adapter_plan(adapter_file(args.adapter))  # its metadata read and checked
    ids = _prompt_ids(tokenizer, args.prompt, cfg.block_size)
    if len(ids) + args.max_new_tokens > cfg.block_size:
        raise ValueError(f"the prompt ({len(ids)} tokens) and --max-new-tokens {args.max_new_tokens} exceed the "
                         f"model's context of {cfg.block_size} tokens")

    model = load_hf_gpt2(args.model)
    if args.adapter is not None:
        attach_adapter(model, args.adapter)
    print(sample(model, tokenizer, ids, args.max_new_tokens, args.temperature, args.top_k, args.seed))
    return 0


# ---------------------------------------------------------------- finetune
def _check_finetune(args):
    """Every argument checked, cheapest first; returns (cfg, tokenizer, train ids, held-out ids)."""
    from .checks import check_choice
    from .finetune import split_tokens
    from .methods import METHODS

    check_choice("method", args.method, METHODS)
    for name in ("steps", "rank", "batch_size"):
        _count("--" + name.replace("_", "-"), getattr(args, name))
    _real("--alpha", args.alpha, positive=True)
    args.lr = DEFAULT_LR[args.method] if args.lr is None else _real("--lr", args.lr, positive=True)
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        raise ValueError(f"--out {args.out} exists; give a new folder (nothing is overwritten)")
    parent = os.path.dirname(out)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise ValueError(f"--out {args.out}: {parent} is not a folder")
    if not os.path.isfile(args.text):
        raise FileNotFoundError(f"no text file {args.text}")
    cfg, tokenizer = _folder(args.model)
    if args.block_size is None:
        args.block_size = min(128, cfg.block_size)
    _count("--block-size", args.block_size, 1, cfg.block_size)
    _count("--rank", args.rank, 1, cfg.n_embd)
    if args.method == "qalora" and cfg.n_embd % 32:
        raise ValueError(f"QA-LoRA pools groups of 32 input channels; n_embd {cfg.n_embd} is not a multiple of 32")
    try:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{args.text} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    train_ids, held_ids = split_tokens(tokenizer.encode(text), args.block_size)
    return cfg, tokenizer, train_ids, held_ids


def finetune_main(args) -> int:
    from .finetune import held_out_blocks, perplexity, sample, text_loss, train_on_text
    from .hf_io import load_hf_gpt2
    from .lora import count_parameters
    from .methods import NAMES, adapt

    cfg, tokenizer, train_ids, held_ids = _check_finetune(args)
    print(f"model: {args.model} (GPT-2: {cfg.n_layer} layers, width {cfg.n_embd}, vocabulary {cfg.vocab_size}, "
          f"context {cfg.block_size})")
    print(f"text: {args.text}: {len(train_ids) + len(held_ids):,} tokens ({len(train_ids):,} to train on, "
          f"{len(held_ids):,} held out)")
    model = load_hf_gpt2(args.model)
    adapt(model, args.method, r=args.rank, alpha=args.alpha, seed=args.seed)
    trainable, total = count_parameters(model)
    rank = "" if args.method == "full" else f", rank {args.rank}, alpha {args.alpha:g}"
    print(f"method: {NAMES[args.method]}{rank}: {trainable:,} trainable parameters of {total:,} "
          f"({trainable / total:.3%})")

    held = held_out_blocks(held_ids, args.block_size)
    prompt = [int(i) for i in held_ids[:min(8, args.block_size // 2) or 1]]
    new_tokens = min(24, cfg.block_size - len(prompt))
    summary = {"model": os.path.abspath(args.model), "text": os.path.abspath(args.text), "method": args.method,
               "rank": None if args.method == "full" else args.rank,
               "alpha": None if args.method == "full" else args.alpha, "steps": args.steps,
               "block_size": args.block_size, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
               "tokens": {"train": len(train_ids), "held_out": len(held_ids), "scored": int(held[1].size)},
               "trainable_parameters": trainable, "parameters": total,
               "prompt": tokenizer.decode(prompt)}
    for when in ("before", "after"):
        if when == "after":
            summary["train_loss"] = train_on_text(model, train_ids, args.steps, args.batch_size, args.block_size,
                                                  args.lr, seed=args.seed, progress=not args.no_progress)
        loss = text_loss(model, held)
        text = sample(model, tokenizer, prompt, new_tokens)
        summary[when] = {"held_out_loss": loss, "perplexity": perplexity(loss), "sample": text}
        print(f"{when}: held-out loss {loss:.4f}, perplexity {perplexity(loss):.2f}")
        print(f"  sample: {summary['prompt']!r} -> {text!r}")
    for path in write_result(args.out, model, args.method, args.model, summary):
        print(f"wrote {path}")
    return 0


def write_result(out: str, model, method: str, model_dir: str, summary: dict) -> list:
    """Write ``out`` whole or not at all (a temporary folder beside it, renamed); returns what was written."""
    from .checkpoint import save_adapter
    from .files import usual_mode, write_json
    from .finetune import ADAPTER_FILE, PEFT_FOLDER, SUMMARY_FILE
    from .hf_io import save_hf_gpt2
    from .peft_io import save_peft_adapter

    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-finetune-", dir=os.path.dirname(out))
    try:
        os.chmod(tmp, usual_mode(folder=True))
        if method == "full":
            save_hf_gpt2(model, tmp)  # config.json + model.safetensors
            for name in TOKENIZER_FILES:
                shutil.copyfile(os.path.join(model_dir, name), os.path.join(tmp, name))
            names = ["config.json", "model.safetensors", *TOKENIZER_FILES]
        else:
            save_adapter(model, os.path.join(tmp, ADAPTER_FILE))
            names = [ADAPTER_FILE]
            if method in ("lora", "qlora"):
                save_peft_adapter(model, os.path.join(tmp, PEFT_FOLDER))
                names.append(PEFT_FOLDER + os.sep)
        write_json(os.path.join(tmp, SUMMARY_FILE), summary)
        names.append(SUMMARY_FILE)
        if os.path.exists(out):
            raise ValueError(f"{out} appeared while training; the result was not written")
        os.replace(tmp, out)  # the whole folder appears at once
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return [os.path.join(out, name) for name in names]
