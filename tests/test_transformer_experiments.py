"""Notebook 6's experiments and helpers: LoRA (Hu et al., 2021), section 7.1 (Table 5), 7.2 (Table 6, Figure 3), 7.3.

Each experiment is re-run at its "test" scale and its finding asserted as a relation (not a
number): spreading the budget over four attention matrices beats putting it all into Wq; a rank
of 8 beats a rank of 1 on Wq+Wv; the top direction of A at a small and a large rank is shared far
beyond chance, while W's part in dW's directions lies between a random matrix's and W's own top
directions, and the amplification factor falls as r grows. The helpers (the budget's rank, the
projection of section 7.3) are checked on answers known in closed form.
"""

import matplotlib
import numpy as np
import pytest

from lora_from_scratch import checkpoint, experiments, lora, rank
from lora_from_scratch.exercises import nb06
from lora_from_scratch.experiments import update_subspaces as us
from lora_from_scratch.experiments import which_matrices as wm
from lora_from_scratch.memory import PRESETS, lora_trainable_parameters

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def which():
    return experiments.run("which_matrices", scale="test", progress=False)


@pytest.fixture(scope="module")
def sweep():
    return experiments.run("rank_sweep", scale="test", progress=False)


@pytest.fixture(scope="module")
def subspaces():
    return experiments.run("update_subspaces", scale="test", progress=False)


# ---------------------------------------------------------------- the budget (section 7.1)
def test_the_budget_gives_the_papers_ranks_and_the_nearest_rank_on_the_mlp():
    assert wm.BUDGET == 4 * 8 * (128 + 128)
    assert [wm.budget_rank(wm.BUDGET, t) for t in wm.PAPER_CONFIGS] == [8, 8, 8, 8, 4, 4, 2]  # Table 5's ranks
    assert wm.budget_rank(wm.BUDGET, ["fc"]) == 3  # 8192 / (4 * 640) = 3.2
    assert wm.budget_rank(wm.BUDGET, ["fc", "proj"]) == 2  # 1.6
    assert wm.budget_rank(wm.BUDGET, list(wm.TARGETS)) == 1  # 0.89: one rank is the least there is
    gpt3 = PRESETS["gpt3-175b"]  # the paper's 18M: r = 8 on one matrix, 4 on two, 2 on four
    budget = lora_trainable_parameters(gpt3, 8, ("q",))
    assert wm.budget_rank(budget, ("q", "v"), gpt3) == 4 and wm.budget_rank(budget, ("q", "k", "v", "o"), gpt3) == 2
    assert nb06.budget_rank(budget, [(12288, 12288)] * 4, 96) == 2
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="budget"):
            wm.budget_rank(bad, ["q"])


def test_which_matrices_spreading_the_budget_beats_one_matrix(which):
    configs = which["configs"]
    assert {k: c["parameters"] for k, c in configs.items()} == {"q": wm.BUDGET, "q+k+v+o": wm.BUDGET}
    for c in configs.values():
        row = which["runs"][wm.key(c["targets"])][f"{c['best_lr']:g}"][0]
        assert row["parameters"] == c["parameters"]  # the model's trainable count is the calculator's
    assert configs["q+k+v+o"]["held_out_loss"]["mean"] < configs["q"]["held_out_loss"]["mean"]
    assert which["ranking"][0] == "q+k+v+o"


# ---------------------------------------------------------------- the rank (section 7.2, Table 6)
def test_rank_sweep_rank_eight_beats_rank_one_on_wq_wv(sweep):
    ranks = sweep["sweeps"]["q+v"]["ranks"]
    assert ranks["8"]["held_out_loss"]["mean"] < ranks["1"]["held_out_loss"]["mean"]
    assert ranks["8"]["parameters"] == 8 * ranks["1"]["parameters"]


# ---------------------------------------------------------------- Figure 3 and section 7.3
def test_the_top_direction_is_shared_far_beyond_chance(subspaces):
    sim = subspaces["similarity"]
    k = sim["k"]
    for m in ("q", "v"):
        trained, start = np.asarray(sim["mean"][m]), np.asarray(sim["at_step_0"][m])  # (r1, r2)
        assert trained[0, 0] > 20 / k  # phi(1, 1): random subspaces give 1 / k on average
        assert start[0, 0] < 10 / k  # before training: random (the two ranks have their own draws)
        assert np.all((trained >= -1e-9) & (trained <= 1 + 1e-9))


