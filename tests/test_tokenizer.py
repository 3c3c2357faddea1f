"""Our byte-level BPE against transformers' GPT2Tokenizer on a vocabulary trained here.

The vocabulary is learned by the `tokenizers` package (byte-level BPE, GPT-2's pre-tokenizer, 1,200
symbols) from the corpus below, which mixes English, code with tabs and newlines, digits, runs of
spaces, accented and non-Latin scripts and emoji, so that merges fire in every one of them. It is
saved as vocab.json + merges.txt, the two files transformers' ``save_pretrained`` writes for GPT-2,
and read by both tokenizers. Compared: ``encode`` on fixed hard cases and on hypothesis-generated
text (any Unicode string; strings over the corpus's own characters, where long merges happen; words
of the corpus glued by odd whitespace), and ``decode`` on every id sequence, valid UTF-8 or not.
"""

import json
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_from_scratch.tokenizer import BPETokenizer, bytes_to_unicode

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

CORPUS = """\
The quick brown fox jumps over the lazy dog. It's a dog's life, isn't it? We're sure they'll say we'd've known.
Low-Rank Adaptation freezes the pre-trained weights and injects trainable rank decomposition matrices.
In 2021, 175,000,000,000 parameters; 10,000 times fewer trainable ones; 3 times less GPU memory (1.5 TB -> 350 GB).
def forward(self, x):
\tif x is None:
\t\treturn 0
\th = x @ self.W.T + self.s * (x @ self.A.T) @ self.B.T   # (B, T, d)
\treturn h\r\n
for i in range(10):    print(i ** 2, end="  ")
    {"key": [1, 2, 3], 'other': None}  // comment  /* block */  <html><body>&amp;</body></html>
Café, naïve, résumé, façade, Ångström, Übermensch, señor, piñata, jalapeño, crème brûlée.
Привет, мир! Как дела? Москва, Санкт-Петербург. Ελληνικά: καλημέρα κόσμε. שלום עולם. مرحبا بالعالم.
東京は日本の首都です。こんにちは世界。中文：你好，世界！한국어: 안녕하세요 세계. हिन्दी: नमस्ते दुनिया। ไทย: สวัสดีชาวโลก
Emoji: 😀😃😄 🤖🚀✨ 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 1️⃣  Math: ∑ x² ≤ ∞, α β γ, √2 ≈ 1.414, ½ ¾ ⅓, ①②③, ٣٤٥, ४५६.
Tabs\tand\t\ttabs, newlines\n\n\nand   runs     of      spaces, trailing spaces   \n  leading spaces.
<|endoftext|>A second document begins after the end-of-text token.<|endoftext|>
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's pattern, bytes -> symbols
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 20 + CORPUS.split("\n"), trainer)
    directory = tmp_path_factory.mktemp("bpe")
    tok.model.save(str(directory))  # vocab.json + merges.txt
    return directory


@pytest.fixture(scope="module")
def pair(folder):
    from transformers import GPT2Tokenizer

    return BPETokenizer.from_pretrained(folder), GPT2Tokenizer.from_pretrained(str(folder))


def assert_same(pair, text):
    ours, hf = pair
    expected = hf.encode(text)
    got = ours.encode(text)
    assert got == expected, f"encode({text!r}):\n ours {got}\n hf   {expected}"
    assert ours.decode(got) == hf.decode(expected) == text


def test_the_vocabulary_has_real_merges(pair):
    ours, hf = pair
    assert len(ours.ranks) > 600 and ours.vocab_size == len(hf) == 256 + 1 + len(ours.ranks)
    assert ours.eos_token_id == hf.eos_token_id == 0
    # long merges fire: the corpus's words come out as one or two tokens, not bytes
    assert len(ours.encode(" trainable")) == 1 and len(ours.encode(" Ångström")) <= 2
    assert len(ours.encode(CORPUS)) < len(CORPUS.encode()) / 3


def test_bytes_to_unicode_is_gpt2s_table():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A" and table[0] == "Ā"
    assert all(c.isprintable() and not c.isspace() for c in table.values())


HARD = [
    "", " ", "  ", "\n", "\t", "\r\n", "Hello world", " Hello world", "Hello  world  ", "x   \n   y",
    "It's they'll we'd've DON'T 's 'S", "'''", "2021 175,000,000,000 1.5e-3 0x1F 007 ١٢٣ ½",
    "def f(x):\n\treturn x  +  1\n\n\n", "\t\t\tindent\n    spaces\n", CORPUS, CORPUS[::-1],
    "Café naïve résumé Ångström", "e\u0301 vs é (combining)", "東京は日本の首都です。", "Привет мир",
    "😀 👨‍👩‍👧‍👦 🇫🇷 👍🏽 ❤️", "\u00a0nbsp\u2009thin\u3000ideographic\u200bzero-width", "\x00\x01\x1c\x1f\x7f\x85",
    "<|endoftext|>", "a<|endoftext|>b <|endoftext|> c", "<|endoftext|", "<|endoftext|><|endoftext|>",
    "\U0010ffff\U000e0001\ufeff", "a" * 300, " " * 50 + "x", "trainabletrainabletrainable",
]


@pytest.mark.parametrize("text", HARD, ids=range(len(HARD)))
def test_encode_decode_hard_cases(pair, text):
    assert_same(pair, text)


FEW = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FEW
@given(text=st.text(alphabet=st.characters(exclude_categories=("Cs", "Cn")), max_size=60))
def test_encode_any_unicode(pair, text):
    """Any string of assigned code points (see ``test_every_code_point_...`` for the unassigned ones)."""
    assert_same(pair, text)


@FEW
@given(text=st.text(alphabet=st.sampled_from(sorted(set(CORPUS))), max_size=120))
def test_encode_corpus_characters(pair, text):
    assert_same(pair, text)


WORDS = sorted(set(CORPUS.split()))
GLUE = st.sampled_from([" ", "  ", "\t", "\n", "\n\n", " \n ", "", "\u00a0", "\r\n", "   \t"])


@FEW
@given(parts=st.lists(st.tuples(st.sampled_from(WORDS), GLUE), max_size=20))
def test_encode_corpus_words_with_odd_whitespace(pair, parts):
    assert_same(pair, "".join(w + g for w, g in parts))


@FEW
@given(data=st.data())
def test_decode_any_ids(pair, data):
    """Any id sequence, including ones that cut a multi-byte character (both give U+FFFD)."""
    ours, hf = pair
    ids = data.draw(st.lists(st.integers(0, ours.vocab_size - 1), max_size=30))
    assert ours.decode(ids) == hf.decode(ids)


@pytest.mark.slow
def test_every_code_point_is_pre_tokenized_as_tokenizers_does(pair):
    """Each code point the standard library's ``unicodedata`` knows (Unicode 14.0 under Python 3.11: about
    280,000) after a space, between a letter and a digit, and doubled, cut into words by our pattern and
    by the ByteLevel pre-tokenizer of `tokenizers`: the same words, so the Unicode classes of GPT-2's
    pattern (letters, numbers, spaces) agree in the `regex` package and in the engine of `tokenizers`.
    (Token ids alone would not show a different cut where no merge spans it.) Code points assigned
    since are classed by each library's own Unicode tables, which differ; see ``tokenizer``'s docstring."""
    from tokenizers import pre_tokenizers

    ours, _ = pair
    theirs = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    points = [cp for cp in range(0x110000) if unicodedata.category(chr(cp)) not in ("Cn", "Cs")]
    assert len(points) > 250_000
    for start in range(0, len(points), 8192):
        text = "".join(f" {c}a{c}1{c}{c}" for c in map(chr, points[start:start + 8192]))
        words = ["".join(ours.byte_encoder[b] for b in w.encode()) for w in ours.pattern.findall(text)]
        assert words == [w for w, _ in theirs.pre_tokenize_str(text)], f"code points from U+{points[start]:04X}"


def test_the_cache_remembers_words(pair):
    ours, _ = pair
    ours.cache.clear()
    ids = ours.encode("the the the the")
    assert set(ours.cache) == {"the", " the"} and ids == ours.cache["the"] + ours.cache[" the"] * 3
    ours.cache[" the"] = [7]  # a later encode looks the word up instead of merging it again
    assert ours.encode("the the") == ours.cache["the"] + [7]
    ours.cache.clear()


def test_bad_input_is_refused(folder, tmp_path, pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="id 5000 is not in the vocabulary"):
        ours.decode([1, 5000])
    with pytest.raises(TypeError, match="takes a str"):
        ours.encode(b"bytes")
    with pytest.raises(FileNotFoundError, match="no folder"):
        BPETokenizer.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no merges file"):
        BPETokenizer.from_files(folder / "vocab.json", tmp_path / "merges.txt")
    (tmp_path / "bad.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match="line 2 is not two symbols"):
        BPETokenizer.from_files(folder / "vocab.json", tmp_path / "bad.txt")
    (tmp_path / "small.json").write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(ValueError, match="lacks 254 of the 256 byte symbols"):
        BPETokenizer.from_files(tmp_path / "small.json", folder / "merges.txt")
