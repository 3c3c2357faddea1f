"""Optimizers, clipping and the schedule against PyTorch.

AdamW (Loshchilov & Hutter, 2019, Algorithm 2; decoupled weight decay) vs
torch.optim.AdamW, SGD (momentum, L2 weight decay) vs torch.optim.SGD,
clip_grad_norm vs torch.nn.utils.clip_grad_norm_, all in float64 over
several steps and parameter shapes; the warm-up + cosine schedule at its
boundaries; and the LoRA-relevant rule that frozen parameters get no
optimizer state and are never changed (Hu et al., 2021, section 4.2).

Also: clipping stays on the device (its norm is a 0-d array; float32
gradients stay float32), and optimizer state follows its parameters across
backends (``Optimizer.to`` and the move in ``step``), checked on the CPU with
a stand-in for a CuPy array (see ``FakeDeviceArray`` for what that can show).
"""

import math

import numpy as np
import pytest
import torch
from conftest import rel

from lora_from_scratch.backend import asarray, is_cupy_array, to_numpy
from lora_from_scratch.nn import Parameter
from lora_from_scratch.optim import SGD, AdamW, clip_grad_norm, grad_norm, warmup_cosine

SHAPES = [(3,), (4, 5), (2, 3, 4), (1, 7)]


def make_pair(seed):
    """The same float64 parameters as ours and as torch leaves."""
    rng = np.random.default_rng(seed)
    host = [rng.standard_normal(s) for s in SHAPES]
    ours = [Parameter(asarray(h.copy())) for h in host]
    theirs = [torch.tensor(h.copy(), requires_grad=True) for h in host]
    return rng, ours, theirs


