"""What the adapters learn: the r = 8 and r = 64 subspaces (LoRA Figure 3) and how dW relates to W (section 7.3).

LoRA (Hu et al., 2021), section 7.2, eq. (4) and Figure 3: adapters on Wq and Wv trained with
r = 8 and r = 64 from the same pre-trained model; phi(A_8, A_64, i, j) = ||U_8[:, :i]^T U_64[:, :j]||_F^2
/ min(i, j), with U the right-singular vectors of A (``rank.subspace_similarity_matrix``), is the
share of the top-i input directions of A_8 inside the top-j of A_64. The paper (layer 48 of 96 of
GPT-3) finds the top direction shared (phi > 0.5) and the rest barely above what two random
subspaces give (max(i, j) / k): "the top singular-vector directions ... are the most useful, while
other directions potentially contain mostly random noises". Figure 4 does the same for two
random seeds at r = 64 (Wq has a higher "intrinsic rank" than Wv there).

Section 7.3 and Table 7 ("How does the adaptation matrix dW compare to W?"): with U, V the top-r
left and right singular vectors of dW, ||U^T W V||_F is how much of W lies in dW's directions. It
is compared with the same projection onto W's own top-r directions (the most W can have, sqrt of
its top r squared singular values) and onto a random matrix's; the *amplification factor*
||dW||_F / ||U^T W V||_F says how much the update enlarges the directions it touches. On GPT-3's
Wq (layer 48): r = 4: 0.32 (dW), 21.67 (W), 0.02 (random), ||W||_F = 61.95, ||dW||_F = 6.91, a
factor 21.5; r = 64: 1.90, 37.71, 0.33, ||dW||_F = 3.57, a factor of about 1.9. "dW only
amplifies directions that are not emphasized in W".

Here: the shipped base model, LoRA on Wq and Wv of all four blocks, fine-tuned on "desc" with
r = 4, 8 and 64 for several seeds. One seed draws the batches (the same for every rank); the
initial A of each rank has its own draw (init seed 1000 * seed + r): with one generator seeded
alike, block 0's A_8 would start as the first 8 rows of A_64 and phi would be 1 before any
training. dW = s B A is the learned update; W the frozen Wq (or Wv) of the base model.
"""

from __future__ import annotations

import numpy as np

from ..backend import to_numpy
from ..lora import lora_layers
from ..rank import subspace_similarity_matrix
from .common import eval_sets, progress_bar
from .which_matrices import lora_model, train_and_score

TITLE = "What the adapters learn: r = 8 vs r = 64 subspaces, and how the update dW relates to W"
PAPER = ("LoRA (Hu et al., 2021), section 7.2, eq. (4), Figures 3 and 4 (subspace similarity) and "
         "section 7.3, Table 7 (the projection of W onto dW's directions, the amplification factor)")

# Table 7 of the paper: GPT-3 175B, Wq of layer 48 (of 96)
PAPER_TABLE7 = {"4": {"dW": 0.32, "W": 21.67, "random": 0.02, "W_norm": 61.95, "dW_norm": 6.91},
                "64": {"dW": 1.90, "W": 37.71, "random": 0.33, "W_norm": 61.95, "dW_norm": 3.57}}
# Table 7's amplification factor ||dW_q||_F / ||U^T W_q V||_F on GPT-3, layer 48: {4: 21.6, 64: 1.88}
PAPER_AMPLIFICATION = {int(r): row["dW_norm"] / row["dW"] for r, row in PAPER_TABLE7.items()}

SCALES = {
    "full": {"targets": ["q", "v"], "ranks": [4, 8, 64], "pair": [8, 64], "alpha": 16, "lr": 1e-2,
             "seeds": [0, 1, 2], "steps": 150, "batch_size": 32, "eval_rows": 256, "random_draws": 16},
    "slice": {"targets": ["q", "v"], "ranks": [4, 8, 64], "pair": [8, 64], "alpha": 16, "lr": 1e-2, "seeds": [0],
              "steps": 50, "batch_size": 16, "eval_rows": 64, "random_draws": 4},
    "test": {"targets": ["q", "v"], "ranks": [4, 64], "pair": [4, 64], "alpha": 16, "lr": 1e-2, "seeds": [0],
             "steps": 40, "batch_size": 16, "eval_rows": 32, "random_draws": 4},
}


def top_singular(M, r: int):
    """U_r (d, r) and V_r (k, r): the top-r left and right singular vectors of M (d, k), in float64."""
    M = np.asarray(to_numpy(M), dtype=np.float64)  # (d, k)
    if M.ndim != 2 or not 1 <= r <= min(M.shape):
        raise ValueError(f"need a matrix and 1 <= r <= min(d, k); got shape {M.shape} and r = {r}")
    U, _, Vt = np.linalg.svd(M, full_matrices=False)  # (d, m), (m,), (m, k)
    return U[:, :r], Vt[:r].T  # (d, r), (k, r)


