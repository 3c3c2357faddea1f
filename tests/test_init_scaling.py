"""Notebooks 4 and 5: how LoRA starts (Hu et al., 2021, section 4.1; PiSSA, Meng et al., 2024, section 3) and how
its update is scaled (alpha / r; rsLoRA, Kalajdzievski, 2023: alpha / sqrt(r)).

The two experiments are re-run at their "test" scale and their findings asserted as relations (an
ordering, a slope with a stated tolerance), never as hard-coded numbers; the helpers the notebooks
use are tested on small cases with known answers.
"""

import math

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from lora_from_scratch import experiments, lora  # noqa: E402
from lora_from_scratch.experiments import init_curves, lr_rank_grid  # noqa: E402
from lora_from_scratch.plots import init as init_plots  # noqa: E402
from lora_from_scratch.plots import scaling as scaling_plots  # noqa: E402


# ---------------------------------------------------------------- init_curves
@pytest.fixture(scope="module")
def init_result():
    return experiments.run("init_curves", scale="test", progress=False)


def test_pissa_starts_fastest_and_kaiming_slowest(init_result):
    # the committed full run: early loss PiSSA < Gaussian (std 1/r) < kaiming-uniform (std 1/sqrt(3k))
    assert init_curves.order_by(init_result, "early_loss") == ["pissa", "gaussian", "kaiming"]
    S = init_result["summary"]
    # a larger A (Gaussian std 1/r = 0.125 against kaiming's 1/sqrt(3 k) <= 0.051) is a larger early step:
    # every init seed of the Gaussian is ahead of every init seed of kaiming
    assert S["gaussian"]["early_loss"]["max"] < S["kaiming"]["early_loss"]["min"]


def test_init_curves_result_is_complete(init_result):
    settings = init_result["settings"]
    assert len(init_result["runs"]["pissa"]) == 1  # PiSSA has no random draw: one run
    assert len(init_result["runs"]["gaussian"]) == len(settings["init_seeds"])
    for rows in init_result["runs"].values():
        for row in rows:
            assert len(row["loss"]) == settings["steps"] and 0.0 <= row["exact_match"] <= 1.0
    phi = init_result["similarity"]
    assert len(phi["random subspaces"]) == settings["r"]
    assert all(0.0 <= v <= 1.0 for values in phi.values() for v in values)
    assert init_plots.plot_init_curves(init_result) is not None


def test_the_uniform_start_at_std_one_over_r_has_that_std():
    model = init_curves.adapted_model("uniform-1/r", r=8, alpha=16, init_seed=0)
    A = model.blocks[0].mlp.proj.lora_A.data  # (8, 512)
    assert abs(A.std() * 8 - 1) < 0.05 and np.abs(A).max() <= math.sqrt(3) / 8 + 1e-6
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        init_curves.adapted_model("xavier", 8, 16, 0)