def run_steps(opt, ref, ours, theirs, rng, steps, tol, grad_scale=1.0):
    for step in range(steps):
        for p, t in zip(ours, theirs):
            g = rng.standard_normal(p.shape) * grad_scale  # shape of p
            p.grad = asarray(g)
            t.grad = torch.from_numpy(g.copy())
        opt.step()
        ref.step()
        for i, (p, t) in enumerate(zip(ours, theirs)):
            e = rel(p.data, t.detach().numpy())
            assert e < tol, f"step {step}, parameter {i} {p.shape}: relative error {e:.3e}"


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("betas,eps,lr", [((0.9, 0.999), 1e-8, 1e-2), ((0.8, 0.95), 1e-6, 3e-1)])
def test_adamw_matches_torch(wd, betas, eps, lr):
    rng, ours, theirs = make_pair(0)
    opt = AdamW(ours, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    ref = torch.optim.AdamW(theirs, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    start = [to_numpy(p.data).copy() for p in ours]
    run_steps(opt, ref, ours, theirs, rng, steps=6, tol=1e-12)
    assert all(rel(p.data, s) > 1e-3 for p, s in zip(ours, start))  # the parameters did move


def test_adamw_learning_rate_change_between_steps():
    rng, ours, theirs = make_pair(1)
    opt = AdamW(ours, lr=1e-2, weight_decay=0.05)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.05)
    for lr in (1e-2, 5e-3, 2e-2):
        opt.lr = lr
        for g in ref.param_groups:
            g["lr"] = lr
        assert opt.lr == lr
        run_steps(opt, ref, ours, theirs, rng, steps=2, tol=1e-12)


def test_adamw_parameter_groups():
    rng, ours, theirs = make_pair(2)
    opt = AdamW([{"params": ours[:2], "weight_decay": 0.0}, {"params": ours[2:], "lr": 0.05}],
                lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([{"params": theirs[:2], "weight_decay": 0.0}, {"params": theirs[2:], "lr": 0.05}],
                            lr=1e-2, weight_decay=0.1)
    run_steps(opt, ref, ours, theirs, rng, steps=4, tol=1e-12)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_sgd_matches_torch(momentum, wd):
    rng, ours, theirs = make_pair(3)
    opt = SGD(ours, lr=0.1, momentum=momentum, weight_decay=wd)
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=momentum, weight_decay=wd)
    run_steps(opt, ref, ours, theirs, rng, steps=5, tol=1e-12)
    if momentum:
        assert len(opt.state) == len(ours)


def test_parameter_without_grad_is_skipped():
    rng, ours, theirs = make_pair(4)
    opt = AdamW(ours, lr=0.1)
    before = to_numpy(ours[0].data).copy()
    for p in ours[1:]:
        p.grad = asarray(rng.standard_normal(p.shape))
    opt.step()
    assert np.array_equal(to_numpy(ours[0].data), before)
    assert id(ours[0]) not in opt.state


# ------------------------------------------------------------------ clipping
@pytest.mark.parametrize("max_norm", [0.5, 3.0, 100.0])
def test_clip_grad_norm_matches_torch(max_norm):
    rng, ours, theirs = make_pair(5)
    for p, t in zip(ours, theirs):
        g = rng.standard_normal(p.shape) * 0.5  # global norm about 3.3
        p.grad = asarray(g)
        t.grad = torch.from_numpy(g.copy())
    unclipped = [to_numpy(p.grad).copy() for p in ours]
    norm = clip_grad_norm(ours, max_norm)
    ref_norm = float(torch.nn.utils.clip_grad_norm_(theirs, max_norm))
    assert not isinstance(norm, float) and norm.shape == () and norm.dtype == np.float64  # a 0-d device array
    assert abs(float(norm) - ref_norm) <= 1e-12 * ref_norm
    for p, t in zip(ours, theirs):
        assert rel(p.grad, t.grad.numpy()) < 1e-12
    clipped_norm = math.sqrt(sum(float((to_numpy(p.grad) ** 2).sum()) for p in ours))
    if ref_norm > max_norm:
        assert clipped_norm <= max_norm
        assert abs(clipped_norm - max_norm) < 1e-5
    else:
        assert all(np.array_equal(to_numpy(p.grad), g) for p, g in zip(ours, unclipped))


def test_clip_grad_norm_ignores_missing_grads():
    _, ours, _ = make_pair(6)
    ours[0].grad = asarray(np.full(ours[0].shape, 4.0))  # (3,): norm sqrt(48)
    norm = clip_grad_norm(ours, 1.0)
    assert abs(float(norm) - math.sqrt(48.0)) < 1e-12
    assert all(p.grad is None for p in ours[1:])
    assert grad_norm(ours) == pytest.approx(1.0, abs=1e-5)  # after clipping; grad_norm is a Python float
    assert isinstance(grad_norm(ours), float)


def test_clip_grad_norm_without_any_gradient():
    _, ours, _ = make_pair(6)
    norm = clip_grad_norm(ours, 1.0)
    assert norm.shape == () and float(norm) == 0.0
    assert grad_norm(ours) == 0.0
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(ours, 0.0)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_grad_norm_keeps_float32_gradients_float32(max_norm):
    """The scale is computed in float64 but cast before the multiply: NumPy 2 would promote to float64."""
    rng = np.random.default_rng(8)
    ps = [Parameter(asarray(rng.standard_normal(s).astype(np.float32))) for s in SHAPES]
    for p in ps:
        p.grad = asarray(rng.standard_normal(p.shape).astype(np.float32))  # shape of p, float32
    before = [to_numpy(p.grad).astype(np.float64) for p in ps]
    norm = float(clip_grad_norm(ps, max_norm))
    assert all(p.grad.dtype == np.float32 for p in ps)
    expected = min(1.0, max_norm / (norm + 1e-6))
    for p, b in zip(ps, before):
        assert rel(p.grad, b * expected) < 1e-6


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_clip_grad_norm_with_a_non_finite_norm_leaves_gradients_alone(bad):
    rng = np.random.default_rng(9)
    ps = [Parameter(asarray(rng.standard_normal(s))) for s in SHAPES]
    grads = [rng.standard_normal(s) * 10 for s in SHAPES]
    grads[1][0, 0] = bad
    for p, g in zip(ps, grads):
        p.grad = asarray(g.copy())
    norm = clip_grad_norm(ps, 1.0)
    assert not math.isfinite(float(norm))
    for p, g in zip(ps, grads):
        assert np.array_equal(to_numpy(p.grad), g, equal_nan=True)  # scale 1: nothing changed


# ------------------------------------------------------------------ state across backends
class FakeDeviceArray:
    """A stand-in for a CuPy array on a machine without one: ``backend.is_cupy_array`` says yes (its class
    lives in a module named ``cupy...``) and ``.get()`` copies it to the host, as CuPy's does.

    What a CPU test can show with it: that ``step`` refuses state on another backend than its parameter
    (changing nothing), and that ``Optimizer.to("numpy")`` moves it with ``asarray`` (calling ``.get()``)
    so that the run goes on from the same values. What it cannot show: the real CuPy copies, and the direction
    NumPy -> CuPy, which needs a GPU (``test_state_follows_parameters_to_cupy`` does that, marked gpu).
    """

    __module__ = "cupy._fake"

    def __init__(self, a):
        self._a = np.array(a)
        self.shape, self.dtype, self.nbytes = self._a.shape, self._a.dtype, self._a.nbytes
        self.gets = 0

    def get(self):
        self.gets += 1
        return self._a.copy()


def _foreign_state(opt):
    """Replace every state array by a FakeDeviceArray holding the same values; returns them all."""
    fakes = []
    for st in opt.state.values():
        for k, a in st.items():
            if hasattr(a, "shape"):
                st[k] = FakeDeviceArray(to_numpy(a))
                fakes.append(st[k])
    assert fakes and all(is_cupy_array(f) for f in fakes)
    return fakes


@pytest.mark.parametrize("make", [
    (lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.05), lambda ts: torch.optim.AdamW(ts, lr=1e-2, weight_decay=0.05)),
    (lambda ps: SGD(ps, lr=0.1, momentum=0.9), lambda ts: torch.optim.SGD(ts, lr=0.1, momentum=0.9)),
], ids=["AdamW", "SGD"])
def test_step_refuses_state_on_another_backend_and_changes_nothing(make):
    """As after ``model.to(...)`` without ``opt.to(...)``: step names the fix and changes nothing; after
    ``opt.to(...)`` the run goes on from the same state, as torch's."""
    rng, ours, theirs = make_pair(10)
    opt, ref = make[0](ours), make[1](theirs)
    run_steps(opt, ref, ours, theirs, rng, steps=2, tol=1e-12)
    _foreign_state(opt)
    first = opt.state[id(ours[0])]  # the first parameter's state stays on its backend: checked and passed
    for k, a in first.items():
        first[k] = to_numpy(a) if hasattr(a, "shape") else a
    data = [p.data.copy() for p in ours]
    state = [{k: to_numpy(a).copy() if hasattr(a, "shape") else a for k, a in st.items()} for st in opt.state.values()]
    for p in ours:
        p.grad = np.ones(p.shape)  # shape of p
    with pytest.raises(ValueError, match=r"another backend.*opt\.to\(backend\)"):
        opt.step()
    assert all(np.array_equal(p.data, d) for p, d in zip(ours, data))  # no parameter moved
    for st, before in zip(opt.state.values(), state):  # no step counted, no moment or momentum changed
        assert st.keys() == before.keys()
        assert all(np.array_equal(to_numpy(a), before[k]) if hasattr(a, "shape") else a == before[k]
                   for k, a in st.items())
    opt.to("numpy")
    run_steps(opt, ref, ours, theirs, rng, steps=3, tol=1e-12)  # the same trajectory as torch: state kept


