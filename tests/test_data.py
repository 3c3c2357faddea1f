"""Tests for lora_from_scratch.data: the generated tasks, batches, masks and exact-match metric."""

import string

import numpy as np
import pytest

from lora_from_scratch import data
from lora_from_scratch.backend import to_numpy
from lora_from_scratch.data import IGNORE_INDEX, PAD_ID, TASKS, VOCAB, VOCAB_SIZE


def oracle_logits(idx, answer_fn=None):
    """Logits (B, T, V) that put all mass on the correct next character of each row's example.

    Each row of idx is decoded, its task and letters are read back from the text, and the full
    example is rebuilt independently of make_batch with ``answer_fn(task, letters)`` (default:
    the true answer). Positions past the example predict the pad id.
    """
    idx = to_numpy(idx)  # (B, T)
    B, T = idx.shape
    logits = np.zeros((B, T, VOCAB_SIZE))  # (B, T, V)
    for b in range(B):
        text = data.decode(idx[b]).rstrip("_")
        task, rest = text.split(":")
        letters = rest.split(">")[0]
        answer = answer_fn(task, letters) if answer_fn else TASKS[task](letters)
        full = f"{task}:{letters}>{answer}."
        for t in range(T):
            nxt = full[t + 1] if t + 1 < len(full) else "_"
            logits[b, t, VOCAB.index(nxt)] = 1.0
    return logits


def test_vocab_layout():
    assert VOCAB_SIZE == 56 == len(VOCAB)
    assert VOCAB[PAD_ID] == "_" and PAD_ID == 0
    assert VOCAB[1:4] == ":>."
    assert VOCAB[4:30] == string.ascii_lowercase
    assert VOCAB[30:] == string.ascii_uppercase
    assert len(set(VOCAB)) == VOCAB_SIZE
    assert IGNORE_INDEX == -100


def test_encode_decode_round_trip():
    assert data.decode(data.encode(VOCAB)) == VOCAB
    assert data.encode(VOCAB) == list(range(VOCAB_SIZE))
    for s in ["sort:dcab>abcd.", "upper:xyz>XYZ.", ""]:
        assert data.decode(data.encode(s)) == s
        assert data.decode(np.asarray(data.encode(s), dtype=np.int64)) == s
    assert data.encode("a:") == [4, 1]


def test_encode_decode_errors_name_the_culprit():
    with pytest.raises(ValueError, match=r"'!' at position 3"):
        data.encode("abc!")
    with pytest.raises(ValueError, match=r"' ' at position 0"):
        data.encode(" a")
    with pytest.raises(ValueError, match="id 56 at position 1"):
        data.decode([4, 56])
    with pytest.raises(ValueError, match="id -1 at position 0"):
        data.decode([-1])
    with pytest.raises(ValueError, match="1-D"):
        data.decode(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="integer"):
        data.decode([1.0, 2.0])


def test_task_functions_and_examples():
    assert set(TASKS) == {"copy", "reverse", "sort", "upper", "desc"}
    assert data.PRETRAIN_TASKS == ("copy", "reverse", "sort", "upper")
    assert data.FINETUNE_TASK == "desc"
    assert data.make_example("sort", "dcab") == "sort:dcab>abcd."
    assert data.make_example("desc", "abdc") == "desc:abdc>dcba."
    assert data.make_example("upper", "abc") == "upper:abc>ABC."
    assert data.make_example("reverse", "abc") == "reverse:abc>cba."
    assert data.make_example("copy", "zza") == "copy:zza>zza."
    assert data.make_example("sort", "banana") == "sort:banana>aaabnn."
    assert data.make_example("desc", "banana") == "desc:banana>nnbaaa."
    assert data.format_prompt("desc", "qwe") == "desc:qwe>"


def test_make_example_errors():
    with pytest.raises(ValueError, match=r"unknown task 'shout'.*'copy', 'reverse', 'sort', 'upper', 'desc'"):
        data.make_example("shout", "abc")
    with pytest.raises(ValueError, match="lowercase"):
        data.make_example("copy", "aBc")
    with pytest.raises(ValueError, match="non-empty"):
        data.make_example("copy", "")


