"""The findings of notebooks 1-3 at test scale, and the figure functions they use (``plots.rank_and_math``).

Notebook 1 (LoRA, Hu et al., 2021, sections 1, 2 and 4.2): the measured training state of full
fine-tuning, a subset and PEFT, and the GPT-3 fractions (2r/d for one matrix, r/(3d) for Wq and Wv
in a block, about 1/9,250 for the whole model: the paper's "10,000 times"). Notebook 2 (section 4.1,
7.2 and 7.3; Aghajanyan et al., 2020; Eckart & Young, 1936): a full fine-tuning update is close to
low rank, correlates with W0 without following its top directions, and two LoRA seeds share top
directions. Notebook 3 (section 4.1, eq. 3): the merged layer (one matrix) against the two-path
forward, unmerge, parameter counts.

Every check is a relation with a stated tolerance, not a copied number; seeded and fast.
"""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lora_from_scratch import checkpoint, data, gradcheck, lora, memory, rank, train  # noqa: E402
from lora_from_scratch.lora import LoRALinear  # noqa: E402
from lora_from_scratch.nn import Linear  # noqa: E402
from lora_from_scratch.optim import AdamW  # noqa: E402
from lora_from_scratch.plots import rank_and_math  # noqa: E402

OURS, GPT3 = memory.PRESETS["lfs-base"], memory.PRESETS["gpt3-175b"]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ---------------------------------------------------------------- notebook 1
def test_gpt3_fractions_one_matrix_one_block_whole_model():
    d, r = GPT3.d_model, 4
    n_qv = memory.lora_trainable_parameters(GPT3, r, ("q", "v"))
    assert d * d / (r * 2 * d) == 1536  # one d x d matrix: 2r/d
    assert 12 * d * d / (n_qv / GPT3.n_layer) == 9216  # Wq, Wv against the block's 12 d^2: r/(3d)
    whole, paper = memory.gpt3_comparison(r=r, targets=("q", "v"))["trainable_reduction"]
    assert whole == memory.full_parameters(GPT3) / n_qv
    assert 1.0 < whole / 9216 < 1.01  # the rest of the model adds a little
    assert abs(whole / paper - 1) < 0.1  # the paper's "10,000 times" is this ratio, rounded


def test_gpt3_full_memory_brackets_the_paper():
    paper = memory.PAPER_GPT3["vram_full"]
    assert memory.training_memory(GPT3, "full", keep_gradients=False).total < paper
    assert paper < memory.training_memory(GPT3, "full").total


def _strategy_model(strategy):
    m = checkpoint.load_checkpoint(checkpoint.BASE_CHECKPOINT)
    if strategy == "last block":
        for name, p in m.named_parameters():
            p.trainable = name.startswith(f"blocks.{m.config.n_layer - 1}.")
    elif strategy == "biases":
        for name, p in m.named_parameters():
            p.trainable = name.endswith(".bias")
    elif strategy == "lora":
        lora.apply_lora(m, r=8, alpha=16, targets=("q", "v"), seed=0)
    return m


def test_freezing_removes_gradients_and_moments_but_not_activations():
    batch = data.make_batch(np.random.default_rng(1), 8, data.PRETRAIN_TASKS)  # (B, T) ids and targets
    steps, counts = {}, {}
    for strategy in ("full", "last block", "biases", "lora"):
        m = _strategy_model(strategy)
        counts[strategy] = lora.count_parameters(m)[0]
        steps[strategy] = memory.step_memory(m, AdamW(m.trainable_parameters(), lr=1e-3), batch)
    n_params = memory.full_parameters(OURS)
    assert counts["full"] == n_params
    base = checkpoint.load_checkpoint(checkpoint.BASE_CHECKPOINT)
    assert counts["biases"] == sum(p.size for name, p in base.named_parameters() if name.endswith(".bias"))
    assert counts["lora"] == memory.lora_trainable_parameters(OURS, 8, ("q", "v"))
    for strategy, step in steps.items():  # float32: one gradient and two moments per trainable value
        assert step["gradients"] == 4 * counts[strategy] and step["optimizer"] == 8 * counts[strategy]
    acts = [s["activations"] for s in steps.values()]
    assert max(acts) < 1.05 * min(acts)  # the backward runs through every layer in every strategy
    fig = rank_and_math.plot_training_state({f"{k} ({counts[k]:,d})": v for k, v in steps.items()})
    assert len(fig.axes[0].patches) == 4 * len(steps)  # one segment per part and strategy


