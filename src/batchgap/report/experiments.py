"""Report sections of the paper's other experiments: batch sweep (Fig. 4), warm start (Fig. 5),
sharpness along training (Fig. 6), and the remedies table.

Every label says what was run, read from the runs: the batch each regime ran (a name like B512 can
differ, e.g. under ``--quick``'s smaller training set), the seeds and the epochs; spreads as in
:mod:`.figures` (geometric on log axes), unfitted regimes hollow.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ..results import Results, RunResult, Stat
from ..rundir import read_history
from .figures import (_protocol_note, arithmetic_stats, batch_ticks, did_not_fit, errorbar, geometric_stats,
                      place_labels, plain_log, plt, regime_colors, spread_note, spreads, unfitted_handle, value_ticks)

EPS_STYLES = ["-", "--", ":", "-."]


def _n_seeds(res: Results) -> int:
    """The seeds actually run (finished), not the study file's list."""
    return len({r.seed for r in res.runs}) or len(res.study["seeds"])


def _seeds(res: Results) -> str:
    n = _n_seeds(res)
    return f"{n} seed" + ("s" if n != 1 else "")


def _runs(res: Results, regime: str) -> list[RunResult]:
    return res.runs_of(regime)


def _eps_list(res: Results) -> list[float]:
    return [float(e) for e in res.study["measure"]["sharpness_eps"]]


def _unfitted(res: Results, names) -> list[bool]:
    return [did_not_fit([r.train.accuracy for r in _runs(res, n) if r.train]) for n in names]


def nominal_batch(name: str) -> int | None:
    """The batch a regime's name says (``B512`` -> 512), None for a name that says none."""
    m = re.fullmatch(r"[Bb](\d+)", name)
    return int(m.group(1)) if m else None


def renamed(res: Results) -> list[tuple[str, int, int]]:
    """``(name, batch in the name, batch run)`` for each regime whose runs ran another batch than its name says."""
    out = []
    for r in res.study["regimes"]:
        runs, said = _runs(res, r["name"]), nominal_batch(r["name"])
        if runs and said is not None and runs[0].batch_size != said:
            out.append((r["name"], said, runs[0].batch_size))
    return out


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def as_run(res: Results) -> str:
    """What was run, from the runs: the seeds, the epochs (and the regimes that trained another number),
    and each regime whose name says another batch than it ran. A study's description names the full
    study's settings; this names those of the runs behind the numbers (``--quick``, ``--set``)."""
    if not res.runs:
        return ""
    seeds = sorted({r.seed for r in res.runs})
    epochs = {r.regime: (r.epochs, r.steps) for r in res.runs}
    base = Counter(e for e, _ in epochs.values()).most_common(1)[0][0]
    other = [f"{n}: {e} epochs, {s} updates" for n, (e, s) in epochs.items() if e != base]
    text = (f"As run: {len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}), "
            f"{base} epochs" + (f" ({'; '.join(other)})" if other else ""))
    moved = renamed(res)
    if moved:
        text += (f"; {_and([n for n, _, _ in moved])} ran batches of {_and([str(b) for _, _, b in moved])}, not the "
                 f"{_and([str(s) for _, s, _ in moved])} their names say (the training set has "
                 f"{res.data.get('train_examples', '?')} examples)")
    return text + "."