def test_optimizer_to_moves_every_state_array_and_keeps_the_step_count():
    rng, ours, theirs = make_pair(11)
    opt = AdamW(ours, lr=1e-2)
    ref = torch.optim.AdamW(theirs, lr=1e-2)
    run_steps(opt, ref, ours, theirs, rng, steps=3, tol=1e-12)
    before = {i: {k: (to_numpy(a).copy() if hasattr(a, "shape") else a) for k, a in st.items()}
              for i, st in opt.state.items()}
    fakes = _foreign_state(opt)
    assert opt.to("numpy") is opt
    assert all(f.gets == 1 for f in fakes)
    for i, st in opt.state.items():
        assert st["step"] == before[i]["step"] == 3
        for k in ("exp_avg", "exp_avg_sq"):
            assert type(st[k]) is np.ndarray and np.array_equal(st[k], before[i][k])
    assert opt.to("numpy") is opt  # already there: nothing to move, values unchanged
    run_steps(opt, ref, ours, theirs, rng, steps=2, tol=1e-12)
    with pytest.raises(ValueError, match="unknown backend"):
        opt.to("tpu")


@pytest.mark.gpu
def test_state_follows_parameters_to_cupy():  # pragma: no cover - needs a GPU
    import cupy

    rng, ours, theirs = make_pair(12)
    opt = AdamW(ours, lr=1e-2)
    ref = torch.optim.AdamW(theirs, lr=1e-2)

    def steps(n, move):
        for _ in range(n):
            for p, t in zip(ours, theirs):
                g = rng.standard_normal(p.shape)  # shape of p
                p.grad = move(g)
                t.grad = torch.from_numpy(g.copy())
            opt.step()
            ref.step()
            for p, t in zip(ours, theirs):
                assert rel(p.data, t.detach().numpy()) < 1e-12

    steps(2, np.asarray)
    for p in ours:  # what model.to("cupy") does to each parameter
        p.data = cupy.asarray(to_numpy(p.data))
        p.grad = cupy.zeros(p.shape)  # shape of p
    with pytest.raises(ValueError, match="another backend"):
        opt.step()  # the state is still on the host: refused, nothing changed
    opt.to("cupy")
    steps(1, cupy.asarray)  # the moved state goes on as torch's
    assert all(isinstance(a, cupy.ndarray) for st in opt.state.values() for a in st.values() if hasattr(a, "shape"))
    opt.to("numpy")
    assert all(type(a) is np.ndarray for st in opt.state.values() for a in st.values() if hasattr(a, "shape"))
    for p in ours:
        p.data = to_numpy(p.data)
    steps(1, np.asarray)


