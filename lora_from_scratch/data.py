"""Generated character-level tasks: the training and evaluation data of the whole library.

LoRA paper, sections 1 and 4: a model is first pre-trained on a
broad mix of tasks, then adapted to one new task with a small (low-rank) update.
Here the "broad knowledge" is four string transformations and the new task is a
fifth one, all generated on the fly (nothing is downloaded).

An example is one line of text ``task:input>answer.``, with an input of a few
random lowercase letters:

    copy:dcab>dcab.     reverse:dcab>bacd.     sort:dcab>abcd.
    upper:dcab>DCAB.    desc:dcab>dcba.

The model is a next-token predictor. It always sees the whole line, but it is
scored (the loss and exact match) only on predicting the answer characters and
the final "."; the task name and input are given, not learned.

Pre-training uses the uniform mix of ``PRETRAIN_TASKS``; ``FINETUNE_TASK``
("desc", sort descending) is the later adaptation task: it needs sorting (known)
and reversing (known) combined in a way the pre-trained model has never seen.
"""

from __future__ import annotations

import string
import zlib

import numpy as np

from lora_from_scratch.backend import get_xp, to_numpy, xp_of
from lora_from_scratch.checks import check_choice, check_int

# Index 0 is the pad character (never part of an example); then the separators; then the letters.
VOCAB = "_" + ":>." + string.ascii_lowercase + string.ascii_uppercase
VOCAB_SIZE = len(VOCAB)  # 56
PAD_ID = 0
IGNORE_INDEX = -100  # target value meaning "no loss, not scored" (the value PyTorch's cross_entropy skips)

_STOI = {ch: i for i, ch in enumerate(VOCAB)}
_LETTERS = string.ascii_lowercase
_EVAL_STREAM = 0x65766131  # mixed into evaluation seeds so they never coincide with training streams


def encode(s: str) -> list[int]:
    """Token ids of the string ``s``, one per character."""
    if not isinstance(s, str):
        raise ValueError(f"encode expects a str; got {type(s).__name__}")
    ids = []
    for pos, ch in enumerate(s):
        if ch not in _STOI:
            raise ValueError(f"character {ch!r} at position {pos} is not in the vocabulary {VOCAB!r}")
        ids.append(_STOI[ch])
    return ids


def decode(ids) -> str:
    """The string of a 1-D sequence of token ids (list, NumPy or CuPy array)."""
    arr = to_numpy(ids)  # (L,) on the host
    if arr.ndim != 1:
        raise ValueError(f"decode expects a 1-D sequence of ids; got shape {arr.shape}")
    if arr.size == 0:
        return ""
    if arr.dtype.kind not in "iu":
        raise ValueError(f"decode expects integer ids; got dtype {arr.dtype}")
    for pos, i in enumerate(arr.tolist()):
        if not 0 <= i < VOCAB_SIZE:
            raise ValueError(f"id {i} at position {pos} is out of range [0, {VOCAB_SIZE})")
    return "".join(VOCAB[i] for i in arr.tolist())


def _copy(s: str) -> str:
    """copy: the answer is the input."""
    return s


def _reverse(s: str) -> str:
    """reverse: the input backwards."""
    return s[::-1]


def _sort(s: str) -> str:
    """sort: the letters in ascending order."""
    return "".join(sorted(s))


def _upper(s: str) -> str:
    """upper: the input in capitals."""
    return s.upper()


def _desc(s: str) -> str:
    """desc: the letters in descending order (the fine-tuning task)."""
    return "".join(sorted(s, reverse=True))


TASKS = {"copy": _copy, "reverse": _reverse, "sort": _sort, "upper": _upper, "desc": _desc}
PRETRAIN_TASKS = ("copy", "reverse", "sort", "upper")
FINETUNE_TASK = "desc"


def _check_task(task) -> str:
    return check_choice("task", task, TASKS)


def _check_letters(letters) -> str:
    if not isinstance(letters, str) or not letters:
        raise ValueError(f"letters must be a non-empty string of lowercase a-z; got {letters!r}")
    bad = [ch for ch in letters if ch not in _LETTERS]
    if bad:
        raise ValueError(f"letters must be lowercase a-z only; got {letters!r} (bad: {bad[0]!r})")
    return letters


def format_prompt(task: str, letters: str) -> str:
    """The part of an example the model is given: ``"sort:dcab>"``."""
    return f"{_check_task(task)}:{_check_letters(letters)}>"