def check_row(idx_row, tgt_row):
    """Decode one row and check it is a valid example with exactly the answer + '.' scored."""
    text = data.decode(idx_row)
    body = text.rstrip("_")
    n = len(body)
    assert "_" not in body
    assert np.all(idx_row[n:] == PAD_ID)
    assert np.all(tgt_row[n:] == IGNORE_INDEX)
    task, rest = body.split(":")
    letters, partial = rest.split(">")
    answer = TASKS[task](letters)
    assert partial == answer  # idx holds the whole example except the final "."
    p = body.index(">")
    # scored positions are exactly p .. n-1 (the '>' and the answer chars except the last)
    scored = np.flatnonzero(tgt_row != IGNORE_INDEX)
    assert scored.tolist() == list(range(p, n))
    assert data.decode(tgt_row[scored]) == answer + "."
    # scored targets are the next input token (teacher forcing), except the final '.'
    assert np.all(tgt_row[p : n - 1] == idx_row[p + 1 : n])
    return task, letters


def test_make_batch_shapes_masks_and_contents():
    rng = np.random.default_rng(0)
    idx, tgt = data.make_batch(rng, 64, data.PRETRAIN_TASKS, xp=np)  # (B, T), (B, T)
    assert isinstance(idx, np.ndarray) and isinstance(tgt, np.ndarray)
    assert idx.dtype == np.int64 and tgt.dtype == np.int64
    assert idx.shape == tgt.shape and idx.shape[0] == 64
    lengths = []
    for b in range(64):
        task, letters = check_row(idx[b], tgt[b])
        assert task in data.PRETRAIN_TASKS
        assert 3 <= len(letters) <= 8
        lengths.append(len(data.make_example(task, letters)) - 1)
    assert idx.shape[1] == max(lengths) <= 32


def test_make_batch_default_backend_and_task_mix():
    rng = np.random.default_rng(1)
    idx, tgt = data.make_batch(rng, 4000, data.PRETRAIN_TASKS, min_len=2, max_len=5)  # (4000, T)
    idx, tgt = to_numpy(idx), to_numpy(tgt)
    tasks, lens = [], []
    for b in range(idx.shape[0]):
        body = data.decode(idx[b]).rstrip("_")
        task, rest = body.split(":")
        tasks.append(task)
        lens.append(len(rest.split(">")[0]))
    counts = {t: tasks.count(t) for t in data.PRETRAIN_TASKS}
    # uniform mix: each count ~ Binomial(4000, 1/4), std 27.4; allow 5 std
    for c in counts.values():
        assert abs(c - 1000) < 137, counts
    assert set(lens) == {2, 3, 4, 5}


def test_make_batch_is_deterministic_and_seed_dependent():
    a = data.make_batch(np.random.default_rng(5), 16, data.PRETRAIN_TASKS)
    b = data.make_batch(np.random.default_rng(5), 16, data.PRETRAIN_TASKS)
    c = data.make_batch(np.random.default_rng(6), 16, data.PRETRAIN_TASKS)
    assert np.array_equal(to_numpy(a[0]), to_numpy(b[0])) and np.array_equal(to_numpy(a[1]), to_numpy(b[1]))
    assert a[0].shape != c[0].shape or not np.array_equal(to_numpy(a[0]), to_numpy(c[0]))


def test_make_batch_documented_draw_order():
    # the batch is a function of the three documented draws, in order
    rng = np.random.default_rng(42)
    tasks = ("sort", "upper", "desc")
    idx, _ = data.make_batch(rng, 5, tasks, xp=np)  # (5, T)
    ref = np.random.default_rng(42)
    t_ids = ref.integers(0, 3, size=5)  # (5,)
    lens = ref.integers(3, 9, size=5)  # (5,)
    letters = ref.integers(0, 26, size=(5, 8))  # (5, 8)
    for b in range(5):
        word = "".join(string.ascii_lowercase[i] for i in letters[b, : lens[b]])
        expected = data.make_example(tasks[t_ids[b]], word)[:-1]
        assert data.decode(idx[b]).rstrip("_") == expected