# ------------------------------------------------------------------ schedule
TOTAL, WARM, BASE, MIN_RATIO = 100, 10, 3e-3, 0.1


def test_warmup_cosine_boundaries():
    lr = [warmup_cosine(s, TOTAL, WARM, BASE, MIN_RATIO) for s in range(TOTAL + 5)]
    assert lr[0] == pytest.approx(BASE / WARM, rel=1e-15)  # the first step already trains
    assert lr[WARM - 1] == pytest.approx(BASE, rel=1e-15)  # warm-up ends at the base rate
    for s in range(WARM):
        assert lr[s] == pytest.approx(BASE * (s + 1) / WARM, rel=1e-15)
    # the decay is min + (1 - min) (1 + cos(pi * progress)) / 2 with progress growing by equal steps from 0
    u = (np.array(lr[WARM:TOTAL]) / BASE - MIN_RATIO) / (1 - MIN_RATIO)  # in [0, 1]
    angle = np.arccos(np.clip(2 * u - 1, -1.0, 1.0))  # = pi * progress
    assert angle[0] == pytest.approx(0.0, abs=1e-7)
    assert np.allclose(np.diff(angle), angle[1] - angle[0], rtol=0, atol=1e-7)
    assert np.pi / len(angle) - 1e-9 <= angle[1] - angle[0] <= np.pi / (len(angle) - 1) + 1e-9
    for s in range(TOTAL, TOTAL + 5):  # the floor, and it stays there
        assert lr[s] == pytest.approx(MIN_RATIO * BASE, rel=1e-15)
    assert all(a < b for a, b in zip(lr[:WARM - 1], lr[1:WARM]))  # strictly increasing warm-up
    assert all(a >= b for a, b in zip(lr[WARM - 1:], lr[WARM:]))  # non-increasing afterwards
    assert min(lr) == pytest.approx(MIN_RATIO * BASE, rel=1e-15)