def test_row_and_column_spread():
    rng = np.random.default_rng(0)
    row = rng.standard_normal((1, 6))
    assert init_curves.row_spread(np.tile(row, (3, 1))) == 0.0
    assert init_curves.row_spread(np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(math.sqrt(2))
    with pytest.raises(ValueError, match="at least two rows"):
        init_curves.row_spread(row)
    with pytest.raises(ValueError, match="first row of A is zero"):
        init_curves.row_spread(np.zeros((2, 3)))


def test_gradient_share_is_one_inside_and_zero_outside_the_row_space():
    rng = np.random.default_rng(1)
    G = np.zeros((5, 6))
    G[:, :2] = rng.standard_normal((5, 2))  # G lives on the first two input coordinates
    inside = np.eye(6)[:2] * 3.0  # (2, 6): rows span exactly those coordinates
    outside = np.eye(6)[2:4]  # (2, 6): orthogonal to them
    assert init_curves.gradient_share(G, inside) == pytest.approx(1.0)
    assert init_curves.gradient_share(G, outside) == pytest.approx(0.0, abs=1e-12)
    shares = [init_curves.gradient_share(rng.standard_normal((8, 64)), rng.standard_normal((4, 64)))
              for _ in range(200)]
    assert abs(np.mean(shares) / math.sqrt(4 / 64) - 1) < 0.1  # a random row space sees about sqrt(r / k)
    with pytest.raises(ValueError, match="same k"):
        init_curves.gradient_share(G, np.ones((2, 5)))


def test_identical_rows_stay_identical_and_frozen_a_does_not_move():
    watched = {}
    for rows in ("identical", "frozen"):
        model = init_curves.start_with_rows(rows, r=3, alpha=16, seed=0)
        A0 = model.blocks[1].attn.v.lora_A.data.copy()
        _, seen = init_curves.train_and_watch(model, steps=4, batch_size=8, lr=3e-3, every=2,
                                              watch=init_curves.symmetry_watch)
        watched[rows] = seen
        assert [step for step, _ in seen] == [0, 2, 4]
        if rows == "frozen":
            assert np.array_equal(model.blocks[1].attn.v.lora_A.data, A0)
            assert seen[-1][1]["B columns"] > 0.0  # B learns, its columns apart
        else:
            assert all(v["A rows"] == 0.0 and v["B columns"] == 0.0 for _, v in seen)
            assert all(lora.lora_layers(model)[n].delta_weight().any() for n in ("blocks.0.attn.q",))
    spectra = {rows: np.array([1.0, 0.5, 0.1]) for rows in watched}
    assert init_plots.plot_symmetry(watched, spectra) is not None
    with pytest.raises(ValueError, match="unknown rows"):
        init_curves.start_with_rows("diagonal")


def test_plot_gradient_share_draws():
    fig = init_plots.plot_gradient_share({"Gaussian A": [0.2, 0.25, 0.3]}, expected=0.25, best=0.9)
    assert fig.axes


# ---------------------------------------------------------------- the scaling
@pytest.fixture(scope="module")
def grid_result():
    return experiments.run("lr_rank_grid", scale="test", progress=False)


def test_the_best_lr_stays_put_with_alpha_over_r_and_falls_with_rslora(grid_result):
    # the committed full grid: alpha / r's best lr is the same from r = 2 to 64, rsLoRA's falls with r
    settings, grids = grid_result["settings"], grid_result["grids"]
    ranks, lrs = settings["ranks"], settings["lrs"]
    best = grid_result["best_lr"]
    assert best["alpha/r"][0] == best["alpha/r"][-1]  # r = 1 and r = 64 prefer the same of the two lrs
    assert best["alpha/sqrt(r)"][-1] < best["alpha/sqrt(r)"][0]  # rsLoRA at r = 64 prefers the smaller one
    # at r = 1 both scalings are s = alpha: the very same runs
    for lr in lrs:
        assert grids["alpha/r"][f"1,{lr:g}"] == {**grids["alpha/sqrt(r)"][f"1,{lr:g}"],
                                                "seconds": grids["alpha/r"][f"1,{lr:g}"]["seconds"]}
    # at the small lr, rsLoRA's larger s (2 against 0.25 at r = 64) learns faster and moves further
    small, r = min(lrs), max(ranks)
    rs, lo = grids["alpha/sqrt(r)"][f"{r},{small:g}"], grids["alpha/r"][f"{r},{small:g}"]
    assert rs["held_out_loss"] < lo["held_out_loss"] and rs["update_norm"] > lo["update_norm"]
    assert grid_result["findings"][1].startswith("best lr per rank with alpha/r")
    assert scaling_plots.plot_lr_rank_grid(grid_result) is not None


def test_grid_summaries():
    grid = {"1,0.001": {"exact_match": 0.6}, "1,0.01": {"exact_match": 0.4},
            "2,0.001": {"exact_match": 0.7}, "2,0.01": {"exact_match": 0.0}}
    assert lr_rank_grid.learning_lrs({"a": grid}, [1, 2], [1e-3, 1e-2]) == [1e-3]
    assert lr_rank_grid.largest_working_lr(grid, [1, 2], [1e-3, 1e-2]) == 1e-3
    assert lr_rank_grid.largest_working_lr(grid, [1, 2], [1e-2]) is None
    sizes = {"s": {1: [(0, 0.0), (1, 1.0)], 4: [(0, 0.0), (1, 2.0)]}}
    assert lr_rank_grid.size_slope(sizes, "s", 1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least two ranks"):
        lr_rank_grid.size_slope({"s": {1: [(1, 1.0)]}}, "s", 1)


def test_scaled_models_have_the_named_scaling():
    for scaling, want in (("alpha/r", 16 / 4), ("alpha/sqrt(r)", 16 / 2), ("none (s = 1)", 1.0)):
        model = lr_rank_grid.scaled_model(4, 16, scaling)
        assert {layer.scaling for layer in lora.lora_layers(model).values()} == {want}
    with pytest.raises(ValueError, match="unknown scaling"):
        lr_rank_grid.scaled_model(4, 16, "alpha")


def test_early_update_size_grows_like_sqrt_r_times_s():
    # one Adam step from B = 0 moves every entry of B by the learning rate: ||B A|| ~ sqrt(r), so
    # ||s B A|| ~ r^(-1/2) with alpha / r, r^0 with alpha / sqrt(r), r^(1/2) with s = 1 (for r << k)
    sizes = lr_rank_grid.update_sizes([1, 64], steps=1, every=1, batch_size=8)
    predicted = {"alpha/r": 64 ** -0.5, "alpha/sqrt(r)": 1.0, "none (s = 1)": 64 ** 0.5}
    for scaling, per_rank in sizes.items():
        ratio = dict(per_rank[64])[1] / dict(per_rank[1])[1]
        assert 1 / 1.5 < ratio / predicted[scaling] < 1.5, (scaling, ratio)
        assert dict(per_rank[1])[0] == 0.0  # B = 0 at step 0
    assert scaling_plots.plot_update_sizes(sizes) is not None


def test_tuning_alpha_is_tuning_the_learning_rate_with_adam():
    # Hu et al., 2021, section 4.1: with Adam, (alpha, lr, A) and (4 alpha, lr / 2, A / 2) train alike
    a = lr_rank_grid.finetune_curve(4, 16, 2e-3, steps=8, batch_size=8, exact_adam=True)["loss"]
    b = lr_rank_grid.finetune_curve(4, 64, 1e-3, a_scale=0.5, steps=8, batch_size=8, exact_adam=True)["loss"]
    c = lr_rank_grid.finetune_curve(4, 64, 2e-3, steps=8, batch_size=8, exact_adam=True)["loss"]
    assert np.max(np.abs(np.subtract(a, b))) < 1e-4
    assert np.max(np.abs(np.subtract(a, c))) > 1e-2  # alpha alone is not the same run
    assert scaling_plots.plot_loss_curves({"a": a, "b": b}) is not None


def test_best_lrs_take_the_lowest_score_and_skip_diverged_runs():
    cells = {"1,0.001": {"held_out_loss": 0.5}, "1,0.01": {"held_out_loss": 0.2},
             "2,0.001": {"held_out_loss": 0.3}, "2,0.01": {"held_out_loss": None}}
    assert lr_rank_grid.best_lrs(cells, [1, 2], [1e-3, 1e-2]) == [1e-2, 1e-3]