def test_plot_training_state_refuses_rows_without_the_parts():
    with pytest.raises(ValueError, match="non-empty"):
        rank_and_math.plot_training_state({})
    with pytest.raises(ValueError, match="lacks"):
        rank_and_math.plot_training_state({"full": {"weights": 1, "gradients": 1}})


# ---------------------------------------------------------------- notebook 2
@pytest.fixture(scope="module")
def full_finetune():
    """The base model fine-tuned on desc, every weight trainable (10 steps): (W before, W after) per matrix."""
    model = checkpoint.load_checkpoint(checkpoint.BASE_CHECKPOINT)
    before = {name: p.data.astype(np.float64) for name, p in model.named_parameters()}  # copies, float64
    cfg = train.TrainConfig(steps=10, batch_size=16, lr=2e-3, warmup_steps=3, weight_decay=0.0, eval_every=0,
                            tasks=("desc",), seed=0)
    train.train(model, cfg, progress=False, eval_sets={})
    after = model.state_dict()
    return {name: (before[name], after[name].astype(np.float64)) for name in before
            if name.startswith("blocks.") and name.endswith(".weight") and before[name].ndim == 2}


def test_a_full_finetuning_update_has_low_intrinsic_rank(full_finetune):
    rng = np.random.default_rng(0)
    assert len(full_finetune) == OURS.n_layer * len(lora.TARGETS)
    for name, (W0, W1) in full_finetune.items():
        dW = W1 - W0  # (d, k)
        R = rng.standard_normal(dW.shape)  # (d, k)
        R *= np.linalg.norm(dW) / np.linalg.norm(R)  # the same Frobenius norm
        assert rank.matrix_rank(dW) == min(dW.shape), name  # numerically full rank, and yet:
        assert rank.energy_kept(dW, 8) > max(0.5, 2 * rank.energy_kept(R, 8)), name


def test_the_update_correlates_with_w0_without_following_its_top_directions(full_finetune):
    rng = np.random.default_rng(1)
    r = 4
    for i in range(OURS.n_layer):
        for kind in ("q", "v"):
            W0, W1 = full_finetune[f"blocks.{i}.attn.{kind}.weight"]
            U, _, Vt = np.linalg.svd(W1 - W0)  # (d, d), (k, k)
            U0, _, V0t = np.linalg.svd(W0)  # (d, d), (k, k)
            onto_dw = np.linalg.norm(U[:, :r].T @ W0 @ Vt[:r].T)  # (r, r): W0 in the update's top directions
            onto_top = np.linalg.norm(U0[:, :r].T @ W0 @ V0t[:r].T)  # (r, r): W0 in its own top directions
            randoms = []
            for _ in range(5):
                Qd, _ = np.linalg.qr(rng.standard_normal((W0.shape[0], r)))  # (d, r)
                Qk, _ = np.linalg.qr(rng.standard_normal((W0.shape[1], r)))  # (k, r)
                randoms.append(np.linalg.norm(Qd.T @ W0 @ Qk))  # (r, r)
            assert 2 * np.mean(randoms) < onto_dw < onto_top / 2, (i, kind)