def test_warmup_cosine_without_warmup_starts_at_base():
    assert warmup_cosine(0, 50, 0, 1.0, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(50, 50, 0, 1.0, 0.0) == pytest.approx(0.0, abs=1e-15)


def test_warmup_cosine_last_step_is_the_floor():
    last = warmup_cosine(TOTAL - 1, TOTAL, WARM, BASE, MIN_RATIO)  # steps are 0-based
    assert last == pytest.approx(MIN_RATIO * BASE, rel=1e-12)


# ------------------------------------------------------------------ frozen parameters
@pytest.mark.parametrize("make", [lambda ps: AdamW(ps, lr=0.1, weight_decay=0.1),
                                  lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1)],
                         ids=["AdamW", "SGD"])
def test_frozen_parameters_get_no_state_and_never_change(make):
    rng = np.random.default_rng(7)
    frozen = Parameter(asarray(rng.standard_normal((6, 4))), trainable=False)
    live = Parameter(asarray(rng.standard_normal((6, 4))))
    before = to_numpy(frozen.data).copy()
    opt = make([frozen, live])
    assert opt.params == [live]
    for _ in range(3):
        frozen.grad = asarray(rng.standard_normal((6, 4)))  # even a stray gradient must not move it
        live.grad = asarray(rng.standard_normal((6, 4)))
        opt.step()
    assert np.array_equal(to_numpy(frozen.data), before)
    assert id(frozen) not in opt.state and id(live) in opt.state
    per_param = 2 if isinstance(opt, AdamW) else 1  # AdamW: two moments; SGD: one momentum buffer
    assert opt.state_nbytes() == per_param * to_numpy(live.data).nbytes


@pytest.mark.parametrize("cls", [AdamW, SGD])
def test_no_trainable_parameters_raises(cls):
    frozen = [Parameter(asarray(np.ones(3)), trainable=False)]
    with pytest.raises(ValueError, match="trainable"):
        cls(frozen, lr=0.1)
    with pytest.raises(ValueError, match="trainable"):
        cls([], lr=0.1)


def test_adamw_threaded_chunks_equal_the_plain_update():
    # over 2**20 values in all the CPU path cuts parameters into chunks on two threads; it must
    # compute what the plain per-parameter update computes, bit for bit (the same operations in the
    # same order, on cache-sized pieces), weight decay, bias correction and two parameter groups included
    from lora_from_scratch import optim
    from lora_from_scratch.nn import Parameter

    rng = np.random.default_rng(0)
    shapes = [(700, 1000), (1000, 401), (77,), (5, 3)]  # 1.1M values, chunk edges inside parameters
    params = [Parameter(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    plain = [p.data.copy() for p in params]
    moments = [[np.zeros_like(p.data), np.zeros_like(p.data)] for p in params]
    groups = [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]
    opt = optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.98), eps=1e-8)
    assert sum(p.data.size for p in params) >= optim._THREADED_ELEMENTS
    for t in range(1, 4):
        for i, p in enumerate(params):
            p.grad = rng.standard_normal(p.shape).astype(np.float32)
            g = opt.param_groups[0 if i < 2 else 1]
            optim._adamw_update(plain[i], p.grad, *moments[i], t, g)
        opt.step()
    for p, ref in zip(params, plain):
        np.testing.assert_array_equal(p.data, ref)
    assert not np.array_equal(params[0].data, plain[0] * 0)  # the update ran
