"""Tests of plots.py: every figure function runs, draws what it says, and make_all_figures writes PNGs.

The figures illustrate the papers (each docstring names its section); plots.py only draws, and the numbers it draws are
checked against the modules that compute them (memory, rank, quant, the model's forward pass).
"""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from lora_from_scratch import memory, plots, rank  # noqa: E402
from lora_from_scratch.backend import asarray, to_numpy  # noqa: E402
from lora_from_scratch.model import GPT, GPTConfig  # noqa: E402
from lora_from_scratch.quant import tables  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(matplotlib.text.Text)]


def _bars(ax) -> list:
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def _vertical_lines(ax) -> list[float]:
    """x positions of the full-height vertical lines (axvline) of an axes."""
    xs = []
    for line in ax.lines:
        x = np.asarray(line.get_xdata(), dtype=np.float64)
        y = np.asarray(line.get_ydata(), dtype=np.float64)
        if x.size == 2 and x[0] == x[1] and y[0] == 0 and y[1] == 1:
            xs.append(float(x[0]))
    return xs


def test_llm_sizes_one_bar_per_model():
    fig = plots.plot_llm_sizes()
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    bars = _bars(fig.axes[0])
    assert len(bars) == len(plots.LLM_SIZES) + 1
    widths = sorted(b.get_width() for b in bars)
    assert widths[0] == memory.full_parameters(memory.PRESETS["lfs-base"])  # our model is the smallest
    assert widths[-1] == 540e9  # PaLM
    assert fig.axes[0].get_xscale() == "log"
    # drawing into a given axes
    fig2, ax = plt.subplots()
    out = plots.plot_llm_sizes(ax=ax, include_ours=False)
    assert out is fig2 and len(_bars(ax)) == len(plots.LLM_SIZES)


def test_transformer_architecture_highlights_six_targets():
    fig = plots.plot_transformer_architecture()
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    orange = [p for p in ax.patches if matplotlib.colors.same_color(p.get_facecolor(), plots.TRAINABLE)]
    assert len(orange) == 6  # Wq, Wk, Wv, Wo, fc, proj
    texts = _texts(fig)
    for name in ("Wq", "Wk", "Wv", "Wo", "LayerNorm ln_1", "LayerNorm ln_2", "GELU"):
        assert name in texts
    assert any("fc" in t for t in texts) and any("proj" in t for t in texts)


def _tiny_model():
    from lora_from_scratch import data

    cfg = GPTConfig(vocab_size=data.VOCAB_SIZE, block_size=16, n_layer=2, n_head=2, n_embd=8)
    model = GPT(cfg, seed=0)
    idx = asarray(np.array([data.encode("sort:dcab>abcd")], dtype=np.int64))  # (1, 14)
    return model, idx


def test_attention_probabilities_match_a_direct_computation():
    model, idx = _tiny_model()
    maps = to_numpy(model.attention_probabilities(idx, layer=0))[0].astype(np.float64)  # (H, T, T)
    H, T = model.config.n_head, idx.shape[1]
    assert maps.shape == (H, T, T)
    # independent computation: softmax(q k^T / sqrt(hs) + causal mask) from the block's own layers
    block = model.blocks[0]
    x = model.wte.weight.data[idx] + model.wpe.weight.data[:T]  # (1, T, C)
    h = block.ln_1(x)  # (1, T, C)
    q = to_numpy(block.attn.q(h))[0].astype(np.float64)  # (T, C)
    k = to_numpy(block.attn.k(h))[0].astype(np.float64)  # (T, C)
    hs = q.shape[1] // H
    for head in range(H):
        qh, kh = q[:, head * hs:(head + 1) * hs], k[:, head * hs:(head + 1) * hs]  # (T, hs) each
        s = qh @ kh.T / np.sqrt(hs)  # (T, T)
        s[np.triu(np.ones((T, T), bool), k=1)] = -np.inf
        p = np.exp(s - s.max(axis=1, keepdims=True))  # (T, T)
        p /= p.sum(axis=1, keepdims=True)
        assert np.linalg.norm(maps[head] - p) / np.linalg.norm(p) < 1e-5  # float32 model
    assert np.allclose(maps.sum(axis=-1), 1.0, atol=1e-5)
    assert model.training  # the training mode is restored
    with pytest.raises(ValueError, match="layer"):
        model.attention_probabilities(idx, layer=5)