def test_two_lora_seeds_share_top_directions():
    runs = {}
    for seed in (0, 1):
        m = checkpoint.load_checkpoint(checkpoint.BASE_CHECKPOINT)
        lora.apply_lora(m, r=8, alpha=16, targets=("q", "v"), seed=seed)
        cfg = train.TrainConfig(steps=20, batch_size=16, lr=5e-3, warmup_steps=3, eval_every=0, tasks=("desc",),
                                seed=seed)
        train.train(m, cfg, progress=False, eval_sets={})
        runs[seed] = lora.lora_layers(m)
    k = OURS.d_model
    phi = {i: np.mean([rank.subspace_similarity(runs[0][n].lora_A.data, runs[1][n].lora_A.data, i, i)
                       for n in runs[0]]) for i in (1, 8)}
    assert phi[1] > 10 / k  # ten times the random expectation max(i, j) / k
    assert phi[8] < phi[1]


def test_rank_r_error_figure_and_its_checks():
    W = np.random.default_rng(2).standard_normal((12, 9))  # (12, 9)
    errors = [np.linalg.norm(W - np.matmul(*rank.low_rank_approximation(W, r))) for r in range(1, 9)]
    fig = rank_and_math.plot_rank_r_error(W, errors)
    dots, line = fig.axes[0].lines
    s = rank.singular_values(W)  # (9,)
    assert np.allclose(line.get_ydata(), [np.sqrt(np.sum(s[r:] ** 2)) for r in range(1, 9)])
    assert np.allclose(dots.get_ydata(), line.get_ydata())  # Eckart-Young: measured = formula
    with pytest.raises(ValueError, match="one error per rank"):
        rank_and_math.plot_rank_r_error(W, errors + [0.0])


# ---------------------------------------------------------------- notebook 3
def _pretrained_wq(dtype):
    lin = checkpoint.load_checkpoint(checkpoint.BASE_CHECKPOINT).blocks[0].attn.q
    new = Linear(lin.in_features, lin.out_features, dtype=dtype)
    new.load_state_dict({name: p.astype(dtype) for name, p in lin.state_dict().items()})
    return new


@pytest.mark.parametrize("dtype, low, high", [("float32", 1e-9, 1e-6), ("float64", 0.0, 1e-13)])
def test_the_merged_matrix_agrees_with_the_two_path_forward(dtype, low, high):
    rng = np.random.default_rng(3)
    layer = LoRALinear(_pretrained_wq(dtype), r=4, alpha=8, rng=np.random.default_rng(0))
    W0 = layer.base.weight.data.copy()  # (d, k)
    layer.lora_B.data = (rng.standard_normal(layer.lora_B.shape) * 0.05).astype(dtype)  # (d, r), "trained"
    x = rng.standard_normal((4, 6, layer.in_features)).astype(dtype)  # (B, T, k)
    two_paths = layer(x)  # (B, T, d)
    assert gradcheck.rel_error(two_paths, layer.base(x) + layer.adapter(x)) < high
    layer.merge()
    merged = layer(x)  # (B, T, d): one product
    A, B, s = layer.lora_A.data, layer.lora_B.data, layer.scaling  # (r, k), (d, r)
    assert gradcheck.rel_error(layer.base.weight.data, W0 + s * (B @ A)) < high
    assert low <= gradcheck.rel_error(merged, two_paths) < high  # another computation: equal up to rounding
    if dtype == "float64":
        assert rank.matrix_rank(layer.base.weight.data - W0) == layer.r
        assert rank.matrix_rank(layer.base.weight.data) == min(W0.shape)
    layer.unmerge()
    assert np.abs(layer.base.weight.data - W0).max() <= np.spacing(np.abs(W0).max())


@pytest.mark.parametrize("r", [1, 4, 8])
def test_lora_parameter_count_is_r_d_plus_k_on_every_target(r):
    for targets in (("q", "v"), ("fc",), ("proj",), lora.TARGETS):
        m = checkpoint.load_checkpoint(checkpoint.BASE_CHECKPOINT)
        lora.apply_lora(m, r=r, alpha=2 * r, targets=targets, seed=0)
        trainable, total = lora.count_parameters(m)
        shapes = memory.target_shapes(OURS)
        assert trainable == OURS.n_layer * sum(r * sum(shapes[t]) for t in targets)
        assert trainable == memory.lora_trainable_parameters(OURS, r, targets)
        assert total == memory.full_parameters(OURS) + trainable
