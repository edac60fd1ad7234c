"""Report sections of the paper's other experiments: batch sweep (Fig. 4), warm start (Fig. 5),
sharpness along training (Fig. 6), and the remedies table."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.ticker import FormatStrFormatter, LogLocator

from ..results import Results, RunResult, Stat
from ..rundir import read_history
from .figures import _protocol_note, plt, regime_colors


def _plain_log(ax, axis: str = "y") -> None:
    """Log scale with tick labels written as plain numbers (1, 2, 5, 10, ...)."""
    a = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    a.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    a.set_major_formatter(FormatStrFormatter("%g"))
    a.set_minor_formatter(FormatStrFormatter(""))

EPS_STYLES = ["-", "--", ":", "-."]


def _seeds(res: Results) -> str:
    n = len(res.study["seeds"])
    return f"{n} seed" + ("s" if n != 1 else "")


def _runs(res: Results, regime: str) -> list[RunResult]:
    return res.runs_of(regime)


def _eps_list(res: Results) -> list[float]:
    return [float(e) for e in res.study["measure"]["sharpness_eps"]]


def _errorbar(ax, x, rows, **kw):
    arr = np.asarray(rows, dtype=float)
    mean = np.nanmean(arr, axis=1)
    std = np.nanstd(arr, axis=1, ddof=1) if arr.shape[1] > 1 else np.zeros_like(mean)
    ax.errorbar(x, mean, yerr=std, capsize=3, marker="o", ms=4, **kw)


def batch_sweep(res: Results, path: Path) -> Path | None:
    """Figure 4 analog: test accuracy and eps-sharpness against the batch size, mean ± std over seeds."""
    regimes = [r["name"] for r in res.study["regimes"] if _runs(res, r["name"])]
    if len(regimes) < 3:
        return None
    regimes.sort(key=lambda n: res.regime(n).batch_size)
    sizes = [res.regime(n).batch_size for n in regimes]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 4.6))
    for key, style, label in (("test", "-", "test"), ("train", "--", "train")):
        _errorbar(ax1, sizes, [[100 * getattr(r, key).accuracy for r in _runs(res, n)] for n in regimes],
                  color="tab:blue", ls=style, label=f"{label} accuracy")
    for eps, style in zip(_eps_list(res), EPS_STYLES):
        rows = [[r.sharpness(eps) for r in _runs(res, n)] for n in regimes]
        if all(v is not None for row in rows for v in row):
            _errorbar(ax2, sizes, rows, color="tab:red", ls=style, label=f"ε = {eps:g}")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes], fontsize=8)
        ax.set_xlabel("batch size (log scale)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylabel("accuracy (%)")
    _plain_log(ax2)
    ax2.set_ylabel("ε-sharpness, full space (log scale)")
    fig.suptitle(f"{res.study['name']}: accuracy and sharpness against batch size ({_seeds(res)})", fontsize=11)
    fig.subplots_adjust(bottom=0.22, wspace=0.28)
    base = res.study["train"]["epochs"]
    longer = [f"{n}: {r.epochs} epochs, {r.steps} updates" for n in regimes
              for r in _runs(res, n)[:1] if r.epochs != base]
    _protocol_note(fig, f"Each batch size trained {base} epochs" + (f" ({'; '.join(longer)})" if longer else "")
                        + " from the same x0 per seed; error bars: ±1 std over seeds; sharpness on the training set, "
                        "as Tables 3-4.")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def warm_start(res: Results, out: Path, path: Path) -> Path | None:
    """Figure 5 analog: LB solutions started from the SB iterate after k epochs, against k."""
    starts = [(r["name"], r["init_from"]) for r in res.study["regimes"] if r.get("init_from")]
    starts = [(n, i) for n, i in starts if _runs(res, n)]
    if not starts:
        return None
    starts.sort(key=lambda s: s[1]["epoch"])
    ks = [i["epoch"] for _, i in starts]
    src = starts[0][1]["regime"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 4.6))
    _errorbar(ax1, ks, [[100 * r.test.accuracy for r in _runs(res, n)] for n, _ in starts],
              color="tab:red", label="LB solution started at the SB iterate")
    hists = [{h["epoch"]: h for h in read_history(out / Path(r.history).parent)} for r in _runs(res, src)]
    sb_k = [k for k in ks if hists and all("test_accuracy" in h.get(k, {}) for h in hists)]  # k = 0 has no row
    if sb_k:
        _errorbar(ax1, sb_k, [[100 * h[k]["test_accuracy"] for h in hists] for k in sb_k],
                  color="tab:blue", ls="--", label=f"the {src} iterate itself")
    for eps, style in zip(_eps_list(res), EPS_STYLES):
        rows = [[r.sharpness(eps) for r in _runs(res, n)] for n, _ in starts]
        if all(v is not None for row in rows for v in row):
            _errorbar(ax2, ks, rows, color="tab:red", ls=style, label=f"LB solution, ε = {eps:g}")
    ax1.set_ylabel("test accuracy (%)")
    ax2.set_ylabel("ε-sharpness, full space (log scale)")
    _plain_log(ax2)
    for ax in (ax1, ax2):
        ax.set_xlabel(f"epochs of {src} training before switching to the large batch (k)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{res.study['name']}: warm-starting the large batch from the small-batch iterate", fontsize=11)
    fig.subplots_adjust(bottom=0.22, wspace=0.28)
    _protocol_note(fig, "Each LB run trains its full epoch budget from the SB iterate after k epochs (fresh optimizer); "
                        "error bars ±1 std over seeds; sharpness on the training set.")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def trajectory(res: Results, path: Path) -> Path | None:
    """Figure 6 analog: eps-sharpness against training cross-entropy along training (log-log)."""
    colors = regime_colors(res)
    fig, ax = plt.subplots(figsize=(7.2, 5.0))
    drawn = False
    for regime, color in colors.items():
        trajs = [r.trajectory for r in _runs(res, regime) if r.trajectory]
        if not trajs:
            continue
        n = min(len(t) for t in trajs)
        loss = np.exp(np.mean([[np.log(p["train_loss"]) for p in t[:n]] for t in trajs], axis=0))
        for eps, style in zip(trajs[0][0]["sharpness"], EPS_STYLES):
            logs = np.array([[np.log(max(p["sharpness"][eps], 1e-12)) for p in t[:n]] for t in trajs])
            mean = logs.mean(axis=0)
            ax.plot(loss, np.exp(mean), style, color=color, marker="o", ms=3.5, label=f"{regime}, ε = {eps}")
            if len(trajs) > 1:
                spread = logs.std(axis=0, ddof=1)
                ax.fill_between(loss, np.exp(mean - spread), np.exp(mean + spread), color=color, alpha=0.12, lw=0)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    _plain_log(ax, "x")
    _plain_log(ax, "y")
    ax.invert_xaxis()  # training goes left to right: the loss falls
    ax.set_xlabel("training cross-entropy (log scale, decreasing: training proceeds to the right)")
    ax.set_ylabel("ε-sharpness, full space (log scale)")
    ax.set_title(f"{res.study['name']}: sharpness along training ({_seeds(res)}, geometric means)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    epochs = [p["epoch"] for p in next(r.trajectory for r in res.runs if r.trajectory)]
    fig.subplots_adjust(bottom=0.2)
    _protocol_note(fig, f"Measured at epochs {', '.join(map(str, epochs))}; each point the geometric mean over seeds "
                        "of the training loss and of the sharpness at that epoch; band: ×/÷ one geometric standard deviation of the "
                        "sharpness over seeds.")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _stat(st: Stat | None) -> str:
    return "n/a" if st is None or st.mean is None else f"{st.mean:.3g} ± {st.std:.2g}"


_REMEDY_NAMES = {"proximal": "conservative training (proximal)", "fgsm": "adversarial training (FGSM)",
                 "sam": "SAM", "asam": "ASAM"}


def describe(regime: dict, batch_size: int | None = None) -> str:
    """A regime's remedy in a few words, from its settings."""
    parts = []
    if regime.get("remedy", "plain") != "plain":
        opts = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in regime.get("remedy_options", {}).items())
        name = _REMEDY_NAMES.get(regime["remedy"], regime["remedy"])
        parts.append(f"{name} ({opts})" if opts else name)
    if regime.get("augment"):
        parts.append(f"augmentation {regime['augment']}")
    if regime.get("ghost_batch"):
        parts.append(f"ghost BN, ghost batch {regime['ghost_batch']}")
    if regime.get("lr_rule"):
        parts.append(f"lr rule {regime['lr_rule']}")
    if regime.get("warmup_epochs"):
        parts.append(f"{regime['warmup_epochs']:g} warmup epochs")
    if "epochs" in regime:
        parts.append(f"{regime['epochs']} epochs")
    if regime.get("batch_schedule"):
        s = regime["batch_schedule"]
        parts.append(f"batch {s['small']} → {batch_size or regime['batch_size']}, "
                     + (f"switch at epoch {s['switch_epoch']}" if s["kind"] == "switch" else f"geometric over {s['epochs']} epochs"))
    if regime.get("init_from"):
        parts.append(f"from {regime['init_from']['regime']} after {regime['init_from']['epoch']} epochs")
    return "; ".join(parts) or "baseline"