def test_plot_attention_heads_one_panel_per_head():
    model, idx = _tiny_model()
    fig = plots.plot_attention_heads(model, idx, layer=1)
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == model.config.n_head
    assert len(fig.axes) == model.config.n_head + 1  # + the colour bar
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert "".join(labels) == "sort:dcab>abcd"
    with pytest.raises(ValueError, match="labels"):
        plots.plot_attention_heads(model, idx, tokens=["a", "b"])


def test_lora_diagram_labels():
    fig = plots.plot_lora_diagram(d=32, k=24, r=2)
    assert len(fig.axes) == 2
    joined = "\n".join(_texts(fig))
    for word in ("frozen", "trainable", "B = 0 at init", "A ~ random"):
        assert word in joined
    assert f"{2 * (32 + 24):,}" in joined  # r (d + k) adapter numbers
    assert f"{32 * 24:,}" in joined  # d k frozen numbers
    orange = [p for ax in fig.axes for p in ax.patches
              if matplotlib.colors.same_color(p.get_facecolor(), plots.TRAINABLE)]
    assert len(orange) == 4  # A and B, in each panel
    with pytest.raises(ValueError, match="r="):
        plots.plot_lora_diagram(d=8, k=4, r=5)


def test_lora_impact_draws_the_calculator_and_the_paper():
    fig = plots.plot_lora_impact()
    assert len(fig.axes) == 3
    comp = memory.gpt3_comparison()
    expected = [
        ("full_parameters", "lora_parameters", 1.0),
        ("vram_full", "vram_lora", 1e9),
        ("checkpoint_full", "checkpoint_lora", 1.0),
    ]
    for ax, (full_key, lora_key, unit) in zip(fig.axes, expected):
        heights = [b.get_height() for b in _bars(ax)]
        assert len(heights) == 4
        ours = [comp[full_key][0] / unit, comp[lora_key][0] / unit]
        paper = [comp[full_key][1] / unit, comp[lora_key][1] / unit]
        assert heights == ours + paper
    assert any("9,251" in t for t in _texts(fig))


def test_quantization_levels_draws_16_lines_per_code():
    fig = plots.plot_quantization_levels(n_blocks=16, blocksize=64, n_show=8)
    assert len(fig.axes) == 4
    for ax, code in zip(fig.axes[:3], (tables.INT4_CODE, tables.NF4_CODE, tables.FP4_CODE)):
        xs = _vertical_lines(ax)
        assert len(xs) == 16
        assert sorted(xs) == sorted(float(v) for v in code)
        assert len(ax.patches) > 0  # the histogram
    bottom = fig.axes[3]
    scatters = [c for c in bottom.collections if isinstance(c, PathCollection)]
    assert len(scatters) == 4  # original + three codes
    assert all(len(c.get_offsets()) == 8 for c in scatters)
    assert any("NF4" in t for t in _texts(fig))


def test_quantize_roundtrip_is_nearest_level_within_half_a_step():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((8, 64)).astype(np.float32)  # (8, 64)
    absmax = np.abs(w).max(axis=1, keepdims=True)  # (8, 1)
    for name, code in (("nf4", tables.NF4_CODE), ("int4", tables.INT4_CODE), ("fp4", tables.FP4_CODE)):
        deq = plots.quantize_roundtrip(w, name, blocksize=64)  # (8, 64)
        assert deq.shape == w.shape
        levels = np.unique(code.astype(np.float64))  # (K,)
        # every dequantized value is a level times its block's absmax, and the nearest one
        scaled = w / absmax  # (8, 64)
        nearest = levels[np.abs(scaled[..., None] - levels).argmin(axis=-1)]  # (8, 64)
        assert np.max(np.abs(deq - nearest * absmax)) < 1e-5


def test_singular_values_plot_shows_the_spectrum():
    rng = np.random.default_rng(0)
    low = rng.standard_normal((20, 3)) @ rng.standard_normal((3, 15))  # (20, 15), rank 3
    full = rng.standard_normal((20, 15))  # (20, 15)
    fig = plots.plot_singular_values([low, full], ["low", "full"])
    assert len(fig.axes) == 2
    assert [len(ax.lines) for ax in fig.axes] == [2, 2]
    s = np.linalg.svd(full, compute_uv=False)  # (15,)
    y = np.asarray(fig.axes[0].lines[1].get_ydata())
    assert np.linalg.norm(y - s / s[0]) / np.linalg.norm(s / s[0]) < 1e-12
    energy = np.asarray(fig.axes[1].lines[0].get_ydata())
    assert abs(energy[2] - 1.0) < 1e-12 and energy[1] < 1.0  # rank 3: three directions keep everything
    for r in range(1, 16):  # the curve is rank.energy_kept at every r (float64 input: to 1e-12)
        assert abs(energy[r - 1] - rank.energy_kept(low, r)) < 1e-12
    fig1 = plots.plot_singular_values([full], energy=False)
    assert len(fig1.axes) == 1
    with pytest.raises(ValueError, match="labels"):
        plots.plot_singular_values([low, full], ["only one"])


def test_subspace_similarity_heatmap_draws_the_rank_table():
    rng = np.random.default_rng(1)
    A1 = rng.standard_normal((4, 30))  # (4, 30)
    # A2 holds A1's rows (scaled up, its four largest directions) and four small random rows
    A2 = np.vstack([3 * A1, 0.1 * rng.standard_normal((4, 30))])  # (8, 30)
    phi = to_numpy(rank.subspace_similarity_matrix(A1, A2))  # (4, 8)
    fig = plots.plot_subspace_similarity(A1, A2, labels=("r=4", "r=8"))
    assert len(fig.axes) == 2  # heatmap + colour bar
    images = [im for im in fig.axes[0].get_children() if isinstance(im, AxesImage)]
    assert len(images) == 1 and np.array_equal(images[0].get_array(), phi)
    assert phi.shape == (4, 8)
    assert phi[3, 3] > 0.99  # the top-4 subspaces nearly coincide (the small rows tilt them a little)
    assert phi[3, 7] > 1 - 1e-12  # A2's eight directions span A1's four exactly
    assert "Subspace similarity φ(r=4, r=8, i, j)" in _texts(fig)
    # float32 inputs are drawn from the same float64 table
    fig32 = plots.plot_subspace_similarity(A1.astype(np.float32), A2.astype(np.float32), max_i=2, max_j=3)
    drawn = [im for im in fig32.axes[0].get_children() if isinstance(im, AxesImage)][0].get_array()
    assert drawn.shape == (2, 3) and np.max(np.abs(drawn - phi[:2, :3])) < 1e-5  # float32 rounding of A
    with pytest.raises(ValueError, match="columns"):
        plots.plot_subspace_similarity(A1, rng.standard_normal((3, 29)))


def test_training_curves():
    def history(seed, n=40):
        rng = np.random.default_rng(seed)
        return {
            "step": list(range(n)),
            "loss": list(2.0 * np.exp(-np.arange(n) / 10) + 0.1 * rng.random(n)),
            "eval": [(s, {"copy": s / n, "desc": s / (2 * n)}) for s in (10, 20, 40)],
        }

    fig = plots.plot_training_curves({"lora": history(0), "full": history(1)}, smooth=5)
    assert len(fig.axes) == 2
    ax_loss, ax_eval = fig.axes
    assert len(ax_loss.lines) == 4  # raw + smoothed per run
    assert len(ax_eval.lines) == 4  # two tasks per run
    assert list(ax_eval.lines[0].get_xdata()) == [10, 20, 40]
    smoothed = np.asarray(ax_loss.lines[1].get_ydata())
    raw = np.asarray(history(0)["loss"])
    assert abs(smoothed[-1] - raw[-5:].mean()) < 1e-12
    with pytest.raises(ValueError, match="non-empty"):
        plots.plot_training_curves({})


def test_make_all_figures_writes_pngs(tmp_path):
    paths = plots.make_all_figures(str(tmp_path))
    assert [p.rsplit("/", 1)[-1] for p in paths] == list(plots.FIGURES)
    for p in paths:
        with open(p, "rb") as f:
            head = f.read(8)
            f.seek(0, 2)
            size = f.tell()
        assert head == PNG_MAGIC, p
        assert size > 20_000, (p, size)
    assert plt.get_fignums() == []  # every figure was closed


def test_plots_only_draw_and_share_no_private_names():
    """No figure module imports an experiment (the data comes in as arguments) or another module's private name."""
    import ast
    from pathlib import Path

    folder = Path(plots.__file__).parent
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                assert "experiments" not in module, f"{path.name} imports {module}"
                if node.level:
                    private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__future__"]
                    assert not private, f"{path.name} imports {private} from {module or '.'}"