def make_example(task: str, letters: str) -> str:
    """One full example line: ``make_example("sort", "dcab") == "sort:dcab>abcd."``."""
    return format_prompt(task, letters) + TASKS[task](letters) + "."


def _example_length(task: str, n_letters: int) -> int:
    """Tokens in an example: name, ':', input, '>', answer (same length as input), '.'."""
    return len(task) + 1 + n_letters + 1 + n_letters + 1


def _on_backend(a, xp):
    """Move a host array onto ``xp`` (default: the package's default backend)."""
    xp = get_xp() if xp is None else xp
    return a if xp is np else xp.asarray(a)


def make_batch(rng, batch_size, tasks, block_size=32, min_len=3, max_len=8, xp=None):
    """A batch of random examples as next-token inputs and targets: ``(idx, targets)``, both (B, T) int64.

    Random draws, in this order, all from ``rng`` (a ``numpy.random.Generator``):
      1. ``rng.integers(0, len(tasks), size=B)``: the task of each row, uniform over ``tasks``;
      2. ``rng.integers(min_len, max_len + 1, size=B)``: the input length of each row;
      3. ``rng.integers(0, 26, size=(B, max_len))``: letters; row b uses the first length[b] of its row.
    So the same generator state always gives the same batch.

    Each row is the encoded example ``seq`` (length L); ``idx = seq[:-1]`` and
    ``targets = seq[1:]`` (position t predicts token t + 1). Targets are
    ``IGNORE_INDEX`` except at the positions from '>' to the last answer
    character, whose targets are the answer characters and the final '.'.
    Rows are right-padded to the longest row T: ``idx`` with ``PAD_ID``,
    ``targets`` with ``IGNORE_INDEX``. T <= block_size; a ValueError is raised
    up front if the longest possible example (longest task name with
    ``max_len`` letters) would not fit, whatever the draws.
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)); got {rng!r}")
    batch_size = check_int("batch_size", batch_size, 1)
    block_size = check_int("block_size", block_size, 1)
    min_len = check_int("min_len", min_len, 1)
    max_len = check_int("max_len", max_len, 1)
    if min_len > max_len:
        raise ValueError(f"min_len must be <= max_len; got min_len={min_len}, max_len={max_len}")
    if isinstance(tasks, str):
        raise ValueError(f"tasks must be a sequence of task names such as ({tasks!r},), not a single string")
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError(f"tasks must name at least one task; valid tasks: {list(TASKS)}")
    for t in tasks:
        _check_task(t)
    longest = max(tasks, key=len)
    need = _example_length(longest, max_len) - 1  # model input length of the longest possible example
    if need > block_size:
        raise ValueError(
            f"block_size={block_size} is too small: a {longest!r} example with max_len={max_len} letters "
            f"needs {need} input positions"
        )

    task_ids = rng.integers(0, len(tasks), size=batch_size)  # (B,)
    lengths = rng.integers(min_len, max_len + 1, size=batch_size)  # (B,)
    letter_ids = rng.integers(0, 26, size=(batch_size, max_len))  # (B, max_len)

    seqs = []
    answer_starts = []
    for b in range(batch_size):
        task = tasks[int(task_ids[b])]
        letters = "".join(_LETTERS[i] for i in letter_ids[b, : int(lengths[b])].tolist())
        example = make_example(task, letters)
        seqs.append(encode(example))
        answer_starts.append(example.index(">"))
    T = max(len(s) for s in seqs) - 1

    idx = np.full((batch_size, T), PAD_ID, dtype=np.int64)  # (B, T)
    targets = np.full((batch_size, T), IGNORE_INDEX, dtype=np.int64)  # (B, T)
    for b, (seq, p) in enumerate(zip(seqs, answer_starts)):
        row = np.asarray(seq, dtype=np.int64)  # (L,)
        L = row.shape[0]
        idx[b, : L - 1] = row[:-1]  # (L-1,) inputs
        targets[b, p : L - 1] = row[p + 1 :]  # (L-1-p,) answer characters and the final '.'
    return _on_backend(idx, xp), _on_backend(targets, xp)  # (B, T), (B, T)


def eval_set(tasks, n_per_task, seed, block_size=32):
    """A fixed evaluation set: ``{task: (idx, targets)}`` with ``n_per_task`` rows per task.

    Each task's rows come from ``make_batch`` (with the default lengths) driven by its own
    generator ``np.random.default_rng((_EVAL_STREAM, seed, crc32(task)))``. That seed
    material (three or more 32-bit words, starting with a fixed tag) differs from the
    one or two words of a training generator ``np.random.default_rng(seed)`` for any
    seed below 2**64, so evaluation rows are a separate random stream from training
    batches made with the same seed. A task's rows do not depend on which other tasks
    are requested, and the same ``seed`` always gives the same set.
    """
    if isinstance(tasks, str):
        raise ValueError(f"tasks must be a sequence of task names such as ({tasks!r},), not a single string")
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError(f"tasks must name at least one task; valid tasks: {list(TASKS)}")
    n_per_task = check_int("n_per_task", n_per_task, 1)
    seed = check_int("seed", seed, 0)
    out = {}
    for task in tasks:
        _check_task(task)
        rng = np.random.default_rng((_EVAL_STREAM, seed, zlib.crc32(task.encode("ascii"))))
        out[task] = make_batch(rng, n_per_task, (task,), block_size=block_size)  # (N, T_task) each
    return out


def exact_match(logits, targets) -> float:
    """Fraction of rows whose every scored position is predicted right (argmax == target).

    ``logits`` (B, T, V) from one forward pass, ``targets`` (B, T) with
    ``IGNORE_INDEX`` at unscored positions; predictions there do not matter.
    A row counts only if all its answer characters and its final '.' are right.
    Works on NumPy or CuPy arrays; only the final scalar comes to the host.
    """
    xp = xp_of(logits, targets)
    if logits.ndim != 3:
        raise ValueError(f"logits must have shape (B, T, V); got shape {tuple(logits.shape)}")
    if targets.ndim != 2 or tuple(targets.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"targets must have shape (B, T) = {tuple(logits.shape[:2])}; got shape {tuple(targets.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError("exact_match needs at least one row")
    V = logits.shape[2]
    scored = targets != IGNORE_INDEX  # (B, T) bool
    if not bool(scored.any(axis=1).all()):
        raise ValueError("every row of targets needs at least one scored (non-IGNORE_INDEX) position")
    if not bool((((targets >= 0) & (targets < V)) | ~scored).all()):
        raise ValueError(f"targets must be IGNORE_INDEX={IGNORE_INDEX} or ids in [0, {V})")
    pred = xp.argmax(logits, axis=-1)  # (B, T, V) -> (B, T)
    ok = (pred == targets) | ~scored  # (B, T) bool
    row_ok = ok.all(axis=1)  # (B, T) -> (B,)
    return float(to_numpy(row_ok.astype(xp.float64).mean()))  # (B,) -> scalar


def per_task_exact_match(model_fn, eval_sets) -> dict:
    """``{task: exact_match}`` for each ``(idx, targets)`` in ``eval_sets``; ``model_fn(idx)`` -> logits."""
    return {task: exact_match(model_fn(idx), targets) for task, (idx, targets) in eval_sets.items()}


def greedy_answer(model_fn, task, letters, block_size=32) -> str:
    """The model's answer to one prompt, decoded greedily one character at a time.

    Starting from ``format_prompt(task, letters)``, repeatedly appends the
    argmax of the last position's logits until the model writes '.', or until
    the input would exceed ``block_size``. Returns the generated answer without
    the final '.' (compare with ``TASKS[task](letters)``).
    """
    ids = encode(format_prompt(task, letters))
    block_size = check_int("block_size", block_size, 1)
    if len(ids) > block_size:
        raise ValueError(f"the prompt has {len(ids)} tokens, more than block_size={block_size}")
    answer = []
    while True:
        x = _on_backend(np.asarray([ids], dtype=np.int64), None)  # (1, t)
        logits = model_fn(x)  # (1, t, V)
        nxt = int(to_numpy(logits[0, -1]).argmax())  # (V,) -> id
        if not 0 <= nxt < VOCAB_SIZE:
            raise ValueError(f"model predicted id {nxt}, outside the vocabulary of size {VOCAB_SIZE}")
        ch = VOCAB[nxt]
        if ch == ".":
            break
        answer.append(ch)
        if len(ids) == block_size:  # the next input would not fit the model's context
            break
        ids.append(nxt)
    return "".join(answer)
