"""The edge-of-stability report: one figure and report.md, drawn from ``results.json`` alone."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .common import load_results, save_png, write_markdown  # noqa: E402
from .eos_summary import HOVER_HIGH, HOVER_LOW, REACH, findings  # noqa: E402

FIGURE = "edge_of_stability.png"
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")

CLAIMS = (
    "Cohen et al. 2021 (full-batch GD): lambda_max rises (progressive sharpening) until it reaches 2/eta, then "
    "hovers just above it while the loss keeps falling, non-monotonically; with cross-entropy it falls late in "
    "training as the loss goes to zero. With SGD it settles lower, the lower the smaller the batch "
    "(their Appendix, and Jastrzebski et al. 2020).",
    "Cohen et al. 2022 (full-batch Adam): the preconditioned sharpness lambda_max(P^-1 H) rises to "
    "(2 + 2 beta1)/((1 - beta1) eta) = 38/eta for beta1 = 0.9 and hovers there (adaptive edge of stability), "
    "while the raw lambda_max need not stay below 2/eta.",
)


def _series(r: dict, key: str):
    tr = r["trace"]
    pts = [(t, v) for t, v in zip(tr["steps"], tr[key]) if v is not None]
    return [t for t, _ in pts], [v for _, v in pts]


def draw(doc: dict, path: Path) -> Path:
    """The figure: per loss a row of GD's lambda_max with 2/eta, SGD's with 2/eta, Adam's preconditioned
    sharpness with (2 + 2 beta1)/((1 - beta1) eta), and every run's training loss (log scales).

    Args:
        doc: the results.
        path: the PNG to write (atomically).

    Returns:
        ``path``.
    """
    losses = doc["settings"]["losses"]
    fig, axes = plt.subplots(len(losses), 4, figsize=(17, 3.8 * len(losses)), squeeze=False)
    for row, loss in zip(axes, losses):
        runs = [r for r in doc["runs"] if r["loss"] == loss]
        groups = [("gd", "full-batch GD: lambda_max"), ("sgd", "SGD: lambda_max (full-data Hessian)"),
                  ("adam", "full-batch Adam: lambda_max(P^-1 H)")]
        for ax, (opt, title) in zip(row, groups):
            for i, r in enumerate(x for x in runs if x["optimizer"] == opt):
                c = COLORS[i % len(COLORS)]
                ax.plot(*_series(r, r["tracked"]), color=c, lw=1.2, label=r["label"])
                ax.axhline(r["threshold"], color=c, ls="--", lw=0.9)
                if opt == "adam":
                    ax.plot(*_series(r, "sharpness"), color="0.5", lw=0.9, label="raw lambda_max")
            ax.set_title(f"{loss}: {title}", fontsize=9)
            ax.set_xlabel("step")
            ax.set_yscale("log")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        ax = row[3]
        for opt, style in (("gd", "-"), ("sgd", "--"), ("adam", ":")):
            for i, r in enumerate(x for x in runs if x["optimizer"] == opt):
                tr = r["trace"]
                ax.plot(tr["steps"][: len(tr["loss"])], tr["loss"], ls=style, lw=1, color=COLORS[i % len(COLORS)],
                        label=r["label"])
        ax.set_yscale("log")
        ax.set_title(f"{loss}: full-data training loss", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=6, ncol=2)
    fig.text(0.01, 0.004, "Left three panels, dashed: each run's threshold in its colour: 2/eta (GD, SGD), "
             "(2 + 2 beta1)/((1 - beta1) "
             "eta) (Adam). lambda_max of the full-data training loss's Hessian, Lanczos; "
             f"n = {doc['runs'][0]['n']} training examples, one x0 (seed {doc['settings']['seed']}). "
             "Loss panel: GD solid, SGD dashed, Adam dotted.", fontsize=7)
    # fixed margins: tight_layout measured every log-axis tick label and took 9 s of a 16 s figure
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.16 / len(losses), top=1 - 0.06 / len(losses), wspace=0.28,
                        hspace=0.35)
    return save_png(fig, path, 110)


def _table(doc: dict) -> list[str]:
    head = ["| loss | run | steps | threshold | peak | reached at step | median after | within band | "
            "last quarter [min, max] | final loss | final train acc |", "|" + "---|" * 11]
    rows = []
    for r in doc["runs"]:
        s = r["summary"]

        def f(v, fmt=".2f", unit=""):
            return "—" if v is None else format(v, fmt) + unit
        within = "—" if s["within_after"] is None else f"{100 * s['within_after']:.0f}%"
        div = f" (diverged at {s['diverged_at']})" if s["diverged_at"] is not None else ""
        rows.append(f"| {r['loss']} | {r['label']}{div} | {r['steps']} | {r['threshold']:.4g} | "
                    f"{f(s['peak'], unit='x')} | "
                    f"{f(s['reached_at'], 'd')} | {f(s['median_after'], unit='x')} | {within} | "
                    f"{f(s['settled'], unit='x')} {_span(s)} | "
                    f"{f(s['final_loss'], '.4g')} | {f(s['final_accuracy'], '.3f')} |")
    return head + rows


def _span(s: dict) -> str:
    return "" if s.get("settled_range") is None else "[{:.2f}, {:.2f}]".format(*s["settled_range"])


def write_report(out: Path) -> Path:
    """Draw the figure into ``out/figures/`` and write ``out/report.md`` (atomically) from ``out/results.json``.

    Args:
        out: the output directory.

    Returns:
        The report's path.
    """
    doc = load_results(out, "edge-of-stability")
    (out / "figures").mkdir(parents=True, exist_ok=True)
    draw(doc, out / "figures" / FIGURE)
    st = doc["settings"]
    lines = [f"# {doc['name']}: the edge of stability", "", doc.get("description", ""), ""]
    if doc.get("quick"):
        lines += ["**--quick: a smoke test, too short and too small for any finding.**", ""]
    lines += [f"Data: {doc['data']['name']}, {doc['runs'][0]['n']} training examples (subset seed "
              f"{doc['data']['subset_seed']}); model: {doc['model']['name']} {doc['model']['options']} "
              f"({doc['runs'][0]['num_params']} parameters), one x0 (seed {st['seed']}) for every run. "
              f"GD and SGD for {st['time']:g}/eta steps, Adam (beta1 {st['beta1']}, beta2 {st['beta2']}, eps "
              f"{st['eps']:g}) for {st['adam_steps']} steps; {st['points']} measurements per run.", "",
              "## The claim and ours", ""]
    lines += [f"- {c}" for c in CLAIMS]
    lines += ["", f"Ours, from the numbers below (reached: ratio to the threshold >= {REACH}; hovered: at least "
              f"3/4 of the measurements from then on within [{HOVER_LOW}, {HOVER_HIGH}]x):", ""]
    for loss, sentences in findings(doc).items():
        lines += [f"**{loss}**", ""] + [f"- {s}" for s in sentences] + [""]
    lines += [f"![sharpness along training against the stability thresholds](figures/{FIGURE})", "",
              "## Every run", "", "Ratios are to the run's threshold (the tracked quantity: lambda_max for GD "
              "and SGD, the preconditioned sharpness for Adam).", ""] + _table(doc)
    lines += ["", "## Protocol", ""] + [f"- {k}: {v}" for k, v in doc["protocol"].items()]
    unconv = sum(r["summary"]["unconverged_lanczos"] for r in doc["runs"])
    lines += [f"- Lanczos measurements that stopped at max_lanczos = {st['max_lanczos']} before tol = "
              f"{st['tol']:g}: {unconv}", ""]
    return write_markdown(out, lines)
