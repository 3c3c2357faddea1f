"""Training runs side by side: the loss (faint per step, solid its moving average) and exact match per task.

Host-side drawing only: the numbers are the histories ``train.train`` returns.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .style import moving_average, plain_log_axis, styled


@styled
def plot_training_curves(histories: dict, smooth: int = 25, tasks=None):
    """Training runs side by side: loss (left) and exact match per task (right).

    ``histories``: name -> the dict returned by ``train.train`` (keys "step",
    "loss", "eval" = list of (step, {task: exact_match})). Each run has one
    colour; on the right each task has its own line style. The raw loss is
    drawn faintly, its ``smooth``-step moving average solidly.
    """
    if not isinstance(histories, dict) or not histories:
        raise ValueError("histories must be a non-empty dict: name -> history from train.train")
    fig, (ax_l, ax_e) = plt.subplots(1, 2, figsize=(14, 5.2))
    styles = ["-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 1))]
    prop = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    all_tasks = []
    for h in histories.values():
        for _, scores in h.get("eval", []):
            all_tasks += [t for t in scores if t not in all_tasks]
    tasks = all_tasks if tasks is None else list(tasks)
    for n, (name, h) in enumerate(histories.items()):
        for key in ("step", "loss"):
            if key not in h:
                raise ValueError(f"history {name!r} has no {key!r} entry")
        color = prop[n % len(prop)]
        step = np.asarray(h["step"], dtype=np.float64) + 1  # (n_steps,) 1-based
        loss = np.asarray(h["loss"], dtype=np.float64)  # (n_steps,)
        ax_l.plot(step, loss, color=color, alpha=0.25, lw=0.8)
        ax_l.plot(step, moving_average(loss, smooth), color=color, lw=2.0, label=name)
        ev = h.get("eval", [])
        for t_i, task in enumerate(tasks):
            pts = [(s, sc[task]) for s, sc in ev if task in sc]
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax_e.plot(xs, ys, color=color, ls=styles[t_i % len(styles)], marker="o", ms=4, lw=1.6)
    ax_l.set_yscale("log")
    plain_log_axis(ax_l.yaxis)
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("training loss (log scale)")
    ax_l.set_title(f"Loss (faint: per step; solid: {smooth}-step average)")
    ax_l.grid(alpha=0.3)
    ax_l.legend(frameon=False)
    ax_e.set_xlabel("step")
    ax_e.set_ylabel("exact match")
    ax_e.set_ylim(-0.03, 1.03)
    ax_e.set_title("Exact match per task (held-out set)")
    ax_e.grid(alpha=0.3)
    run_handles = [plt.Line2D([], [], color=prop[n % len(prop)], lw=2, label=name)
                   for n, name in enumerate(histories)]
    task_handles = [plt.Line2D([], [], color="#444444", ls=styles[t % len(styles)], lw=1.6, label=task)
                    for t, task in enumerate(tasks)]
    ax_e.legend(handles=run_handles + task_handles, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig

