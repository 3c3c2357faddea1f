"""A tiny GPT-2 folder as ``save_pretrained`` writes one, made in memory (nothing downloaded).

``tiny_gpt2_folder(directory)`` trains a byte-level BPE vocabulary with the ``tokenizers`` package
(GPT-2's pre-tokenizer, a few hundred symbols) on ``CORPUS``, builds a random transformers
``GPT2LMHeadModel`` over it and writes config.json, model.safetensors, vocab.json and merges.txt:
the four files a real GPT-2 folder has. Test-only: transformers and tokenizers are test dependencies.
"""

from __future__ import annotations

import os

CORPUS = """\
Low-rank adaptation freezes the pre-trained weights and adds a trainable update B A of low rank.
The update has far fewer parameters than the weight it changes, so a task costs a small file.
QLoRA keeps the frozen weights in four bits and trains the same adapters on top of them.
QA-LoRA pools the input of the adapter over groups, so the update folds into the zero points.
The quick brown fox jumps over the lazy dog, and the lazy dog sleeps in the warm sun.
A language model predicts the next token from the tokens before it, one position at a time.
"""


def train_vocabulary(directory: str, corpus: str = CORPUS, vocab_size: int = 400) -> int:
    """Write vocab.json + merges.txt of a byte-level BPE trained on ``corpus``; returns the vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's pattern, bytes -> symbols
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus] * 10 + corpus.split("\n"), trainer)
    os.makedirs(directory, exist_ok=True)
    tok.model.save(directory)  # vocab.json + merges.txt
    return tok.get_vocab_size()


def tiny_gpt2_folder(directory: str, n_layer: int = 2, n_head: int = 2, n_embd: int = 32, n_positions: int = 64,
                     seed: int = 0) -> str:
    """A random GPT-2 with a trained vocabulary, saved as transformers saves one; returns ``directory``."""
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    vocab_size = train_vocabulary(directory)
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_layer=n_layer, n_head=n_head,
                        n_embd=n_embd, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory
