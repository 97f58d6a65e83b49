"""``clipctl plot``: a run's curves as a PNG, for people who would rather look than read.

matplotlib is imported when a plot is drawn (never at CLI start-up), through its
object-oriented API on the Agg canvas: no pyplot global state, no display needed, safe
to call from a TUI worker thread.
"""

from __future__ import annotations

from pathlib import Path

from clip_jax.errors import RunFolderError

EVAL_METRICS = {
    "zero_shot_top1": "zero-shot top-1",
    "retrieval_i2t_r1": "image→text R@1",
    "retrieval_t2i_r1": "text→image R@1",
}


def plot_run(run_dir: str | Path, out_path: str | Path) -> Path:
    """Draw train loss, learning rate and evaluation metrics over steps into a PNG.

    Raises a RunFolderError (the user asked too early) when the run has logged no
    training steps yet: there is nothing to draw.
    Returns the written path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from clipctl.runs import metrics, summarize

    summary = summarize(run_dir)
    train = [r for r in metrics(run_dir, "train") if "loss" in r]
    evals = metrics(run_dir, "validation")
    if not train:
        raise RunFolderError(f"{run_dir} has no training metrics yet; nothing to plot")

    figure = Figure(figsize=(13, 4), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, lr_ax, eval_ax = figure.subplots(1, 3)
    steps = [r["step"] for r in train]

    loss_ax.plot(steps, [r["loss"] for r in train], color="tab:blue", linewidth=1.2)
    loss_ax.set_title("train loss")

    rates = [(r["step"], r["learning_rate"]) for r in train if "learning_rate" in r]
    if rates:
        lr_ax.plot(*zip(*rates, strict=True), color="tab:orange", linewidth=1.2)
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    lr_ax.set_title("learning rate")

    drawn = False
    for key, label in EVAL_METRICS.items():
        points = [(r["step"], r[key]) for r in evals if isinstance(r.get(key), int | float)]
        if points:
            eval_ax.plot(*zip(*points, strict=True), marker="o", linewidth=1.2, label=label)
            drawn = True
    eval_ax.set_title("evaluation")
    if drawn:
        eval_ax.set_ylim(0, 1.02)
        eval_ax.set_xlim(loss_ax.get_xlim())
        eval_ax.legend(loc="best", fontsize="small")
    else:
        eval_ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center")
        eval_ax.set_xticks([])
        eval_ax.set_yticks([])

    for ax in (loss_ax, lr_ax, eval_ax):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    total = f"/{summary.steps}" if summary.steps else ""
    figure.suptitle(f"{summary.name} ({summary.state}, step {summary.step}{total})")

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png")
    return out
