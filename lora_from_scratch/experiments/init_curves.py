"""How LoRA starts: fine-tuning curves of the paper's Gaussian A, the libraries' kaiming-uniform A and PiSSA.

LoRA (Hu et al., 2021), section 4.1: "We use a random Gaussian initialization for A and zero for
B, so dW = BA is zero at the beginning of training." The paper gives no standard deviation; PEFT's
``init_lora_weights="gaussian"`` takes 1/r (``init="gaussian"`` here), while PEFT's and loralib's
default draws A from kaiming-uniform, U(-1/sqrt(k), 1/sqrt(k)) (``init="kaiming"``). PiSSA (Meng
et al., 2024, section 3) starts the adapter on the top r singular triplets of W0 and freezes the
residual instead.

Every run fine-tunes the shipped base model on "desc" with LoRA on all six matrices, the same r,
alpha, learning rate and batches (data seed 0); only the adapter's start differs. The random
inits are drawn with several *init seeds*, so the spread between seeds is the spread that the
random draw of A alone causes. One more random start, ``"uniform-1/r"``, is kaiming's uniform
shape rescaled to the Gaussian's standard deviation 1/r: it tells the shape of A's distribution
(Gaussian or uniform) apart from its scale.

Besides the curves (loss per step, exact match on 128 held-out rows) the run measures how alike
the *learned* updates of two different random starts are: the LoRA paper's subspace similarity
phi(i, i) (section 7.2, eq. 4; Figure 4 compares two random seeds) between the top-i input
directions of the change s B A - (s B A at step 0) of two init seeds, for i = 1 .. r, averaged
over the adapted matrices, next to its value for two independent random subspaces (i / k). A
value far above that says that training finds the same directions whatever random A it starts
from; a value near it, that each start finds its own.

Helpers for notebook 4 live here too: ``gradient_share`` (how much of a weight gradient the row
space of A sees, section 4.1's "random projection to a smaller subspace"), ``start_with_rows``
(random, frozen or identical rows of A), ``row_spread`` / ``symmetry_watch`` (how far apart the
rows of A and the columns of B are) and ``train_and_watch`` (the library's training loop with a
measurement every few steps).
"""

from __future__ import annotations

import numpy as np

from .. import data, rank, train
from ..adapter import TARGETS
from ..backend import to_numpy
from ..lora import lora_layers
from ..methods import adapt
from .common import base_model, desc_config, eval_sets, progress_bar, spread

TITLE = "Initialization: Gaussian A, kaiming-uniform A and PiSSA on the fine-tuning task"
PAPER = ("LoRA (Hu et al., 2021), section 4.1 (A Gaussian, B = 0) and section 7.2 (eq. 4, Figure 4: two random "
         "seeds); PiSSA (Meng et al., 2024), section 3")

INIT_NAMES = {
    "gaussian": "Gaussian A, std 1/r (the paper; PEFT's 'gaussian')",
    "kaiming": "kaiming-uniform A (PEFT's default)",
    "uniform-1/r": "uniform A rescaled to std 1/r",
    "pissa": "PiSSA (top-r SVD of W0)",
}
RANDOM = ("gaussian", "kaiming", "uniform-1/r")

SCALES = {
    "full": {"inits": ["gaussian", "kaiming", "uniform-1/r", "pissa"], "init_seeds": [0, 1, 2], "r": 8,
             "alpha": 16, "lr": 3e-3, "steps": 150, "batch_size": 32, "data_seed": 0, "eval_rows": 128},
    "slice": {"inits": ["gaussian", "kaiming", "pissa"], "init_seeds": [0], "r": 8, "alpha": 16, "lr": 3e-3,
              "steps": 40, "batch_size": 16, "data_seed": 0, "eval_rows": 64},
    "test": {"inits": ["gaussian", "kaiming", "pissa"], "init_seeds": [0, 1], "r": 8, "alpha": 16, "lr": 3e-3,
             "steps": 20, "batch_size": 16, "data_seed": 0, "eval_rows": 16},
}


def _rescale_to_std(model, std: float) -> None:
    """Multiply every adapter's A so that its standard deviation is ``std`` (kaiming-uniform's shape kept)."""
    for layer in lora_layers(model).values():
        A = layer.lora_A
        bound = 1.0 / np.sqrt(A.shape[1])  # kaiming-uniform's bound 1/sqrt(k): std = bound / sqrt(3)
        A.data = A.data * (std * np.sqrt(3.0) / bound)  # (r, k), same draws, new scale


def adapted_model(init: str, r: int, alpha: float, init_seed: int, targets=TARGETS):
    """The base model with LoRA adapters started as ``init`` says (one of ``INIT_NAMES``)."""
    if init not in INIT_NAMES:
        raise ValueError(f"unknown init {init!r}; inits: {list(INIT_NAMES)}")
    model = base_model()
    adapt(model, "lora", r, alpha, targets, seed=init_seed, init="kaiming" if init == "uniform-1/r" else init)
    if init == "uniform-1/r":
        _rescale_to_std(model, 1.0 / r)
    return model