def test_all_examples_fit_block_size_32():
    longest_task = max(TASKS, key=len)
    assert longest_task == "reverse"
    worst = len(longest_task) + 1 + 8 + 1 + 8 + 1  # name ':' input '>' answer '.'
    assert worst - 1 <= 32
    # exactly at the limit works, one below fails
    rng = np.random.default_rng(2)
    idx, _ = data.make_batch(rng, 200, ("reverse",), block_size=worst - 1, min_len=8, max_len=8)
    assert idx.shape == (200, worst - 1)
    with pytest.raises(ValueError, match="block_size=24 is too small"):
        data.make_batch(rng, 2, ("reverse",), block_size=worst - 2)
    for task in TASKS:
        idx, tgt = data.make_batch(rng, 50, (task,), block_size=32)  # (50, T)
        assert idx.shape[1] <= 32


def test_make_batch_bad_input():
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match=r"unknown task 'nope'; valid tasks: \['copy'"):
        data.make_batch(rng, 4, ("sort", "nope"))
    with pytest.raises(ValueError, match="min_len must be <= max_len"):
        data.make_batch(rng, 4, ("sort",), min_len=5, max_len=4)
    with pytest.raises(ValueError, match="too small"):
        data.make_batch(rng, 4, ("sort",), block_size=10)
    with pytest.raises(ValueError, match="single string"):
        data.make_batch(rng, 4, "sort")
    with pytest.raises(ValueError, match="at least one task"):
        data.make_batch(rng, 4, ())
    with pytest.raises(ValueError, match="batch_size"):
        data.make_batch(rng, 0, ("sort",))
    with pytest.raises(ValueError, match="min_len"):
        data.make_batch(rng, 2, ("sort",), min_len=0)
    with pytest.raises(ValueError, match="Generator"):
        data.make_batch(0, 4, ("sort",))


def test_exact_match_on_constructed_logits():
    rng = np.random.default_rng(4)
    idx, tgt = data.make_batch(rng, 10, data.PRETRAIN_TASKS, xp=np)  # (10, T)
    logits = oracle_logits(idx)  # (10, T, V)
    assert data.exact_match(logits, tgt) == 1.0
    # one wrong answer character in row 3: that row fails
    wrong = logits.copy()  # (10, T, V)
    t = int(np.flatnonzero(tgt[3] != IGNORE_INDEX)[0])
    wrong[3, t] = 0.0
    wrong[3, t, (tgt[3, t] + 1) % VOCAB_SIZE] = 1.0
    assert data.exact_match(wrong, tgt) == 0.9
    # a wrong final '.' fails the row too
    wrong2 = logits.copy()  # (10, T, V)
    last = int(np.flatnonzero(tgt[5] != IGNORE_INDEX)[-1])
    assert VOCAB[tgt[5, last]] == "."
    wrong2[5, last, :] = 0.0
    wrong2[5, last, VOCAB.index("a")] = 1.0
    assert data.exact_match(wrong2, tgt) == 0.9
    # wrong predictions at every ignored position change nothing
    noisy = logits.copy()  # (10, T, V)
    ignored = tgt == IGNORE_INDEX  # (10, T)
    noisy[ignored] = rng.standard_normal((int(ignored.sum()), VOCAB_SIZE)) * 10  # (n_ignored, V)
    assert data.exact_match(noisy, tgt) == 1.0


