"""No host synchronization inside a training step, checked on the CPU with trapped arrays (``sync_trap``).

On a GPU, reading a device value on the host (``int()``, ``float()``,
``bool()``, ``.item()``, ``.tolist()``, ``to_numpy``) waits for all queued
work. ``sync_trap.TrappedArray`` makes each such read raise inside
``no_host_sync()``, so these tests show that the GPT forward (ids checked
beforehand), ``cross_entropy``, the backward, ``clip_grad_norm`` and the
optimizer steps read nothing, and that the deliberate syncs are exactly one
each: the id check of ``GPT.forward``, ``check_targets``, ``grad_norm`` and
``train.train_step``'s read of the loss and norm. First the trap itself is
tested: that it propagates through the operations those functions use, that
indexing with trapped ids works, and that it catches planted syncs.

Covered: nn, model, functional and optim (plain GPT, float32 and float64, with
and without dropout). The adapter layers can reuse ``sync_trap`` the same way.
"""

import math

import numpy as np
import pytest
from sync_trap import HostSync, TrappedArray, is_trapped, no_host_sync, trap, trap_module, untrap, untrap_module

from lora_from_scratch import backend
from lora_from_scratch import functional as F
from lora_from_scratch.model import GPT, GPTConfig
from lora_from_scratch.optim import SGD, AdamW, clip_grad_norm, grad_norm
from lora_from_scratch.train import train_step

pytestmark = pytest.mark.skipif(backend.get_backend_name() != "numpy",
                                reason="the trap wraps NumPy arrays; on CuPy the real device is the test")

CFG = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)


