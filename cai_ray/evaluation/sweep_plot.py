"""sweep.png: per metric, today's levels beside the difference from SFT-only with its interval."""
from __future__ import annotations

from cai_ray.evaluation.sweep import COSTS, NAMES


def sweep_figure(analysis: dict, sw) -> object:
    """One row per metric: left the level per size (mean over seeds) with the SFT-only level; right
    the paired difference from SFT-only with its interval, the zero line, and for the harm metrics
    the smallest detectable difference (-MDE), for costs their limit.  Two columns keep it readable
    in MLflow's artifact pane."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, base = analysis["sizes"], analysis["baseline"]["levels"]
    names = [k for k in base if k != "ref_logprob"] or list(base)
    fig, axes = plt.subplots(max(1, len(names)), 2, figsize=(12, 3.6 * max(1, len(names))), squeeze=False)
    mde = analysis.get("power", {}).get("mde")
    for (left, right), name in zip(axes, names):
        shown = [r for r in table if r["levels"].get(name) is not None]
        if not shown:  # said on the plot, not left as empty axes
            right.text(0.5, 0.5, "no difference (no request rated by every arm)", ha="center", va="center",
                       transform=right.transAxes)
            left.text(0.5, 0.5, "no rated responses\n(the evaluate run's failure tables say why)",
                      ha="center", va="center", transform=left.transAxes)
        left.plot([r["pairs"] for r in shown], [r["levels"][name] for r in shown], marker="o",
                  label="SFT + DPO (mean over seeds)")
        if base.get(name) is not None:
            left.axhline(base[name], color="grey", linestyle="--", label="SFT only")
        left.set_title(f"{NAMES.get(name, name)}: level")
        diffs = [r for r in table if r["metrics"].get(name, {}).get("diff") is not None]
        ys = [r["metrics"][name]["diff"] for r in diffs]
        err = [[y - r["metrics"][name]["lo"] for r, y in zip(diffs, ys)],
               [r["metrics"][name]["hi"] - y for r, y in zip(diffs, ys)]]
        right.errorbar([r["pairs"] for r in diffs], ys, yerr=err, marker="o", capsize=3,
                       label="DPO - SFT-only (95% CI, requests x seeds)")
        for r, y in zip(diffs, ys):
            if r["status"] != "no":
                right.annotate(r["status"], (r["pairs"], y), textcoords="offset points", xytext=(4, 6), fontsize=8)
        right.axhline(0, color="black", linewidth=0.8)
        if name in sw.harm_metrics and mde is not None:
            right.axhline(-mde, color="red", linestyle=":", label=f"detectable: -{mde:.2f}")
        elif name in COSTS and getattr(sw, COSTS[name][0]) is not None:
            right.axhline(COSTS[name][1] * getattr(sw, COSTS[name][0]), color="orange", linestyle=":",
                          label=f"sweep.{COSTS[name][0]}")
        right.set_title(f"{NAMES.get(name, name)}: difference from SFT-only")
        for ax, drawn in ((left, shown), (right, diffs)):
            if drawn:  # an empty axis cannot be log-scaled
                ax.set_xscale("log")
            ax.set_xlabel("preference pairs")
            ax.legend(fontsize=7)
    fig.suptitle(analysis["answer"]["line"][:150], fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / max(1, len(names))))  # room for the answer above
    return fig


def log_sweep_figure(store, analysis: dict, sw) -> None:
    """sweep.png on the parent run."""
    import matplotlib.pyplot as plt

    fig = sweep_figure(analysis, sw)
    store.log_figure(fig, "sweep.png")
    plt.close(fig)