def test_exact_match_bad_input():
    tgt = np.array([[IGNORE_INDEX, 5, 3]], dtype=np.int64)  # (1, 3)
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        data.exact_match(np.zeros((1, 3)), tgt)
    with pytest.raises(ValueError, match=r"targets must have shape \(B, T\) = \(1, 4\)"):
        data.exact_match(np.zeros((1, 4, VOCAB_SIZE)), tgt)
    with pytest.raises(ValueError, match="at least one scored"):
        data.exact_match(np.zeros((1, 3, VOCAB_SIZE)), np.full((1, 3), IGNORE_INDEX))
    with pytest.raises(ValueError, match="ids in"):
        data.exact_match(np.zeros((1, 3, VOCAB_SIZE)), np.array([[IGNORE_INDEX, 56, 3]]))


def test_eval_set_deterministic_and_separate_from_training():
    a = data.eval_set(data.PRETRAIN_TASKS, 32, seed=0)
    b = data.eval_set(data.PRETRAIN_TASKS, 32, seed=0)
    c = data.eval_set(data.PRETRAIN_TASKS, 32, seed=1)
    assert list(a) == list(data.PRETRAIN_TASKS)
    for task in data.PRETRAIN_TASKS:
        ia, ta = (to_numpy(x) for x in a[task])
        ib, tb = (to_numpy(x) for x in b[task])
        assert np.array_equal(ia, ib) and np.array_equal(ta, tb)
        assert ia.shape[0] == 32
        for r in range(32):
            task_r, _ = check_row(ia[r], ta[r])
            assert task_r == task
        ic = to_numpy(c[task][0])
        assert ic.shape != ia.shape or not np.array_equal(ic, ia)
        # not the batch a training generator with the same seed would give
        it, _ = data.make_batch(np.random.default_rng(0), 32, (task,), xp=np)
        assert it.shape != ia.shape or not np.array_equal(it, ia)
    # a task's rows do not depend on the other tasks requested
    alone = data.eval_set(("sort",), 32, seed=0)
    assert np.array_equal(to_numpy(alone["sort"][0]), to_numpy(a["sort"][0]))
    with pytest.raises(ValueError, match="valid tasks"):
        data.eval_set(("sort", "bogus"), 4, seed=0)
    with pytest.raises(ValueError, match="n_per_task"):
        data.eval_set(("sort",), 0, seed=0)


def test_per_task_exact_match_with_oracle_and_wrong_models():
    sets = data.eval_set(list(TASKS), 40, seed=3)
    assert data.per_task_exact_match(oracle_logits, sets) == {t: 1.0 for t in TASKS}

    # a model that always sorts ascending is right exactly where the task's answer is the sorted input
    def sorter(idx):
        return oracle_logits(idx, answer_fn=lambda task, letters: "".join(sorted(letters)))

    scores = data.per_task_exact_match(sorter, sets)
    assert scores["sort"] == 1.0
    for task, (idx, _) in sets.items():
        rows = [data.decode(r).rstrip("_") for r in to_numpy(idx)]
        letters = [r.split(":")[1].split(">")[0] for r in rows]
        expected = np.mean([TASKS[task](w) == "".join(sorted(w)) for w in letters])
        assert scores[task] == expected
    assert scores["upper"] == 0.0


def test_greedy_answer():
    calls = []

    def oracle(x):
        calls.append(x.shape)
        return oracle_logits(x)

    assert data.greedy_answer(oracle, "desc", "abdc") == "dcba"
    assert data.greedy_answer(oracle, "upper", "qz") == "QZ"
    # every call sees the prompt plus what was generated so far
    assert calls[0] == (1, len("desc:abdc>"))
    assert calls[4] == (1, len("desc:abdc>dcba"))

    # a model that never writes '.' stops when the context is full
    def chatter(x):
        logits = np.zeros((x.shape[0], x.shape[1], VOCAB_SIZE))  # (B, T, V)
        logits[:, :, VOCAB.index("a")] = 1.0
        return logits

    out = data.greedy_answer(chatter, "copy", "abc", block_size=12)
    assert out == "a" * (12 - len("copy:abc>") + 1)
    with pytest.raises(ValueError, match="more than block_size"):
        data.greedy_answer(chatter, "reverse", "abcdefgh", block_size=10)