def remedies_table(res: Results) -> list[str]:
    comp = res.comparison
    sb, lb = (comp.small, comp.large) if comp else (None, None)
    if not sb or not lb:
        return []
    acc_sb, acc_lb = res.regime(sb).test_accuracy.mean, res.regime(lb).test_accuracy.mean
    paper = res.study.get("paper", {}).get("remedies", {})
    eps = _eps_list(res)[0] if _eps_list(res) else None
    lines = ["| method | regime | test accuracy (%) | gap closed | ε-sharpness" + (f" (ε = {eps:g})" if eps else "")
             + " | top Hessian eigenvalue | training time (s) |" + (" paper (appendix E) |" if paper else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if paper else "")]
    for r in res.study["regimes"]:
        row = res.regime(r["name"])
        acc = row.test_accuracy
        if acc.mean is None:
            closed = "diverged"
        elif acc_sb is not None and acc_lb is not None and acc_sb > acc_lb:
            share = round(100 * (acc.mean - acc_lb) / (acc_sb - acc_lb))
            closed = f"{share:+d}%" if share else "0%"
        else:
            closed = f"n/a ({sb} not ahead of {lb})"
        sharp = row.sharp(eps) if eps else None
        acc_text = "n/a" if acc.mean is None else f"{100 * acc.mean:.2f} ± {100 * acc.std:.2f}"
        line = (f"| {describe(r, row.batch_size)} | {r['name']} (batch {row.batch_size}) | {acc_text} | {closed} | "
                f"{_stat(sharp)} | {_stat(row.hessian_top_eigenvalue)} | {row.wall_time_s.mean:.1f} |")
        if paper:
            line += f" {paper.get(r['name'], '')} |"
        lines.append(line)
    lines += ["", f"Gap closed = (accuracy − {lb}) / ({sb} − {lb}): 0% is no better than {lb}, 100% reaches {sb}. "
              "Mean ± std over seeds; training time is per run."]
    return lines