def projection_norm(W, U, V) -> float:
    """||U^T W V||_F: how much of W (d, k) lies in the directions U (d, r) on the left and V (k, r) on the right."""
    W = np.asarray(to_numpy(W), dtype=np.float64)  # (d, k)
    return float(np.linalg.norm(U.T @ W @ V))  # (r, d) @ (d, k) @ (k, r) -> (r, r)


def amplification_factor(W, dW, r: int) -> float:
    """||dW||_F / ||U^T W V||_F with U, V the top-r singular vectors of dW (section 7.3)."""
    U, V = top_singular(dW, r)  # (d, r), (k, r)
    return float(np.linalg.norm(np.asarray(to_numpy(dW), dtype=np.float64)) / projection_norm(W, U, V))


def projection_table(W, dW, r: int, rng, random_draws: int = 16) -> dict:
    """One column pair of Table 7 for W (d, k) and its update dW (d, k) of rank r.

    ``dW``, ``W`` and ``random``: ||U^T W V||_F with U, V the top-r singular vectors of dW, of W
    itself, and of a Gaussian random matrix (the mean over ``random_draws`` draws from ``rng``);
    ``W_norm``, ``dW_norm``: the Frobenius norms; ``amplification``: dW_norm / the ``dW`` entry.
    """
    W = np.asarray(to_numpy(W), dtype=np.float64)  # (d, k)
    dW = np.asarray(to_numpy(dW), dtype=np.float64)  # (d, k)
    if W.shape != dW.shape:
        raise ValueError(f"W and dW must have the same shape, got {W.shape} and {dW.shape}")
    on_dW = projection_norm(W, *top_singular(dW, r))
    on_W = float(np.sqrt(np.sum(np.linalg.svd(W, compute_uv=False)[:r] ** 2)))  # = ||U_W^T W V_W||_F
    on_random = float(np.mean([projection_norm(W, *top_singular(rng.standard_normal(W.shape), r))
                               for _ in range(random_draws)]))  # (d, k) Gaussian draws
    dW_norm = float(np.linalg.norm(dW))
    return {"dW": on_dW, "W": on_W, "random": on_random, "W_norm": float(np.linalg.norm(W)), "dW_norm": dW_norm,
            "amplification": dW_norm / on_dW}


def random_similarity(r1: int, r2: int, k: int) -> np.ndarray:
    """E[phi(i, j)] for two independent random subspaces of R^k: max(i, j) / k, shape (r1, r2)."""
    i = np.arange(1, r1 + 1)[:, None]  # (r1, 1)
    j = np.arange(1, r2 + 1)[None, :]  # (1, r2)
    return np.maximum(i, j) / k  # (r1, r2)


def _adapters(model) -> dict:
    """path -> (A (r, k), dW = s B A (d, k), W0 (d, k)), float64 on the host, for every adapted layer."""
    out = {}
    for path, layer in lora_layers(model).items():
        A = to_numpy(layer.lora_A.data).astype(np.float64)  # (r, k)
        dW = to_numpy(layer.delta_weight()).astype(np.float64)  # (d, k)
        W = to_numpy(layer.base.weight.data).astype(np.float64)  # (d, k)
        out[path] = (A, dW, W)
    return out


def _matrix_of(path: str) -> str:
    return path.rsplit(".", 1)[1]  # 'blocks.2.attn.q' -> 'q'