def test_w_in_the_directions_of_dw_lies_between_random_and_ws_own(subspaces):
    table = subspaces["table7_mean"]
    for r, by_matrix in table.items():
        for m, row in by_matrix.items():
            assert row["random"] < row["dW"] < row["W"] <= row["W_norm"] + 1e-9, (r, m, row)
    for m in ("q", "v"):
        assert table["4"][m]["amplification"] > 2 * table["64"][m]["amplification"]


def test_same_seed_would_make_the_small_rank_a_slice_of_the_large_one():
    # why update_subspaces gives each rank its own init seed: one generator seeded alike draws block 0's A_8 as the
    # first 8 rows of A_64, and phi(A_8, A_64, 8, 64) is 1 before any training
    A = {}
    for r in (8, 64):
        model = lora.apply_lora(checkpoint.load_checkpoint(checkpoint.BASE_CHECKPOINT), r, 16, ["q"], seed=0)
        A[r] = np.asarray(lora.lora_layers(model)["blocks.0.attn.q"].lora_A.data)  # (r, 128)
    assert np.array_equal(A[8], A[64][:8])
    assert rank.subspace_similarity(A[8], A[64], 8, 64) == pytest.approx(1.0, abs=1e-6)


def test_projection_table_on_known_answers():
    rng = np.random.default_rng(0)
    d = 12
    U, _ = np.linalg.qr(rng.standard_normal((d, d)))  # (d, d) orthogonal
    V, _ = np.linalg.qr(rng.standard_normal((d, d)))  # (d, d)
    s = np.linspace(10.0, 0.5, d)  # (d,) descending singular values
    W = (U * s) @ V.T  # (d, d) = U diag(s) V^T
    dW = 3.0 * np.outer(U[:, -1], V[:, -1])  # (d, d): rank 1 along W's weakest direction
    row = us.projection_table(W, dW, 1, rng, random_draws=4)
    assert row["dW"] == pytest.approx(s[-1])  # U^T W V picks W's singular value in that direction
    assert row["W"] == pytest.approx(s[0])
    assert row["amplification"] == pytest.approx(3.0 / s[-1])
    assert row["W_norm"] == pytest.approx(np.sqrt(np.sum(s**2))) and row["dW_norm"] == pytest.approx(3.0)
    assert us.amplification_factor(W, dW, 1) == pytest.approx(3.0 / s[-1])  # ||dW||_F / sigma in dW's direction
    with pytest.raises(ValueError, match="same shape"):
        us.projection_table(W, dW[:, :5], 1, rng)
    with pytest.raises(ValueError, match="r <= min"):
        us.top_singular(W, 0)


def test_random_directions_see_r_over_sqrt_dk_of_w():
    # E ||U^T W V||_F^2 = r^2 ||W||_F^2 / (d k) for U, V random: the paper's third column (0.02 at r = 4 on GPT-3)
    rng = np.random.default_rng(1)
    W = rng.standard_normal((40, 30))  # (d, k)
    row = us.projection_table(W, rng.standard_normal((40, 3)) @ rng.standard_normal((3, 30)), 3, rng, 400)
    expected = 3 * np.linalg.norm(W) / np.sqrt(40 * 30)
    assert row["random"] == pytest.approx(expected, rel=0.1)


def test_random_similarity_is_max_ij_over_k():
    rng = np.random.default_rng(2)
    k, r1, r2 = 32, 3, 6
    tables = [np.asarray(rank.subspace_similarity_matrix(rng.standard_normal((r1, k)), rng.standard_normal((r2, k))))
              for _ in range(400)]  # (r1, r2) each
    np.testing.assert_allclose(np.mean(tables, axis=0), us.random_similarity(r1, r2, k), atol=0.02)
    A1, A2 = rng.standard_normal((4, 10)), rng.standard_normal((4, 10))  # (4, 10) each
    _, _, V1t = np.linalg.svd(A1, full_matrices=False)  # (4, 10): rows are the right-singular vectors
    _, _, V2t = np.linalg.svd(A2, full_matrices=False)  # (4, 10)
    phi = np.sum((V1t[:2] @ V2t[:3].T) ** 2) / 2  # (2, 10) @ (10, 3) -> (2, 3): eq. (4), i = 2, j = 3
    assert rank.subspace_similarity(A1, A2, 2, 3) == pytest.approx(phi)


# ---------------------------------------------------------------- figures
def test_each_experiment_draws_its_result(which, sweep, subspaces):
    import matplotlib.pyplot as plt

    for name, result in (("which_matrices", which), ("rank_sweep", sweep), ("update_subspaces", subspaces)):
        fig = experiments.get(name).plot(result)
        assert isinstance(fig, matplotlib.figure.Figure) and fig.axes
        plt.close(fig)
