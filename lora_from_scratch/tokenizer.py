"""GPT-2's byte-level BPE tokenizer, from scratch (Radford et al., 2019, section 2.2 "Input Representation").

Byte-pair encoding (Sennrich et al., 2016) starts from single symbols and repeatedly joins the
adjacent pair the training run merged earliest. GPT-2 applies it to BYTES, so every string has an
encoding and nothing is ever "unknown", in three steps:

1. pre-tokenize: a regular expression cuts the text into words (``PATTERN``: contractions, runs of
   letters, of digits, of other symbols, each with at most one leading space; runs of whitespace).
   A merge never crosses two words. The pattern uses Unicode classes (``\\p{L}`` letters,
   ``\\p{N}`` numbers) that the standard library's ``re`` lacks; the ``regex`` package has them
   (GPT-2's own ``encoder.py`` takes it too);
2. bytes to symbols: each of a word's UTF-8 bytes becomes one printable character through a fixed
   table (``bytes_to_unicode``), so that vocab.json and merges.txt are plain text;
3. merge: within a word, join the adjacent pair of lowest rank (its line number in merges.txt)
   until no pair of the word is in the merge table; each final symbol is looked up in vocab.json.

The letter and number classes come from the Unicode tables of the `regex` package. transformers'
``GPT2Tokenizer`` runs the same pattern in the `tokenizers` library, whose regular-expression engine
has tables of its own: the two agree on every code point of Unicode 14.0 and class some of the
characters assigned since (newer scripts and CJK extensions) differently, which changes a token
only where a merge spans the different cut.

Decoding reverses it: ids -> symbols -> bytes -> UTF-8 (bytes that do not form valid UTF-8, such as
half an emoji, become U+FFFD, as transformers' ``GPT2Tokenizer`` does with ``errors="replace"``).

    tok = BPETokenizer.from_pretrained("gpt2-folder")   # the vocab.json + merges.txt save_pretrained writes
    ids = tok.encode("Hello world")                     # [15496, 995] with GPT-2's files
    tok.decode(ids)                                     # 'Hello world'
"""

from __future__ import annotations

import json
import os

import regex

# GPT-2's pre-tokenization pattern (openai/gpt-2, src/encoder.py), unchanged.
PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOS_TOKEN = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """The 256 bytes -> 256 printable characters. Printable Latin-1 bytes map to themselves; the rest
    (control characters, space, ...) to the characters from U+0100 upward, in byte order. Space (32)
    thus becomes 'Ġ' (U+0120) and newline (10) 'Ċ' (U+010A), which is why GPT-2's vocabulary is full of them."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return {(a, b) for a, b in zip(word[:-1], word[1:])}


class BPETokenizer:
    """Byte-level BPE with GPT-2's rules: ``encode(text) -> list[int]``, ``decode(ids) -> str``.

    ``encoder`` maps a symbol string to its id (vocab.json); ``merges`` lists the symbol pairs in the
    order they were learned (merges.txt): a pair's rank is its index there, lower merges first.
    """

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]], eos_token: str = EOS_TOKEN):
        if not encoder:
            raise ValueError("BPETokenizer: the vocabulary is empty")
        self.encoder = dict(encoder)
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        missing = [c for c in self.byte_encoder.values() if c not in self.encoder]
        if missing:
            raise ValueError(f"BPETokenizer: the vocabulary lacks {len(missing)} of the 256 byte symbols "
                             f"(first: {missing[0]!r}); a byte-level vocabulary must hold every byte")
        self.pattern = regex.compile(PATTERN)
        self.cache: dict[str, list[int]] = {}  # word -> its ids: text repeats words, BPE runs once per word
        self.eos_token = eos_token
        self.eos_token_id = self.encoder.get(eos_token)
        # a special token is matched in the text before the pattern runs (only when the vocabulary holds it)
        self.special = regex.compile(f"({regex.escape(eos_token)})") if self.eos_token_id is not None else None
        self.vocab_size = max(self.decoder) + 1

    @classmethod
    def from_files(cls, vocab_json, merges_txt) -> BPETokenizer:
        """Read GPT-2's vocab.json ({symbol: id}) and merges.txt (a '#version' line, then 'a b' per line)."""
        try:
            with open(vocab_json, encoding="utf-8") as f:
                encoder = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"BPETokenizer: no vocabulary file {vocab_json}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"BPETokenizer: {vocab_json} is not valid JSON ({e})") from None
        if not isinstance(encoder, dict) or not all(isinstance(v, int) for v in encoder.values()):
            raise ValueError(f"BPETokenizer: {vocab_json} must map each symbol to an integer id")
        try:
            with open(merges_txt, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except FileNotFoundError:
            raise FileNotFoundError(f"BPETokenizer: no merges file {merges_txt}") from None
        merges = []
        for n, line in enumerate(lines, 1):
            if not line or (n == 1 and line.startswith("#version")):
                continue
            pair = line.split(" ")
            if len(pair) != 2:
                raise ValueError(f"BPETokenizer: {merges_txt} line {n} is not two symbols separated by a space: "
                                 f"{line[:60]!r}")
            merges.append((pair[0], pair[1]))
        return cls(encoder, merges)

    @classmethod
    def from_pretrained(cls, directory) -> BPETokenizer:
        """The tokenizer of a folder written by transformers' ``save_pretrained`` (vocab.json + merges.txt)."""
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"BPETokenizer: no folder {directory}")
        return cls.from_files(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"))

    def __len__(self) -> int:
        return len(self.encoder)

    def bpe(self, symbols: str) -> list[str]:
        """Merge one word's byte symbols: join the lowest-rank adjacent pair everywhere it occurs, repeat.

        Each pass looks at every pair of the word, so a word of n symbols costs up to n passes of n
        (as in GPT-2's own encoder.py): nothing for ordinary words, a second or so for a 20,000-letter
        run without a space or a digit, which the compiled `tokenizers` library reads about 50x faster.
        """
        word = tuple(symbols)
        ranks = self.ranks
        while len(word) > 1:
            pair = min(_pairs(word), key=lambda p: ranks.get(p, float("inf")))
            if pair not in ranks:
                break
            first, second = pair
            merged, i = [], 0
            while i < len(word):  # left to right, so 'a a a' with the pair (a, a) gives 'aa a'
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return list(word)

    def encode_word(self, word: str) -> list[int]:
        ids = self.cache.get(word)
        if ids is None:
            symbols = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids = [self.encoder[s] for s in self.bpe(symbols)]
            self.cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text``. The end-of-text token written in the text ('<|endoftext|>') is its one
        id, as in transformers' GPT2Tokenizer; the text between is pre-tokenized and merged word by word."""
        if not isinstance(text, str):
            raise TypeError(f"BPETokenizer.encode takes a str, got {type(text).__name__}")
        ids: list[int] = []
        for n, piece in enumerate(self.special.split(text) if self.special else [text]):
            if n % 2:  # the split keeps the special tokens at the odd places
                ids.append(self.encoder[piece])
                continue
            for word in self.pattern.findall(piece):
                ids.extend(self.encode_word(word))
        return ids

    def decode(self, ids) -> str:
        """The text of ``ids`` (a list or a 1-D array of ints); invalid UTF-8 becomes U+FFFD."""
        symbols = []
        for i in ids:
            i = int(i)
            if i not in self.decoder:
                raise ValueError(f"BPETokenizer.decode: id {i} is not in the vocabulary (size {self.vocab_size})")
            symbols.append(self.decoder[i])
        data = bytes(self.byte_decoder[c] for c in "".join(symbols))
        return data.decode("utf-8", errors="replace")