def batch(seed=0, B=2, T=6):
    """Trapped int64 ids and targets (one ignored position), made on the host."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, size=(B, T))  # (B, T)
    targets = rng.integers(0, CFG.vocab_size, size=(B, T))  # (B, T)
    targets[0, 0] = F.IGNORE_INDEX
    return trap(ids), trap(targets)


# ------------------------------------------------------------------ the trap itself
def test_trap_propagates_through_the_operations_used():
    rng = np.random.default_rng(0)
    x = trap(rng.standard_normal((2, 3, 4)))  # (B, T, C)
    W = trap(rng.standard_normal((5, 4)))  # (V, C)
    ids = trap(np.array([[0, 4, 4], [1, 0, 3]]))  # (B, T)
    with no_host_sync():
        xp = backend.xp_of(x)
        results = {
            "ufunc": np.exp(x), "binary with a plain array": x + np.ones(4), "scalar": x * 2.0,
            "matmul": x.reshape(-1, 4) @ W.T, "reduction to 0-d": (x * x).sum(), "max": x.max(axis=-1),
            "astype": x.astype("float32"), "transpose copy": xp.ascontiguousarray(x.transpose(0, 2, 1)),
            "scalar index": x[0, 1, 2], "row": x[0], "lookup (trapped ids)": W[ids],
            "fancy": x.reshape(-1, 4)[[0, 2], [1, 3]],
            "zeros": xp.zeros((2, 2)), "where": xp.where(x > 0, x, 0.0), "stack": xp.stack((x.sum(), x.max())),
            "arange": xp.arange(3), "take/argmax": xp.take(x.reshape(-1), xp.argmax(x)), "sqrt": xp.sqrt((x * x).sum()),
            "triu": xp.triu(xp.full((3, 3), -xp.inf), k=1), "isfinite": xp.isfinite(x.sum()),
            "argmax": x.argmax(), "dot": x.reshape(-1).dot(x.reshape(-1)), "linalg.norm": xp.linalg.norm(x),
            "maximum": xp.maximum((x > 0).sum(), 1),
        }
        dW = xp.zeros((5, 4))  # (V, C)
        backend.scatter_add(dW, ids.reshape(-1), x.reshape(-1, 4)[:6])  # (6, C) into (V, C), repeated ids add up
        plain_lookup = untrap(W)[ids]  # indexing a plain table with trapped ids works (its result is plain)
    np.testing.assert_array_equal(plain_lookup, untrap(W)[untrap(ids)])
    for what, r in results.items():
        assert is_trapped(r), f"{what}: {type(r).__name__} left the trap"
    assert is_trapped(dW)
    np.testing.assert_array_equal(untrap(results["lookup (trapped ids)"]), untrap(W)[untrap(ids)])
    expected = np.zeros((5, 4))
    np.add.at(expected, untrap(ids).reshape(-1), untrap(x).reshape(-1, 4)[:6])
    np.testing.assert_array_equal(untrap(dW), expected)
    assert float(results["reduction to 0-d"]) > 0  # outside the block a trapped array behaves normally


def _planted(kind):
    """Functions that each read a device value on the host once, the ways a forward could."""
    return {
        "int": lambda x: int(x.sum()),
        "float": lambda x: float(x.max()),
        "bool": lambda x: bool((x > 0).any()),
        "if": lambda x: 1 if x.sum() > 0 else 0,
        "item": lambda x: x.sum().item(),
        "tolist": lambda x: x.tolist(),
        "scalar index": lambda x: float(x[0, 0]),
        "format": lambda x: f"{x.sum():.3f}",
        "index": lambda x: list(range(6))[x.argmax()],
        "to_numpy": lambda x: backend.to_numpy(x),
        "asarray": lambda x: backend.asarray(x),
        "like (to the host)": lambda x: backend.like(np.zeros(1), x),
        "old check_ids": lambda x: (int(x.min()), int(x.max())),
        "old clip_grad_norm": lambda x: math.sqrt(float((x.astype("float64") ** 2).sum())),
        "xp constant": lambda x: float(backend.xp_of(x).sqrt(2.0)),  # math.sqrt(2.0) is the host constant
    }[kind]


@pytest.mark.parametrize("kind", ["int", "float", "bool", "if", "item", "tolist", "scalar index", "format",
                                  "index", "to_numpy", "asarray", "like (to the host)", "old check_ids",
                                  "old clip_grad_norm", "xp constant"])
def test_trap_catches_a_planted_sync(kind):
    x = trap(np.arange(6.0).reshape(2, 3) - 2.0)  # (2, 3)
    fn = _planted(kind)
    fn(x)  # harmless outside the block
    with pytest.raises(HostSync):
        with no_host_sync():
            fn(x)
    with no_host_sync(allow=5) as log:  # counted instead of raised
        fn(x)
    assert len(log.events) >= 1


def test_trap_restores_the_package_on_exit():
    originals = {k: getattr(backend, k) for k in ("xp_of", "to_numpy", "asarray", "like")}
    with no_host_sync():
        assert F.xp_of is not originals["xp_of"]
    assert {k: getattr(backend, k) for k in originals} == originals
    assert F.xp_of is originals["xp_of"]
    with pytest.raises(HostSync):
        with no_host_sync():
            int(trap(np.ones(1)).sum())
    assert F.xp_of is originals["xp_of"]  # restored after an exception too


# ------------------------------------------------------------------ the deliberate syncs
def test_gpt_forward_checks_the_ids_with_exactly_one_sync():
    model = trap_module(GPT(CFG, seed=0))
    ids, _ = batch()
    with no_host_sync(allow=1) as log:
        model(ids)
    assert log.events == [".tolist()"]
    with pytest.raises(HostSync):
        with no_host_sync():
            model(ids)
    with no_host_sync():
        model(ids, check=False)
    bad = trap(np.array([[1, 11, 2]]))  # (1, 3)
    with no_host_sync(allow=1), pytest.raises(ValueError, match=r"\b11\b"):
        model(bad)


def test_check_targets_cross_entropy_check_and_grad_norm_sync_exactly_once():
    rng = np.random.default_rng(1)
    logits = trap(rng.standard_normal((2, 6, CFG.vocab_size)))  # (B, T, V)
    _, targets = batch()
    for fn in (lambda: F.check_targets(targets, CFG.vocab_size),
               lambda: F.cross_entropy(logits, targets, check=True),
               lambda: F.check_ids(targets.clip(0), CFG.vocab_size)):
        with no_host_sync(allow=1) as log:
            fn()
        assert len(log.events) == 1
    model = trap_module(GPT(CFG, seed=0))
    with no_host_sync():
        _, dl = F.cross_entropy(model(batch()[0], check=False), targets, check=False)
        model.backward(dl)
    with no_host_sync(allow=1) as log:
        value = grad_norm(model.parameters())
    assert isinstance(value, float) and len(log.events) == 1


# ------------------------------------------------------------------ a whole training step, trapped
def _step(model, opt, ids, targets, clip):
    logits = model(ids, check=False)  # (B, T, V)
    loss, dlogits = F.cross_entropy(logits, targets, check=False)  # (), (B, T, V)
    model.zero_grad()
    model.backward(dlogits)
    norm = clip_grad_norm(opt.params, clip)  # ()
    opt.step()
    return logits, loss, dlogits, norm


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("make_opt", [lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1),
                                      lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01)],
                         ids=["AdamW", "SGD"])
def test_training_steps_have_no_host_sync(dtype, dropout, make_opt):
    cfg = GPTConfig(**{**CFG.to_dict(), "dropout": dropout})
    trapped, plain = GPT(cfg, seed=3, dtype=dtype), GPT(cfg, seed=3, dtype=dtype)
    opt_t, opt_p = make_opt(trapped.parameters()), make_opt(plain.parameters())
    trap_module(trapped)
    ids, targets = batch(seed=4)
    F.check_ids(ids, cfg.vocab_size)  # the once-per-batch checks, outside the trapped region
    F.check_targets(targets, cfg.vocab_size)
    for step in range(3):  # three steps: optimizer state is made, then reused
        clip = 0.05 if step < 2 else 100.0  # clipping active, then not
        with no_host_sync():
            logits, loss, dlogits, norm = _step(trapped, opt_t, ids, targets, clip)
        # the trap really covered everything the step made
        for what, a in [("logits", logits), ("loss", loss), ("dlogits", dlogits), ("norm", norm)]:
            assert is_trapped(a), f"{what} is a {type(a).__name__}"
        for name, p in trapped.named_parameters():
            assert is_trapped(p.data) and is_trapped(p.grad), name
            assert p.grad.dtype == np.dtype(dtype), f"{name}: gradient became {p.grad.dtype}"
        for st in opt_t.state.values():
            assert all(is_trapped(a) for a in st.values() if hasattr(a, "shape"))
        # and computed exactly what the untrapped step computes (the same dropout masks too)
        ref = _step(plain, opt_p, untrap(ids), untrap(targets), clip)
        assert float(loss) == float(ref[1]) and float(norm) == float(ref[3])
        for (name, p), q in zip(trapped.named_parameters(), plain.parameters()):
            assert np.array_equal(untrap(p.data), q.data), f"step {step}: {name} differs"
    untrap_module(trapped)
    assert not any(is_trapped(p.data) for p in trapped.parameters())


def test_train_step_reads_the_loss_and_norm_in_one_transfer():
    model = GPT(CFG, seed=5)
    opt = AdamW(model.trainable_parameters(), lr=1e-2)
    trap_module(model)
    ids, targets = batch(seed=6)
    for clip in (1.0, 0.0):
        with no_host_sync(allow=1) as log:
            loss, norm = train_step(model, opt, ids, targets, grad_clip=clip)
        assert len(log.events) == 1
        assert isinstance(loss, float) and math.isfinite(loss)
        assert (norm is None) == (clip == 0.0)


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_train_step_skips_the_optimizer_step_on_a_non_finite_value(where):
    model = GPT(CFG, seed=5)
    opt = AdamW(model.trainable_parameters(), lr=1e-2)
    ids, targets = (untrap(a) for a in batch(seed=6))
    if where == "loss":
        model.ln_f.bias.data[0] = np.nan  # every logit NaN
    else:  # a finite loss whose backward overflows somewhere
        backward = model.backward

        def overflowing_backward(dlogits=None):
            backward(dlogits)
            model.blocks[1].mlp.proj.weight.grad[0, 0] = np.inf

        model.backward = overflowing_backward
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    loss, norm = train_step(model, opt, ids, targets, grad_clip=1.0)
    assert not (math.isfinite(loss) and math.isfinite(norm))
    if where == "gradient":
        assert math.isfinite(loss) and not math.isfinite(norm)
    assert opt.state == {}
    for n, p in model.named_parameters():
        assert np.array_equal(p.data, before[n], equal_nan=True), n


def test_train_stops_on_a_non_finite_gradient_norm_before_the_weights_change(monkeypatch):
    from lora_from_scratch import data
    from lora_from_scratch.train import TrainConfig, TrainingDiverged, train

    model = GPT(GPTConfig(vocab_size=data.VOCAB_SIZE, block_size=32, n_layer=1, n_head=2, n_embd=16), seed=0)
    backward, calls, after_last_step = model.backward, [], {}

    def backward_overflowing_at_the_third_step(dlogits=None):
        backward(dlogits)
        calls.append(1)
        if len(calls) == 3:
            model.ln_f.weight.grad[0] = np.inf

    def recording_step(self, _step=AdamW.step):
        _step(self)
        after_last_step.update({n: p.data.copy() for n, p in model.named_parameters()})

    model.backward = backward_overflowing_at_the_third_step
    monkeypatch.setattr(AdamW, "step", recording_step)
    cfg = TrainConfig(steps=5, batch_size=4, warmup_steps=1, eval_every=0, eval_per_task=2, seed=0)
    with pytest.raises(TrainingDiverged, match=r"gradient norm became inf .*at step 2 "):
        train(model, cfg, progress=False)
    assert len(calls) == 3
    for n, p in model.named_parameters():  # the weights after step 1: step 2 never reached the optimizer
        assert np.array_equal(p.data, after_last_step[n]), n


def test_trapped_array_is_a_plain_ndarray_outside_the_trap():
    a = trap(np.arange(4))
    assert isinstance(a, TrappedArray) and isinstance(a, np.ndarray)
    assert int(a.sum()) == 6 and a.tolist() == [0, 1, 2, 3] and bool(a.any())
    assert type(untrap(a)) is np.ndarray and np.shares_memory(a, untrap(a))