def learned_updates(model, start: dict) -> dict:
    """name -> the change s B A - (s B A at step 0) of every adapted matrix, float64 on the host: (d, k) each."""
    return {name: to_numpy(layer.delta_weight()).astype(np.float64) - start[name]  # (d, k) - (d, k)
            for name, layer in lora_layers(model).items()}


def finetune_from(init: str, init_seed: int, settings: dict, evals) -> tuple[dict, dict]:
    """One fine-tune on "desc"; returns (measurements, learned updates by layer)."""
    model = adapted_model(init, settings["r"], settings["alpha"], init_seed)
    start = {name: to_numpy(layer.delta_weight()).astype(np.float64)  # (d, k): 0, or PiSSA's top-r part of W0
             for name, layer in lora_layers(model).items()}
    cfg = desc_config(settings["steps"], settings["batch_size"], settings["lr"], settings["data_seed"])
    hist = train.train(model, cfg, progress=False, eval_sets=evals)
    loss = [round(v, 5) for v in hist["loss"]]
    tail = loss[-10:]
    out = {"loss": loss, "final_loss": sum(tail) / len(tail),
           "exact_match": hist["eval"][-1][1][data.FINETUNE_TASK], "seconds": round(hist["seconds"], 2)}
    return out, learned_updates(model, start)


def mean_similarity(updates1: dict, updates2: dict, r: int) -> list[float]:
    """phi(dW1, dW2, i, i) for i = 1 .. r, the mean over layers: how alike the top-i input directions of two updates."""
    tables = [rank.subspace_similarity_matrix(updates1[n], updates2[n], r, r) for n in updates1]  # (r, r) each
    return [float(v) for v in np.mean([np.diag(t) for t in tables], axis=0)]  # (r,)


def early_loss(loss) -> float:
    """The mean loss from the end of the warm-up (the first tenth) to 3/10 of training: how fast a run starts."""
    n = len(loss)
    lo, hi = n // 10, max(n // 10 + 1, (3 * n) // 10)
    return float(np.mean(loss[lo:hi]))  # (hi - lo,) -> scalar


# ---------------------------------------------------------------- helpers for notebook 4
def row_spread(A) -> float:
    """How far the rows of A (r, k) are from all being equal: max_i ||A_i - A_0|| / ||A_0|| (0: identical rows)."""
    A = to_numpy(A).astype(np.float64)  # (r, k) on the host
    if A.ndim != 2 or A.shape[0] < 2:
        raise ValueError(f"row_spread needs a matrix with at least two rows, got shape {A.shape}")
    norm = np.linalg.norm(A[0])  # (k,) -> scalar
    if norm == 0.0:
        raise ValueError("row_spread is undefined when the first row of A is zero")
    return float(np.max(np.linalg.norm(A - A[0], axis=1)) / norm)  # (r, k) - (k,) -> (r,) -> max


def gradient_share(G, A) -> float:
    """||G Q||_F / ||G||_F: the share of a weight gradient G (d, k) that the row space of A (r, k) sees.

    Q (k, r) is an orthonormal basis of A's rows. At step 0 (B = 0) the adapter's first step moves B
    along G A^T, so the update s dB A can only reach G's part inside A's row space: G Q Q^T. For a
    row space drawn at random (uniformly) the expected squared share is r / k, whatever G is.
    """
    G = to_numpy(G).astype(np.float64)  # (d, k)
    A = to_numpy(A).astype(np.float64)  # (r, k)
    if G.ndim != 2 or A.ndim != 2 or G.shape[1] != A.shape[1]:
        raise ValueError(f"G must be (d, k) and A (r, k) with the same k, got {G.shape} and {A.shape}")
    Q, _ = np.linalg.qr(A.T)  # (k, r) -> Q (k, r), orthonormal columns spanning A's rows
    return float(np.linalg.norm(G @ Q) / np.linalg.norm(G))  # (d, k) @ (k, r) -> (d, r)


ROWS = ("random", "frozen", "identical")


def start_with_rows(rows: str, r: int = 4, alpha: float = 16, seed: int = 0):
    """The base model with Gaussian adapters whose A has ``rows``: "random" (as drawn), "frozen" (as drawn,
    never trained: only B learns) or "identical" (every row a copy of the first)."""
    if rows not in ROWS:
        raise ValueError(f"unknown rows {rows!r}; valid: {list(ROWS)}")
    model = adapted_model("gaussian", r, alpha, seed)
    for layer in lora_layers(model).values():
        if rows == "identical":
            layer.lora_A.data = np.tile(layer.lora_A.data[:1], (r, 1))  # (1, k) -> (r, k): r copies of row 0
        layer.lora_A.trainable = rows != "frozen"
    return model


def max_row_spread(model) -> float:
    """The largest ``row_spread`` of A over the model's adapted layers."""
    return max(row_spread(layer.lora_A.data) for layer in lora_layers(model).values())