def run(scale: str = "full", progress: bool = True) -> dict:
    settings = SCALES[scale]
    evals = eval_sets(settings["eval_rows"])
    rng = np.random.default_rng(12345)  # the random directions of Table 7's third column
    trained, started, scores = {}, {}, {}
    jobs = [(seed, r) for seed in settings["seeds"] for r in settings["ranks"]]
    for seed, r in progress_bar(jobs, progress, "update subspaces"):
        model = lora_model(settings["targets"], r, settings["alpha"], init_seed=1000 * seed + r)
        started[seed, r] = {p: a[0] for p, a in _adapters(model).items()}  # the A's at step 0 (host copies)
        out, model = train_and_score(settings["targets"], r, settings["lr"], seed, settings, evals, model=model)
        scores[f"seed {seed}, r = {r}"] = out
        trained[seed, r] = _adapters(model)
    paths = list(next(iter(trained.values())))
    r1, r2 = settings["pair"]
    k = next(iter(trained.values()))[paths[0]][0].shape[1]

    # Figure 3: phi(A_r1, A_r2, i, j) per layer, the mean over seeds; at step 0 for comparison
    def mean_table(pairs_of):
        return {p: np.mean([to_numpy(subspace_similarity_matrix(a, b)) for a, b in pairs_of(p)], axis=0)
                for p in paths}  # (r1, r2) per layer

    phi = mean_table(lambda p: [(trained[s, r1][p][0], trained[s, r2][p][0]) for s in settings["seeds"]])
    phi_start = mean_table(lambda p: [(started[s, r1][p], started[s, r2][p]) for s in settings["seeds"]])
    similarity = {
        "pair": [r1, r2], "k": int(k),
        "per_layer": {p: np.round(t, 4).tolist() for p, t in phi.items()},  # (r1, r2) per layer, as lists
        # (r1, r2) per matrix, the mean over its blocks; then the same for the A's at step 0
        "mean": {m: np.round(np.mean([phi[p] for p in paths if _matrix_of(p) == m], axis=0), 4).tolist()
                 for m in settings["targets"]},
        "at_step_0": {m: np.round(np.mean([phi_start[p] for p in paths if _matrix_of(p) == m], axis=0), 4).tolist()
                      for m in settings["targets"]},
        "random": np.round(random_similarity(r1, r2, k), 4).tolist(),  # (r1, r2)
    }
    # Figure 4: two seeds at the largest rank, phi(i, i)
    seeds, top = settings["seeds"], max(settings["ranks"])
    if len(seeds) > 1:
        pairs = [(a, b) for n, a in enumerate(seeds) for b in seeds[n + 1:]]
        similarity["two_seeds"] = {  # phi(i, i), i = 1 .. top: (top,) per matrix, the mean over pairs and blocks
            "r": top,
            **{m: np.round(np.mean([np.diag(to_numpy(subspace_similarity_matrix(trained[a, top][p][0],
                                                                                 trained[b, top][p][0])))
                                    for a, b in pairs for p in paths if _matrix_of(p) == m], axis=0), 4).tolist()
               for m in settings["targets"]}}

    # Table 7: per rank, matrix and layer, the mean over seeds
    table = {}
    for r in settings["ranks"]:
        for p in paths:
            rows = [projection_table(trained[s, r][p][2], trained[s, r][p][1], r, rng, settings["random_draws"])
                    for s in seeds]
            table.setdefault(str(r), {})[p] = {name: float(np.mean([row[name] for row in rows])) for name in rows[0]}
    summary = {str(r): {m: {name: float(np.mean([table[str(r)][p][name] for p in paths if _matrix_of(p) == m]))
                            for name in next(iter(table[str(r)].values()))}
                        for m in settings["targets"]} for r in settings["ranks"]}
    return {"scores": scores, "similarity": similarity, "table7": table, "table7_mean": summary,
            "findings": findings(similarity, summary, settings)}


def findings(similarity: dict, summary: dict, settings: dict) -> list[str]:
    r1, r2 = similarity["pair"]
    k = similarity["k"]
    out = [f"LoRA on {'+'.join(settings['targets'])}, r in {settings['ranks']}, alpha = {settings['alpha']}, "
           f"lr = {settings['lr']:g}, {settings['steps']} steps of batch {settings['batch_size']} on 'desc', "
           f"seeds {settings['seeds']}; means over the 4 blocks and the seeds"]
    for m, t in similarity["mean"].items():
        t0 = np.asarray(similarity["at_step_0"][m])  # (r1, r2)
        t = np.asarray(t)  # (r1, r2)
        out.append(f"W{m}: phi(A_{r1}, A_{r2}, 1, 1) = {t[0, 0]:.2f} (at step 0 {t0[0, 0]:.3f}, random {1 / k:.3f}); "
                   f"phi(1, {r2}) = {t[0, -1]:.2f} (random {r2 / k:.2f}); phi({r1}, {r1}) = {t[-1, r1 - 1]:.2f} "
                   f"(random {r1 / k:.3f}); phi({r1}, {r2}) = {t[-1, -1]:.2f} (random {r2 / k:.2f})")
    if "two_seeds" in similarity:
        two = similarity["two_seeds"]
        for m in settings["targets"]:
            d = two[m]
            out.append(f"W{m}, two seeds at r = {two['r']}: phi(1, 1) = {d[0]:.2f}, phi(8, 8) = {d[7]:.2f}, "
                       f"phi(32, 32) = {d[31]:.2f} (random {1 / k:.3f}, {8 / k:.3f}, {32 / k:.2f})")
    for r, by_matrix in summary.items():
        for m, row in by_matrix.items():
            out.append(f"W{m}, r = {r}: ||U^T W V||_F = {row['dW']:.3f} on dW's top-{r} directions, {row['W']:.2f} "
                       f"on W's own, {row['random']:.3f} on random ones; ||W||_F = {row['W_norm']:.2f}, "
                       f"||dW||_F = {row['dW_norm']:.2f}; amplification factor {row['amplification']:.1f}")
    ranks = sorted(summary, key=int)
    for m in settings["targets"]:
        amp = [summary[r][m]["amplification"] for r in ranks]
        out.append(f"W{m}: amplification factor by rank " + ", ".join(f"r={r}: {a:.1f}" for r, a in zip(ranks, amp))
                   + " (paper, GPT-3 Wq: 21.5 at r = 4, about 1.9 at r = 64)")
    return out


def plot(result: dict):
    from ..plots.transformer import plot_update_subspaces

    return plot_update_subspaces(result, PAPER_AMPLIFICATION)