def remedies(res: Results, path: Path) -> Path | None:
    """Each method's test accuracy against its eps-sharpness (mean ± std over seeds): does a remedy that
    closes the gap also find a flatter minimum? The SB and LB baselines' accuracies as lines."""
    comp = res.comparison
    sb, lb = (comp.small, comp.large) if comp else (None, None)
    eps = _eps_list(res)[0] if _eps_list(res) else None
    if not sb or not lb or eps is None:
        return None
    points = []
    for r in res.study["regimes"]:
        rows = [(run.sharpness(eps), run.test.accuracy) for run in _runs(res, r["name"])]
        rows = [(x, y) for x, y in rows if x is not None]
        if rows:
            points.append((r["name"], np.asarray(rows, dtype=float)))
    if len(points) < 2:
        return None
    fig, ax = plt.subplots(figsize=(8.4, 5.6))
    cmap = plt.get_cmap("tab20")
    for i, (name, rows) in enumerate(points):
        x, y = rows[:, 0], 100 * rows[:, 1]
        sd = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
        color = "black" if name in (sb, lb) else cmap(i % 20)
        ax.errorbar(x.mean(), y.mean(), xerr=sd(x), yerr=sd(y), fmt="s" if name in (sb, lb) else "o",
                    color=color, ms=6, capsize=3, label=name)
        ax.annotate(name, (x.mean(), y.mean()), textcoords="offset points", xytext=(5, 4), fontsize=7, color=color)
    for name, style in ((sb, "-"), (lb, "--")):
        ax.axhline(100 * res.regime(name).test_accuracy.mean, color="grey", ls=style, lw=1,
                   label=f"{name} test accuracy")
    _plain_log(ax, "x")
    ax.set_xlabel(f"ε-sharpness, ε = {eps:g}, full space (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{res.study['name']}: does closing the gap find a flatter minimum? (mean ± std, {_seeds(res)})",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def noise_scale(res: Results, path: Path) -> Path | None:
    """The gradient noise scale B_simple along training, with each regime's batch size for reference."""
    colors = regime_colors(res)
    fig, ax = plt.subplots(figsize=(7.2, 5.0))
    drawn = False
    for regime, color in colors.items():
        trajs = [r.trajectory for r in _runs(res, regime) if r.trajectory and "noise_scale" in r.trajectory[0]]
        if not trajs:
            continue
        n = min(len(t) for t in trajs)
        epochs = [p["epoch"] for p in trajs[0][:n]]
        rows = np.asarray([[p["noise_scale"] for p in t[:n]] for t in trajs], dtype=float).T
        _errorbar(ax, epochs, rows, color=color, label=f"{regime}: B_simple at its iterates")
        batch = res.regime(regime).batch_size
        ax.axhline(batch, color=color, ls=":", lw=1.2, label=f"{regime}: its batch size ({batch})")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    _plain_log(ax)
    ax.set_xlabel("epoch")
    ax.set_ylabel("gradient noise scale B_simple = tr(Σ)/|G|² (log scale)")
    ax.set_title(f"{res.study['name']}: the batch size beyond which large batches stop paying ({_seeds(res)})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.subplots_adjust(bottom=0.2)
    _protocol_note(fig, "McCandlish et al. 2018: from batches of 32 and the full training gradient, finite-population "
                        "corrected; error bars ±1 std over seeds.")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