def max_column_spread(model) -> float:
    """The largest max_j ||B_j - B_0|| (columns of B) over the model's adapted layers: 0 while B's columns are equal.

    B starts at zero, so its columns start equal; random rows of A make them grow apart.
    """
    spreads = []
    for layer in lora_layers(model).values():
        B = to_numpy(layer.lora_B.data).astype(np.float64)  # (d, r) on the host
        spreads.append(float(np.max(np.linalg.norm(B - B[:, :1], axis=0))))  # (d, r) - (d, 1) -> (r,) -> max
    return max(spreads)


def symmetry_watch(model) -> dict:
    """What notebook 4 watches in the symmetry runs: the spread of A's rows and of B's columns."""
    return {"A rows": max_row_spread(model), "B columns": max_column_spread(model)}


def order_by(result: dict, key: str = "early_loss") -> list[str]:
    """The inits of a result, from the lowest mean ``key`` to the highest."""
    return sorted(result["settings"]["inits"], key=lambda init: result["summary"][init][key]["mean"])


def train_and_watch(model, steps: int, batch_size: int, lr: float, every: int, watch, seed: int = 0) -> tuple:
    """Fine-tune ``model`` on "desc" and call ``watch(model)`` at step 0 and every ``every`` steps.

    Returns (history of ``train.train``, [(step, watch(model)), ...]). The library's loop (AdamW,
    warm-up and cosine decay, clipping) runs unchanged; the watching rides on its evaluation hook
    (on 8 held-out rows, which cost next to nothing).
    """
    seen = [(0, watch(model))]
    cfg = desc_config(steps, batch_size, lr, seed, eval_every=every)
    hist = train.train(model, cfg, progress=False, eval_sets=eval_sets(8),
                       on_eval=lambda step, scores: seen.append((step, watch(model))))
    return hist, seen


def run(scale: str = "full", progress: bool = True) -> dict:
    settings = SCALES[scale]
    evals = eval_sets(settings["eval_rows"])
    runs, updates = {}, {}
    jobs = [(init, seed) for init in settings["inits"] for seed in
            (settings["init_seeds"] if init in RANDOM else settings["init_seeds"][:1])]  # PiSSA has no random draw
    for init, seed in progress_bar(jobs, progress, "init curves"):
        out, upd = finetune_from(init, seed, settings, evals)
        out["early_loss"] = early_loss(out["loss"])
        runs.setdefault(init, []).append({"init_seed": seed, **out})
        updates[init, seed] = upd
    summary = {init: {key: spread([row[key] for row in rows]) for key in ("final_loss", "early_loss", "exact_match")}
               for init, rows in runs.items()}
    r = settings["r"]
    some = next(iter(updates.values()))
    # two independent random i-dimensional subspaces of R^k: E[phi(i, i)] = i / k, averaged over the layers' k
    similarity = {"random subspaces": [float(np.mean([i / some[n].shape[1] for n in some]))  # (r,) as a list
                                       for i in range(1, r + 1)]}
    seeds = settings["init_seeds"]
    for init in settings["inits"]:
        if init in RANDOM and len(seeds) > 1:
            pairs = [(a, b) for i, a in enumerate(seeds) for b in seeds[i + 1:]]
            similarity[f"{init}: two init seeds"] = [float(v) for v in np.mean(  # (pairs, r) -> (r,)
                [mean_similarity(updates[init, a], updates[init, b], r) for a, b in pairs], axis=0)]
    random_inits = [i for i in settings["inits"] if i in RANDOM]
    if len(random_inits) > 1:
        a, b = random_inits[:2]
        similarity[f"{a} vs {b} (seed {seeds[0]})"] = mean_similarity(updates[a, seeds[0]], updates[b, seeds[0]], r)
    return {"runs": runs, "summary": summary, "similarity": similarity,
            "findings": findings(summary, similarity, settings)}


def findings(summary: dict, similarity: dict, settings: dict) -> list[str]:
    def line(init):
        s = summary[init]
        seeds = (f" (init seeds: {s['final_loss']['min']:.3f} to {s['final_loss']['max']:.3f})"
                 if s["final_loss"]["max"] > s["final_loss"]["min"] else "")
        return (f"{INIT_NAMES[init]}: final loss {s['final_loss']['mean']:.3f}{seeds}, early loss "
                f"{s['early_loss']['mean']:.3f}, exact match {s['exact_match']['mean']:.1%}")

    out = [f"r = {settings['r']}, alpha = {settings['alpha']}, lr = {settings['lr']:g}, {settings['steps']} steps "
           f"of batch {settings['batch_size']} on 'desc', LoRA on all six matrices"]
    out += [line(init) for init in settings["inits"]]
    by_early = sorted(summary, key=lambda i: summary[i]["early_loss"]["mean"])
    out.append("fastest start (lowest early loss) to slowest: " + ", ".join(by_early))
    base = similarity["random subspaces"]
    for name, values in similarity.items():
        if name != "random subspaces":
            out.append(f"subspace similarity of the learned updates, {name}: phi(1, 1) = {values[0]:.2f}, "
                       f"phi(4, 4) = {values[3]:.2f} (two random subspaces: {base[0]:.3f}, {base[3]:.3f})")
    return out


def plot(result: dict):
    from ..plots.init import plot_init_curves

    return plot_init_curves(result)