def batch_sweep(res: Results, path: Path) -> Path | None:
    """Figure 4 analog: test accuracy and eps-sharpness against the batch each regime ran."""
    regimes = [r["name"] for r in res.study["regimes"] if _runs(res, r["name"])]
    if len(regimes) < 3:
        return None
    batch = {n: _runs(res, n)[0].batch_size for n in regimes}
    regimes.sort(key=lambda n: batch[n])
    sizes = [batch[n] for n in regimes]
    hollow = _unfitted(res, regimes)
    n_seeds = _n_seeds(res)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 4.9))
    acc = [errorbar(ax1, sizes, [[100 * getattr(r, key).accuracy for r in _runs(res, n)] for n in regimes],
                    hollow=hollow, color="tab:blue", ls=style, label=f"{label} accuracy")
           for key, style, label in (("test", "-", "test"), ("train", "--", "train"))]
    sharp = []
    for eps, style in zip(_eps_list(res), EPS_STYLES):
        rows = [[r.sharpness(eps) for r in _runs(res, n)] for n in regimes]
        if all(v is not None for row in rows for v in row):
            sharp.append(errorbar(ax2, sizes, rows, log=True, hollow=hollow, color="tab:red", ls=style,
                                  label=f"ε = {eps:g}"))
    extra = [unfitted_handle()] if any(hollow) else []
    for ax, handles in ((ax1, acc), (ax2, sharp)):
        ax.set_xlabel("batch size run (log scale)")
        ax.grid(alpha=0.3)
        ax.legend(handles=handles + extra, fontsize=8)
    ax1.set_ylabel("accuracy (%)")
    plain_log(ax2)
    ax2.set_ylabel("ε-sharpness, full space (log scale)")
    epochs = Counter(r.epochs for r in res.runs).most_common(1)[0][0]
    fig.suptitle(f"{res.study['name']}: accuracy and sharpness against the batch size ({_seeds(res)}, {epochs} epochs)",
                 fontsize=11)
    fig.subplots_adjust(bottom=0.3, wspace=0.28)
    for ax in (ax1, ax2):
        batch_ticks(ax, sizes)
    longer = [f"{n}: {r.epochs} epochs, {r.steps} updates" for n in regimes for r in _runs(res, n)[:1]
              if r.epochs != epochs]
    moved = renamed(res)
    _protocol_note(fig, f"Each batch size trained {epochs} epochs" + (f" ({'; '.join(longer)})" if longer else "")
                        + " from the same x0 per seed; x: the batch each regime ran"
                        + (f" ({'; '.join(f'{n} ran {b}' for n, _, b in moved)}: the training set has "
                           f"{res.data.get('train_examples', '?')} examples)" if moved else "")
                        + "; sharpness on the training set, as Tables 3-4. "
                        + spread_note(n_seeds, ("accuracy", False), ("sharpness", True))
                        + ("; hollow: did not fit the training set (< 99%)" if extra else "") + ".")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _num(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def steepest_fall(ks, centers) -> tuple[float, float, float, float, float] | None:
    """``(k_a, k_b, value at k_a, value at k_b, factor per epoch of k)`` for the consecutive k between which
    the sharpness falls fastest per epoch of k (k unevenly spaced); None where it never falls."""
    steps = [((centers[i + 1] / centers[i]) ** (1 / (ks[i + 1] - ks[i])), i) for i in range(len(ks) - 1)
             if ks[i + 1] > ks[i] and centers[i] > 0 and centers[i + 1] > 0]
    if not steps or min(steps)[0] >= 1:
        return None
    f, i = min(steps)
    return ks[i], ks[i + 1], centers[i], centers[i + 1], f


def warm_start(res: Results, out: Path, path: Path) -> Path | None:
    """Figure 5 analog: LB solutions started from the SB iterate after k epochs, against k."""
    starts = []
    for r in res.study["regimes"]:
        runs = _runs(res, r["name"]) if r.get("init_from") else []
        if runs:
            starts.append((r["name"], (runs[0].init_from or r["init_from"])["epoch"]))
    if not starts:
        return None
    starts.sort(key=lambda s: s[1])
    names, ks = [n for n, _ in starts], [k for _, k in starts]
    src = next(r["init_from"]["regime"] for r in res.study["regimes"] if r["name"] == names[0])
    hollow = _unfitted(res, names)
    n_seeds = _n_seeds(res)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 4.9))
    acc = [errorbar(ax1, ks, [[100 * r.test.accuracy for r in _runs(res, n)] for n in names], hollow=hollow,
                    color="tab:red", label="LB solution started at the SB iterate")]
    sb_hollow = []
    hists = [{h["epoch"]: h for h in read_history(out / Path(r.history).parent)} for r in _runs(res, src)]
    sb_k = sorted({k for k in ks if hists and all("test_accuracy" in h.get(k, {}) for h in hists)})  # k = 0: no row
    if sb_k:
        sb_hollow = [did_not_fit([h[k].get("train_accuracy") for h in hists]) for k in sb_k]
        acc.append(errorbar(ax1, sb_k, [[100 * h[k]["test_accuracy"] for h in hists] for k in sb_k], color="tab:blue",
                            hollow=sb_hollow, ls="--", label=f"the {src} iterate itself (its test accuracy at k)"))
    sharp, drop = [], None
    for eps, style in zip(_eps_list(res), EPS_STYLES):
        rows = [[r.sharpness(eps) for r in _runs(res, n)] for n in names]
        if all(v is not None for row in rows for v in row):
            sharp.append(errorbar(ax2, ks, rows, log=True, hollow=hollow, color="tab:red", ls=style,
                                  label=f"LB solution, ε = {eps:g}"))
            drop = drop or ((eps,) + d if (d := steepest_fall(ks, list(spreads(rows, log=True)[0]))) else None)
    extra = [unfitted_handle()] if any(hollow) or any(sb_hollow) else []
    ax1.set_ylabel("test accuracy (%)")
    ax2.set_ylabel("ε-sharpness, full space (log scale)")
    plain_log(ax2)
    for ax, handles, more in ((ax1, acc, extra), (ax2, sharp, extra if any(hollow) else [])):
        ax.set_xlabel(f"epochs of {src} training before switching to the large batch (k)")
        ax.grid(alpha=0.3)
        ax.legend(handles=handles + more, fontsize=8)
    fig.suptitle(f"{res.study['name']}: warm-starting the large batch from the small-batch iterate "
                 f"({_seeds(res)}, k = {', '.join(map(str, sorted(set(ks))))})", fontsize=11)
    fig.subplots_adjust(bottom=0.24, wspace=0.28)
    for ax in (ax1, ax2):
        value_ticks(ax, ks)
    lb_epochs = Counter(r.epochs for n in names for r in _runs(res, n)).most_common(1)[0][0]
    _protocol_note(fig, f"Each LB run trains {lb_epochs} epochs from the {src} iterate after k epochs "
                        "(fresh optimizer); sharpness on the training set. "
                        f"{spread_note(n_seeds, ('accuracy', False), ('sharpness', True))}"
                        + ("; hollow: did not fit the training set (< 99%)" if extra else "")
                        + (f". Steepest fall (ε = {drop[0]:g}): from k = {drop[1]} to k = {drop[2]}, "
                           f"{_num(drop[3])} to {_num(drop[4])} (×{drop[5]:.2f} per epoch of k)" if drop else "") + ".")
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
        loss = spreads(np.array([[p["train_loss"] for p in t[:n]] for t in trajs]).T, log=True)[0]
        for eps, style in zip(trajs[0][0]["sharpness"], EPS_STYLES):
            center, lo, hi = spreads(np.array([[p["sharpness"][eps] for p in t[:n]] for t in trajs]).T, log=True)
            ax.plot(loss, center, style, color=color, marker="o", ms=3.5, label=f"{regime}, ε = {eps}")
            if len(trajs) > 1:
                ax.fill_between(loss, lo, hi, color=color, alpha=0.12, lw=0)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    plain_log(ax, "x")
    plain_log(ax, "y")
    ax.invert_xaxis()  # training goes left to right: the loss falls
    ax.set_xlabel("training cross-entropy (log scale, decreasing: training proceeds to the right)")
    ax.set_ylabel("ε-sharpness, full space (log scale)")
    ax.set_title(f"{res.study['name']}: sharpness along training ({_seeds(res)}, geometric means)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    epochs = [p["epoch"] for p in next(r.trajectory for r in res.runs if r.trajectory)]
    fig.subplots_adjust(bottom=0.2)
    _protocol_note(fig, f"Measured at epochs {', '.join(map(str, epochs))}; each point the geometric mean over seeds "
                        f"of the training loss and of the sharpness at that epoch. "
                        f"{spread_note(_n_seeds(res), ('sharpness', True), kind='band')}.")
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
        opts = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in regime.get("remedy_options", {}).items())
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
                     + (f"switch at epoch {s['switch_epoch']}" if s["kind"] == "switch"
                        else f"geometric over {s['epochs']} epochs"))
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
    """Each method's test accuracy against its eps-sharpness: does a remedy that closes the gap also find
    a flatter minimum? Sharpness as a geometric mean ×/÷ one geometric std (log axis), accuracy mean ± std;
    names set beside their points without overlap; hollow: did not fit the training set."""
    comp = res.comparison
    sb, lb = (comp.small, comp.large) if comp else (None, None)
    eps = _eps_list(res)[0] if _eps_list(res) else None
    if not sb or not lb or eps is None:
        return None
    points = []
    for r in res.study["regimes"]:
        rows = [(run.sharpness(eps), run.test.accuracy, run.train.accuracy) for run in _runs(res, r["name"])]
        rows = [row for row in rows if row[0] is not None]
        if rows:
            points.append((r["name"], np.asarray(rows, dtype=float)))
    if len(points) < 2:
        return None
    n_seeds = _n_seeds(res)
    fig, ax = plt.subplots(figsize=(10.4, 5.8))
    fig.subplots_adjust(left=0.08, right=0.74, top=0.92, bottom=0.2)
    palette = [plt.get_cmap("tab10")(i) for i in range(10)] + ["darkslategray", "darkgoldenrod", "navy", "olive"]
    xy, names, colors, lows, highs, hollows, bars = [], [], [], [], [], [], []
    for name, rows in points:
        base = name in (sb, lb)
        color = "black" if base else palette[sum(c != "black" for c in colors) % len(palette)]
        x, xlo, xhi = geometric_stats(rows[:, 0])
        y, ylo, yhi = arithmetic_stats(100 * rows[:, 1])
        hollow = did_not_fit(rows[:, 2])
        ax.errorbar([x], [y], xerr=[[x - xlo], [xhi - x]], yerr=[[y - ylo], [yhi - y]], fmt="none", ecolor=color,
                    elinewidth=1.1, capsize=3, alpha=0.8)
        ax.plot([x], [y], "s" if base else "o", color=color, ms=7 if base else 6, mfc="white" if hollow else color,
                mew=1.6, zorder=3)
        for seq, v in ((xy, (x, y)), (names, name), (colors, color), (hollows, hollow), (lows, xlo), (highs, xhi)):
            seq.append(v)
        bars += [((xlo, y), (xhi, y)), ((x, ylo), (x, yhi))]
    for name, style in ((sb, "-"), (lb, "--")):
        ax.axhline(100 * res.regime(name).test_accuracy.mean, color="grey", ls=style, lw=1, zorder=1)
    plain_log(ax, "x")
    lo, hi = min(lows), max(highs)
    ax.set_xlim(lo / (hi / lo) ** 0.08, hi * (hi / lo) ** 0.12)
    ylo, yhi = ax.get_ylim()
    ax.set_ylim(ylo - 0.04 * (yhi - ylo), yhi + 0.06 * (yhi - ylo))
    ax.set_xlabel(f"ε-sharpness, ε = {eps:g}, full space (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{res.study['name']}: does closing the gap find a flatter minimum? ({_seeds(res)})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    handles = [Line2D([], [], color="grey", ls="-", lw=1, label=f"{sb} test accuracy"),
               Line2D([], [], color="grey", ls="--", lw=1, label=f"{lb} test accuracy"),
               Line2D([], [], ls="none", marker="s", color="black", ms=7, label=f"baselines ({sb}, {lb})"),
               Line2D([], [], ls="none", marker="o", color="tab:blue", ms=6, label="remedies (LB batch)")]
    if any(hollows):
        handles.append(unfitted_handle())
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    place_labels(ax, xy, names, colors, segments=bars)
    bars_note = spread_note(n_seeds, ("sharpness (x)", True), ("test accuracy (y)", False))
    _protocol_note(fig, f"Each point one regime; sharpness on the training set. {bars_note}; grey lines: the {sb} and "
                        f"{lb} mean test accuracy"
                        + ("; hollow: mean training accuracy below 99% (not fitted: a gap against it is partly one of "
                           "optimization)" if any(hollows) else "")
                        + ".")
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
        rows = np.asarray([[p["noise_scale"] if p["noise_scale"] is not None else np.nan for p in t[:n]]
                           for t in trajs], dtype=float).T
        errorbar(ax, epochs, rows, log=True, color=color)
        ax.plot([], [], "-o", ms=4, color=color, label=f"{regime}: B_simple at its iterates")
        batch = res.regime(regime).batch_size
        ax.axhline(batch, color=color, ls=":", lw=1.2, label=f"{regime}: its batch size ({batch})")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    plain_log(ax)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("gradient noise scale B_simple = tr(Σ)/|G|² (log scale)")
    ax.set_title(f"{res.study['name']}: the batch size beyond which large batches stop paying ({_seeds(res)})",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.subplots_adjust(bottom=0.2)
    _protocol_note(fig, "McCandlish et al. 2018: from batches of 32 and the full training gradient, finite-population "
                        f"corrected. {spread_note(_n_seeds(res), ('B_simple', True))}.")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
