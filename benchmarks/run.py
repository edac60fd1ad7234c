"""batchgap benchmarks: one command, a table of measurements against targets.

    python benchmarks/run.py                 # everything (about 10 minutes on 2 cores, plus about 4 for the peers-*)
    python benchmarks/run.py hvp curves      # some benchmarks by name
    python benchmarks/run.py peers-curves peers-hessian peers-density
        # side by side with the real loss-landscapes, PyHessian and curvlinops (benchmarks/peers.py; 3.5
        # minutes on 2 cores; needs `pip install --no-deps -r benchmarks/requirements-peers.txt`)

Each benchmark measures in this process (or in child processes it starts) and prints rows: what
was measured, the value, the baseline it is compared with, their ratio, the target, whether it is
met, and a note (with the load average: other processes may share the cores, so every comparison is
a ratio of interleaved, repeated measurements taken in the same process). Results belong in
docs/performance.md together with this command. Never a timed unit test: run it on a quiet machine.

The modules: harness.py (timing, the row format, the data and the trained model: what run.py, peers.py and
gpu_times.py share; it imports none of them), peers.py (imported on use), gpu_times.py (the table of
scripts/gpu-check.sh), and frozen/ (batchgap's old code the "as of commit X" rows time, torch only).
tests/test_benchmarks.py keeps their imports free of cycles and the frozen baselines free of batchgap.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, peers and frozen/, also when imported
from frozen.hvp_976ebaa import FullDataLoss as FrozenLoss  # noqa: E402
from frozen.train_976ebaa import train as train_976ebaa  # noqa: E402
from harness import (interleaved, load, matmul_peak, mnist1d, row, set_threads, synthetic_cifar,  # noqa: E402
                     timed, trained_mlp)


def _child_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------------ peaks
def peaks() -> list[dict]:
    import torch

    one, two = matmul_peak(1), matmul_peak(2)
    x = torch.empty(64 * 2**20 // 4)  # 64 MiB
    y = torch.empty_like(x)
    t = min(timed(lambda: y.copy_(x)) for _ in range(5))
    bw = 2 * x.numel() * 4 / t
    return [
        row("peak: float32 matmul 2048^3, 1 thread", f"{one / 1e9:.1f} GFLOP/s", "", "", "measured", True, load()),
        row("peak: float32 matmul 2048^3, 2 threads", f"{two / 1e9:.1f} GFLOP/s", f"{one / 1e9:.1f} (1 thread)",
            f"{two / one:.2f}x", "measured", True, load()),
        row("peak: memory copy 64 MiB", f"{bw / 1e9:.1f} GB/s (read+write)", "", "", "measured", True, load()),
    ]


# ------------------------------------------------------------------------------------------ training
def _reference_loop(model, dataset, epochs: int, batch_size: int, workers: int = 0, eval_data=None):
    """What a user would otherwise write: a DataLoader over a map-style dataset, PyTorch's default Adam,
    and (as train() does after its last epoch) the loss and accuracy over the training set."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0), persistent_workers=workers > 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            float(loss.detach())
    if eval_data is not None:
        model.eval()
        with torch.no_grad():
            for x, y in DataLoader(TensorDataset(eval_data.x, eval_data.y), batch_size=1000):
                out = model(x)
                float(F.cross_entropy(out, y)), int((out.argmax(1) == y).sum())

class CropFlipDataset:
    """torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip, written by hand, per sample."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        import torch
        import torch.nn.functional as F

        img = F.pad(self.x[i], (4, 4, 4, 4))
        dy, dx = torch.randint(0, 9, (2,)).tolist()
        img = img[:, dy : dy + 32, dx : dx + 32]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        return img, self.y[i]






def train_throughput() -> list[dict]:
    import torch
    from torch.utils.data import TensorDataset
    from batchgap.config import TrainConfig
    from batchgap.data import make_augment
    from batchgap.models import init_model
    from batchgap.train import train

    set_threads(1)
    rows = []
    ds = mnist1d()
    E = 2
    cfg = TrainConfig(epochs=E, eval_every=E)
    mlp = lambda: init_model("mlp", (40,), 10, 0)  # noqa: E731
    ref_ds = TensorDataset(ds.train.x, ds.train.y)
    fns = {
        "ours": lambda: train(mlp(), ds.train, None, cfg, 32, seed=0, progress=False),
        "976ebaa": lambda: train_976ebaa(mlp(), ds.train, None, cfg, 32, seed=0),
        "ref": lambda: _reference_loop(mlp(), ref_ds, E, 32, eval_data=ds.train),
    }
    t = interleaved(fns, repeats=5)
    cpu = interleaved({k: fns[k] for k in ("ours", "976ebaa")}, repeats=5, clock=time.process_time)
    t2 = timed(lambda: _reference_loop(mlp(), ref_ds, E, 32, workers=2, eval_data=ds.train))
    n = E * (len(ds.train) // 32) * 32
    ratio = t["976ebaa"] / t["ours"]
    a, b = mlp(), mlp()  # one run of each: the same final weights and running statistics, bit for bit?
    train(a, ds.train, None, cfg, 32, seed=0, progress=False)
    train_976ebaa(b, ds.train, None, cfg, 32, seed=0)
    same = all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))
    rows.append(row("training: default MLP, batch 32, MNIST-1D (train())",
                    f"{n / t['ours']:.0f} ex/s", f"{n / t['976ebaa']:.0f} ex/s (train() as of commit 976ebaa)",
                    f"{ratio:.2f}x", ">= 1.5x", ratio >= 1.5,
                    f"{E} epochs and the final evaluation, 1 thread; in CPU time {cpu['976ebaa'] / cpu['ours']:.2f}x; "
                    f"final weights bitwise equal to 976ebaa's: {'yes' if same else 'NO'} (ChainStep: the autograd "
                    f"step's aten ops without autograd); "
                    f"DataLoader reference loop (default Adam): {n / t['ref']:.0f} ex/s, "
                    f"ours {t['ref'] / t['ours']:.2f}x "
                    f"of it (976ebaa: {t['ref'] / t['976ebaa']:.2f}x); DataLoader num_workers=2: {n / t2:.0f} ex/s; "
                    f"{load()}"))
    data = synthetic_cifar(512)
    conv = lambda: init_model("simplevgg", (3, 32, 32), 10, 0, width=16, convs=1)  # noqa: E731
    aug = make_augment("crop-flip")
    cfg = TrainConfig(epochs=1, eval_every=1)
    ref_ds = CropFlipDataset(data.x, data.y)
    from batchgap import devices

    def plain_layout():  # train() without its channels_last fast path, to show what that path gives
        fast, devices.fast_layout = devices.fast_layout, (lambda m: m)
        try:
            train(conv(), data, None, cfg, 64, seed=0, augment=aug, progress=False)
        finally:
            devices.fast_layout = fast
    t = interleaved({
        "ref": lambda: _reference_loop(conv(), ref_ds, 1, 64, eval_data=data),
        "ours": lambda: train(conv(), data, None, cfg, 64, seed=0, augment=aug, progress=False),
        "nchw": plain_layout,
    }, repeats=2)
    n = (len(data) // 64) * 64
    # What the reference loop spends on its data path alone (the DataLoader's per-sample crop+flip and
    # collation, no model): the most any data path can save is that share of its time (Amdahl).
    from torch.utils.data import DataLoader
    fetch = min(timed(lambda: [None for _ in DataLoader(ref_ds, batch_size=64, shuffle=True, drop_last=True)])
                for _ in range(2))
    share = fetch / t["ref"]
    rows.append(row("training: conv net (SimpleVGG width 16, 1 conv/block) + crop-flip, batch 64",
                    f"{n / t['ours']:.0f} img/s", f"{n / t['ref']:.0f} img/s (DataLoader, per-sample crop+flip)",
                    f"{t['ref'] / t['ours']:.2f}x", ">= 1.5x", t["ref"] / t["ours"] >= 1.5,
                    f"train() without channels_last (NCHW, as before): {n / t['nchw']:.0f} img/s, "
                    f"{t['ref'] / t['nchw']:.2f}x; the reference's data path alone takes {100 * share:.0f}% "
                    f"of its time, so removing it "
                    f"entirely gives at most {1 / max(1 - share, 1e-9):.2f}x; the rest is the model's "
                    f"arithmetic (see the MFU rows); {load()}"))
    return rows


# ------------------------------------------------------------------------------------------ MFU
def mfu(with_compile: bool = False) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode
    from batchgap.data import make_augment
    from batchgap.models import init_model

    rows = []
    data = synthetic_cifar(256)
    aug = make_augment("crop-flip")
    B = 128
    x, y = data.x[:B], data.y[:B]
    name = "C1 (paper, conv 5x5 64) batch 128"

    def make(channels_last: bool):
        torch.manual_seed(0)
        m = init_model("C1", (3, 32, 32), 10, 0)
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(m.parameters(), fused=True)
        return m, opt

    def step(m, opt, channels_last, fn=None):
        xb = aug(x, torch.Generator().manual_seed(0))
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy((fn or m)(xb), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    m, opt = make(False)
    with FlopCounterMode(display=False) as counter:
        step(m, opt, False)
    flops = counter.get_total_flops()
    for threads in ((1,) if with_compile else (1, 2)):
        set_threads(threads)
        peak = matmul_peak(threads)
        variants = {}
        for cl in (False, True):
            m, opt = make(cl)
            step(m, opt, cl)
            variants["channels_last" if cl else "NCHW"] = (lambda m=m, opt=opt, cl=cl: step(m, opt, cl))
        t = interleaved(variants, repeats=3)
        best = min(t, key=t.get)
        util = flops / t[best] / peak
        rows.append(row(f"MFU: {name}, {threads} thread(s), {best}",
                        f"{flops / t[best] / 1e9:.1f} GFLOP/s = {100 * util:.0f}% of matmul",
                        f"matmul {peak / 1e9:.1f} GFLOP/s", f"{util:.2f}", ">= 0.50", util >= 0.5,
                        "; ".join(f"{k}: {flops / v / 1e9:.1f} GFLOP/s" for k, v in t.items()) + f"; {load()}"))
    if with_compile:
        set_threads(1)
        try:
            m, opt = make(True)
            compiled = torch.compile(m)
            t0 = time.perf_counter()
            step(m, opt, True, compiled)
            compile_s = time.perf_counter() - t0
            t = interleaved({"eager": lambda: step(m, opt, True), "compiled": lambda: step(m, opt, True, compiled)})
            note = (f"torch.compile (inductor, 1 thread): {flops / t['compiled'] / 1e9:.1f} GFLOP/s against eager "
                    f"{flops / t['eager'] / 1e9:.1f}, {t['eager'] / t['compiled']:.2f}x, "
                    f"after {compile_s:.0f} s of compiling")
        except Exception as e:  # no compiler, or inductor fails on this platform
            note = f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        rows.append(row(f"MFU: {name}, torch.compile",
                        note.split(":")[1].split(",")[0].strip() if "failed" not in note else "-",
                        "", "", "reported", True, note + f"; {load()}"))
    return rows


# ------------------------------------------------------------------------------------------ HVP


def hvp() -> list[dict]:
    import torch
    from batchgap.landscape import hessian_eigenvalues
    from batchgap.landscape.evaluate import mean_cross_entropy
    from batchgap.landscape.functional import FullDataLoss, session

    set_threads(1)
    ds = mnist1d()
    model = trained_mlp(ds)
    rows = []
    with session(model, "eval"):
        F = FullDataLoss(model, ds.train, batch_size=1000)
        params = [p for p in model.parameters()]

        def double_backward(v):  # PyHessian's hessian_vector_product, weighted over the batches
            out = torch.zeros_like(v, dtype=torch.float64)
            vs = list(torch.split(v.float(), [p.numel() for p in params]))
            for s in range(0, len(ds.train), 1000):
                x, y = ds.train.x[s : s + 1000], ds.train.y[s : s + 1000]
                loss = mean_cross_entropy(model(x), y)
                grads = torch.autograd.grad(loss, params, create_graph=True)
                dot = sum((g * u.view_as(g)).sum() for g, u in zip(grads, vs))
                hv = torch.autograd.grad(dot, params)
                out += torch.cat([h.reshape(-1) for h in hv]).double() * len(y)
            return out / len(ds.train)

        # 976ebaa's HVP (graphs rebuilt per call, BN unfolded) and the one before it (forward-over-reverse):
        # frozen copies (benchmarks/frozen/hvp_976ebaa.py), the model in eval mode as this session leaves it
        before = FrozenLoss(model, ds.train.x, ds.train.y, batch_size=1000)
        forward_over_reverse = before.forward_over_reverse

        V = torch.randn(4, F.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        a, b, c = (F.hvp(V), torch.stack([double_backward(v) for v in V]),
                   torch.stack([forward_over_reverse(v) for v in V]))
        rel = float(max((a - b).norm() / b.norm(), (c - b).norm() / b.norm()))
        t = interleaved({"ours": lambda: F.hvp(V), "ref": lambda: [double_backward(v) for v in V],
                         "fwd": lambda: [forward_over_reverse(v) for v in V]})
        t1 = interleaved({"ours": lambda: F.hvp(V[0]), "fwd": lambda: forward_over_reverse(V[0])})
        # one vector per call, as Lanczos asks: the kept graphs and the BN fold against 976ebaa's HVP
        seq = interleaved({"now": lambda: [F.hvp(v) for v in V], "before": lambda: [before.hvp(v) for v in V],
                           "before_block": lambda: before.hvp(V)})
        rel_seq = float((torch.stack([F.hvp(v) for v in V]) - before.hvp(V)).norm() / before.hvp(V).norm())
        kept_mib = F.graph_bytes / 2**20
    r = t["ref"] / t["ours"]
    rs = seq["before"] / seq["now"]
    rows.append(row("HVP one vector per call (a Lanczos step): default MLP, full training set, 4 calls",
                    f"{seq['now'] / 4 * 1e3:.0f} ms/HVP (gradient graphs kept across calls, "
                    f"{kept_mib:.0f} MiB; BN folded)",
                    f"{seq['before'] / 4 * 1e3:.0f} ms/HVP (976ebaa: graphs rebuilt per call, BN unfolded)",
                    f"{rs:.2f}x", "faster, same values", rs > 1 and rel_seq < 1e-5,
                    f"976ebaa with the 4 as one block: {seq['before_block'] / 4 * 1e3:.0f} ms/HVP; relative difference "
                    f"{rel_seq:.1e}; {load()}"))
    rows.append(row("HVP: default MLP, full training set (4000), 4 vectors",
                    f"{t['ours'] / 4 * 1e3:.0f} ms/HVP (batchgap: reverse-over-reverse, one graph per batch for the 4)",
                    f"{t['ref'] / 4 * 1e3:.0f} ms/HVP (our re-implementation of PyHessian's HVP: double backward "
                    "per vector, graph rebuilt; the library itself: peers-hessian)",
                    f"{r:.2f}x", ">= 1.0x, same values", r >= 1.0 and rel < 1e-5,
                    f"forward-over-reverse (torch.func): {t['fwd'] / 4 * 1e3:.0f} ms/HVP; one vector: ours "
                    f"{t1['ours'] * 1e3:.0f} ms, forward-over-reverse {t1['fwd'] * 1e3:.0f} ms; relative difference "
                    f"of the three {rel:.1e}; {load()}"))
    # top eigenvalue: Lanczos (ours, tol 1e-3) against power iteration (PyHessian's rule, tol 1e-3)
    ours = hessian_eigenvalues(model, ds.train, k=1, tol=1e-3, seed=0)
    exact = hessian_eigenvalues(model, ds.train, k=1, tol=1e-10, max_hvp=300, seed=1).eigenvalues[0]
    with session(model, "eval"):
        F = FullDataLoss(model, ds.train, batch_size=1000)
        w = torch.randn(F.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        w /= w.norm()
        eig, count, pyhessian_count = None, 0, None
        for _ in range(300):
            hw = F.hvp(w)
            count += 1
            new = float(w @ hw)
            if pyhessian_count is None and eig is not None and abs(new - eig) / (abs(eig) + 1e-6) < 1e-3:
                pyhessian_count, pyhessian_eig = count, new
            eig = new
            # the stopping rule of our Lanczos: residual ||H w - lambda w|| <= tol |lambda|
            if float((hw - new * w).norm()) <= 1e-3 * abs(new):
                break
            w = hw / hw.norm()
    err_l, err_p = abs(ours.eigenvalues[0] - exact) / exact, abs(eig - exact) / exact
    err_h = abs(pyhessian_eig - exact) / exact if pyhessian_count else float("nan")
    rows.append(row("top Hessian eigenvalue: default MLP, full training set, residual <= 1e-3 abs(lambda)",
                    f"{ours.hvps} HVPs (Lanczos, {ours.lanczos_steps} steps + 1 residual check)",
                    f"{count} HVPs (power iteration, same stopping rule)", f"{count / ours.hvps:.1f}x fewer",
                    "fewer HVPs", ours.hvps < count,
                    f"relative error vs a 1e-10 Lanczos: Lanczos {err_l:.1e}, power {err_p:.1e}; PyHessian's rule "
                    f"(eigenvalue change < 1e-3) stops power iteration after {pyhessian_count} HVPs at error "
                    f"{err_h:.1e}; lambda = {exact:.4g}"))
    return rows


# ------------------------------------------------------------------------------------------ sharpness
def sharpness() -> list[dict]:
    from batchgap.config import TrainConfig
    from batchgap.landscape import eps_sharpness
    from batchgap.models import init_model
    from batchgap.train import train

    set_threads(1)
    ds = mnist1d()
    model = trained_mlp(ds)
    res = {}
    t = interleaved({
        "epoch": lambda: train(init_model("mlp", (40,), 10, 0), ds.train, None, TrainConfig(epochs=1), 32,
                               progress=False),
        "full": lambda: res.__setitem__("full", eps_sharpness(model, ds.train, eps=1e-3, max_iter=10)),
        "sub": lambda: res.__setitem__("sub", eps_sharpness(model, ds.train, eps=1e-3, subspace_dim=100, max_iter=10)),
    }, repeats=2)
    rows = []
    for key, label in (("full", "full space"), ("sub", "random 100-dim subspace")):
        r = res[key]
        rows.append(row(f"eps-sharpness ({label}), max_iter 10, default MLP",
                        f"{r.nfev} loss+grad passes, {t[key]:.2f} s", f"one SB training epoch {t['epoch']:.2f} s",
                        f"{t[key] / t['epoch']:.2f} epochs", "<= 15 passes", r.nfev <= 15,
                        f"{r.nit} iterations; {load()}"))
    # the L-BFGS-B driver: batchgap's loop over scipy's compiled setulb against scipy.optimize.minimize
    from batchgap.landscape import boxmax

    direct_solve = boxmax._solve
    with_minimize = lambda objective, h, it, fun, cb: boxmax._scipy(objective, h, it, fun, cb)  # noqa: E731

    def using(solve, key):
        boxmax._solve = solve
        try:
            res[key] = eps_sharpness(model, ds.train, eps=1e-3, max_iter=10)
        finally:
            boxmax._solve = direct_solve
    t = interleaved({"direct": lambda: using(direct_solve, "direct"),
                     "minimize": lambda: using(with_minimize, "minimize")},
                    repeats=3)
    same = all(getattr(res["direct"], k) == getattr(res["minimize"], k) for k in ("value", "nit", "nfev", "stop"))
    rows.append(row("eps-sharpness (full space) call: L-BFGS-B loop over scipy's setulb, array bounds",
                    f"{t['direct']:.2f} s", f"{t['minimize']:.2f} s (scipy.optimize.minimize, Bounds)",
                    f"{t['minimize'] / t['direct']:.2f}x", "faster, same result", same and t["direct"] < t["minimize"],
                    f"same value, iterations, evaluations and stop: {same}; used: {boxmax.direct_driver_ok()}; "
                    f"{load()}"))
    return rows


def generalization() -> list[dict]:
    """Issue 15's budget: the generalization measures a default run adds (norms, average sharpness and
    PAC-Bayes flatness, plain and magnitude-aware, the SLQ spectral density), side by side with the
    measurements a default run made before them, on one trained default MLP, 1 thread."""
    from dataclasses import replace

    from batchgap.config import MeasureConfig
    from batchgap.measure import generalization_measures, geometry

    set_threads(1)
    ds = mnist1d()
    model = trained_mlp(ds, epochs=10)
    before = replace(MeasureConfig(), norms=False, average_sigma=0.0, average_sigma_relative=0.0, pac_bayes_delta=0.0,
                     density_vectors=0)
    common = {"batch_size": 1000, "bn": "eval"}
    out = {}
    t = interleaved({
        "before": lambda: geometry(model, ds, before, 0, surface=False),
        "new": lambda: out.__setitem__("g", generalization_measures(model, ds.train, MeasureConfig(), 0, common)),
        "worst": lambda: out.__setitem__("w", generalization_measures(
            model, ds.train, replace(MeasureConfig(), norms=False, average_sigma=0.0, average_sigma_relative=0.0,
                                     pac_bayes_delta=0.0, density_vectors=0, worst_case_delta=0.1), 0, common)),
    }, repeats=2)
    g, w = out["g"], out["w"]
    tried = f"PAC-Bayes sigmas tried {g['pac_bayes']['sigmas_tried']}/{g['pac_bayes_mag']['sigmas_tried']}"
    return [
        row("generalization measures a default run adds (norms, average sharpness x2, PAC-Bayes x2, SLQ 1x20)",
            f"{t['new']:.2f} s",
            f"the default run's other measurements (no surface: seeds after the first) {t['before']:.2f} s",
            f"{t['new'] / t['before']:.2f}", "<= 0.50", t["new"] <= 0.5 * t["before"],
            f"{tried}; density {g['density']['hvps']} HVPs in {g['density']['steps']} block HVP calls "
            f"(hessian.lanczos_block, the engine of hessian_eigenvalues); {load()}"),
        row("worst-case flatness x2 (opt-in: measure.worst_case_delta, on in the measures study)",
            f"{t['worst']:.2f} s", f"the default run's other measurements {t['before']:.2f} s",
            f"{t['worst'] / t['before']:.2f}", "reported, no target", True,
            f"{w['worst_case']['solves']} + {w['worst_case_mag']['solves']} box maximizations, "
            f"{w['worst_case']['nfev'] + w['worst_case_mag']['nfev']} loss+grad passes; {load()}"),
    ]


# ------------------------------------------------------------------------------------------ noise scale
def noise_scale() -> list[dict]:
    """Issue 16: the study's B_simple, exact from per-example squared norms in closed form (one forward and
    backward pass), against the former measurement (200 batches of 32 and the exact full gradient) and
    against enumerating the per-example gradients with vmap; trained default MLP, 1 thread."""
    from batchgap.config import MeasureConfig
    from batchgap.landscape import exact_gradient_noise_scale, gradient_noise_scale
    from batchgap.measure import noise_scale as measured

    set_threads(1)
    ds = mnist1d()
    model = trained_mlp(ds, epochs=10)
    mcfg, out = MeasureConfig(), {}
    t = interleaved({
        "new": lambda: out.__setitem__("new", measured(model, ds.train, mcfg, 0)),
        "today": lambda: out.__setitem__("today", gradient_noise_scale(
            model, ds.train, small=32, big=None, n_batches=200, seed=0, batch_size=mcfg.eval_batch_size)),
        "vmap": lambda: out.__setitem__("vmap", exact_gradient_noise_scale(
            model, ds.train, batch_size=mcfg.eval_batch_size, _fast=False)),
    }, repeats=3)
    new, today, vm = out["new"], out["today"], out["vmap"]
    agree = max(abs(new[k] / getattr(vm, k) - 1) for k in ("b_simple", "grad_norm_sq", "trace_sigma"))
    r = t["today"] / t["new"]
    return [row("noise scale B_simple: trained default MLP (10 epochs), 4000 examples, 1 thread",
                f"{t['new']:.3f} s (exact: {new['grad_path']})",
                f"{t['today']:.2f} s (200 batches of 32 + the exact full gradient)", f"{r:.1f}x",
                ">= 3x faster than today's 200-batch estimate, exact",
                r >= 3 and new["interval"].startswith("none: exact") and agree < 1e-4,
                f"exact B_simple {new['b_simple']:.4g} (|G|^2 {new['grad_norm_sq']:.3g}, "
                f"tr(Sigma) {new['trace_sigma']:.3g}); "
                f"the 200-batch estimate {today.b_simple:.4g} ({100 * today.confidence:g}% CI {today.ci_low:.4g} to "
                f"{today.ci_high:.4g}, delta-method stderr {today.b_simple_stderr:.2g}); vmap enumeration "
                f"{t['vmap']:.2f} s ({t['vmap'] / t['new']:.1f}x the closed form), relative difference {agree:.1e}; "
                f"{load()}")]


# ------------------------------------------------------------------------------------------ curves
def curves() -> list[dict]:
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from batchgap.landscape import filter_normalized_direction, loss_curve
    from batchgap.landscape.evaluate import mean_cross_entropy
    from batchgap.landscape.params import flat, named_parameters, preserved, set_flat

    set_threads(1)
    ds = mnist1d()
    model = trained_mlp(ds)
    d = filter_normalized_direction(model, seed=0)
    alphas = np.linspace(-1, 1, 21)
    out = {}

    def loss_landscape_style():  # net_plotter.set_weights + evaluation.eval_loss over a DataLoader (batch 128)
        loader = DataLoader(TensorDataset(ds.train.x, ds.train.y), batch_size=128, shuffle=False)
        params = [p for _, p in named_parameters(model, "all")]
        x0 = flat(params)
        dvec = torch.cat([t.reshape(-1) for t in d.values()]) if isinstance(d, dict) else None
        losses = []
        with preserved(model), torch.no_grad():
            model.eval()
            for a in alphas:
                set_flat(params, x0 + float(a) * dvec)
                total, n = 0.0, 0
                for x, y in loader:
                    total += mean_cross_entropy(model(x), y).item() * len(y)
                    n += len(y)
                losses.append(total / n)
        out["ref"] = np.array(losses)

    def ours():
        out["ours"] = loss_curve(model, d, ds.train, alphas).loss

    def point_outer():
        out["po"] = loss_curve(model, d, ds.train, alphas, fast=False).loss

    t = interleaved({"ref": loss_landscape_style, "ours": ours, "po": point_outer})
    diff = float(np.abs(out["ours"] - out["ref"]).max())
    r = t["ref"] / t["ours"]
    return [row("loss curve: 21 points, default MLP, full training set",
                f"{21 / t['ours']:.0f} points/s",
                f"{21 / t['ref']:.0f} points/s (our re-implementation of loss-landscape's loop: set weights, "
                "DataLoader pass; the library itself: peers-curves)",
                f"{r:.2f}x", ">= 2x", r >= 2,
                f"our one evaluate() per point: {21 / t['po']:.0f} points/s; max abs(loss difference) {diff:.1e}; "
                f"{load()}")]


# ------------------------------------------------------------------------------------------ end to end
def _tree_rss(root: int) -> tuple[float, dict]:
    """Sum of VmRSS over ``root`` and its descendants (MiB), and each one's VmHWM (its own peak)."""
    children: dict = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    total, hwm, todo = 0.0, {}, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            status = open(f"/proc/{pid}/status").read()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm[pid] = int(line.split()[1]) / 1024
    return total, hwm


STUDY_LIMITS_S = {"default": 180}  # issue 6; every other built-in study: 20 minutes (issue 4)
EXPERIMENT_STUDIES = ["batch-sweep", "warm-start", "sharpness-trajectory", "remedies", "noise-scale"]


def _study_timing(name: str, jobs: int, threads: int, out: Path, data_dir: Path, extra: tuple[str, ...] = (),
                  code: Path | None = None) -> tuple[float, float, dict, dict]:
    """Wall seconds, peak resident MiB of the whole process tree, per-process peaks, results.json of
    `batchgap run NAME --out OUT` (the code under ``code``/src when given: another commit's)."""
    import threading

    if out.exists():
        raise RuntimeError(f"{out} exists: a timing must start from an empty output directory")
    env = {**os.environ, "BATCHGAP_DATA": str(data_dir)}
    if code is not None:
        env["PYTHONPATH"] = str(code / "src")
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchgap", "run", name, "--out", str(out), "--jobs", str(jobs),
         "--threads", str(threads), *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    peak, hwm = [0.0], {}

    def sample():
        while proc.poll() is None:
            total, h = _tree_rss(proc.pid)
            peak[0] = max(peak[0], total)
            for pid, v in h.items():
                hwm[pid] = max(hwm.get(pid, 0.0), v)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(err)
    return wall, peak[0], hwm, json.loads((out / "results.json").read_text())


def _cached_data(tmp: str) -> Path:
    data_dir = Path(os.environ.get("BATCHGAP_DATA") or Path(tmp) / "data")
    # generate MNIST-1D once so the timing is the study's, as on every run after the first
    subprocess.run([sys.executable, "-c",
                    f"from batchgap.data import load_dataset; load_dataset('mnist1d', data_dir={str(data_dir)!r})"],
                   check=True)
    return data_dir


def _finding(doc: dict) -> str:
    comp = doc.get("comparison") or {}
    return (f"gap {100 * comp['test_accuracy_gap']:+.2f} points ({comp['small']} - {comp['large']}), "
            f"p = {comp['p_value']:.2g}; " if "test_accuracy_gap" in comp else "")


def study_run(name: str, jobs: int = 2, threads: int = 1, keep: Path | None = None,
              extra: tuple[str, ...] = ()) -> dict:
    """The whole `batchgap run NAME` (data cached, report included) in a fresh process tree, with the
    resident memory of all its processes together sampled every 0.1 s. Its output is kept under ``keep``."""
    limit = STUDY_LIMITS_S.get(name, 1200)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = _cached_data(tmp)
        out = (keep or Path(tmp)) / (name + "".join(extra))
        wall, peak, hwm, doc = _study_timing(name, jobs, threads, out, data_dir, extra)
        return row(
            f"study `{name}`, --jobs {jobs} --threads {threads}{''.join(' ' + e for e in extra)} "
            f"({len(doc['runs'])} runs)",
            f"{wall:.1f} s; peak RSS {peak:.0f} MiB all processes together",
            "", "", f"<= {limit} s, <= 2048 MiB", wall <= limit and peak <= 2048,
            f"{len(hwm)} processes, sum of their own peaks {sum(hwm.values()):.0f} MiB "
            f"(largest {max(hwm.values()):.0f}); "
            f"{_finding(doc)}{load()}",
        )


BASE_COMMIT = "6dd7d34"  # issue 16: the default study >= 1.8x faster than this commit's


# the generalization measures issue 15 added to every run (and its report sections), off: 6dd7d34's measuring
WITHOUT_ISSUE_15 = ("--set", "measure.norms=false", "--set", "measure.average_sigma=0", "--set",
                    "measure.average_sigma_relative=0", "--set", "measure.pac_bayes_delta=0", "--set",
                    "measure.density_vectors=0")


def default_study_vs_base(jobs: int = 2, threads: int = 1) -> list[dict]:
    """The default study with BASE_COMMIT's code (``git archive`` of its src/, run by the same Python), with
    this checkout's, and with this checkout's without issue 15's measures (the work 6dd7d34 did), one after
    the other, each from an empty output directory, the data cached."""
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = _cached_data(tmp)
        base = Path(tmp) / "base"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", BASE_COMMIT, "src"], check=True,
                                 capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
        t = {}
        for key, code, extra in (("base", base, ()), ("now", None, ()), ("same", None, WITHOUT_ISSUE_15)):
            t[key] = _study_timing("default", jobs, threads, Path(tmp) / f"out-{key}", data_dir, extra, code=code)
    (wb, pb, _, db), (wn, pn, _, dn), (ws, ps, _, ds) = t["base"], t["now"], t["same"]
    r, rs = wb / wn, wb / ws
    return [row(f"study `default`, --jobs {jobs} --threads {threads}: this checkout against commit {BASE_COMMIT}",
                f"{wn:.1f} s; peak RSS {pn:.0f} MiB all processes together ({len(dn['runs'])} runs)",
                f"{wb:.1f} s; peak RSS {pb:.0f} MiB ({BASE_COMMIT}, {len(db['runs'])} runs)",
                f"{r:.2f}x", ">= 1.8x, <= 2048 MiB", r >= 1.8 and pn <= 2048,
                f"without issue 15's measures (what {BASE_COMMIT} measured): {ws:.1f} s, {rs:.2f}x, peak {ps:.0f} MiB, "
                f"{_finding(ds)}now: {_finding(dn)}{BASE_COMMIT}: {_finding(db)}run one after the other; {load()}")]


BENCHMARKS = {
    "peaks": peaks,
    "training": train_throughput,
    "mfu": mfu,
    "hvp": hvp,
    "sharpness": sharpness,
    "curves": curves,
    "noise-scale-exact": noise_scale,
    "generalization": generalization,
    "default-study": lambda: [study_run("default")],
    "default-study-vs-base": default_study_vs_base,
    # issue 16: the real peer libraries (benchmarks/peers.py, imported on use: it needs numpy and scipy at import)
    "peers-curves": lambda: importlib.import_module("peers").curves_rows(),
    "peers-hessian": lambda: importlib.import_module("peers").hessian_rows(),
    "peers-density": lambda: importlib.import_module("peers").density_rows(),
    # issue 27: one measurement on 1 and 2 processes (benchmarks/data_parallel.py, spawns its workers)
    "data-parallel": lambda: importlib.import_module("data_parallel").rows(),
}
# Not part of "all" (they take 3-10 minutes each): `python benchmarks/run.py --studies [--keep DIR]`
STUDIES = {f"study-{n}": n for n in EXPERIMENT_STUDIES}
# Also not part of "all": torch.compile of C1 (about 200 s of compiling on this CPU, 0.84x of eager when measured)
EXTRA = {"mfu-compile": lambda: mfu(with_compile=True),
         "trace-accuracy": lambda: importlib.import_module("trace_accuracy").rows()}  # about 20 min on one core


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/run.py", description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", choices=[*BENCHMARKS, *EXTRA, *STUDIES, []], metavar="NAME",
                   help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)}); also {', '.join(EXTRA)} "
                        f"(torch.compile), and {', '.join(STUDIES)}: the experiment studies end to end, "
                        "each at its default size")
    p.add_argument("--studies", action="store_true", help="time every experiment study (about 25 minutes on 2 cores)")
    p.add_argument("--keep", type=Path, help="keep the studies' output directories here (to read their reports)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    names = args.names or ([] if args.studies else list(BENCHMARKS))
    if args.studies:
        names += [n for n in STUDIES if n not in names]
    benchmarks = {**BENCHMARKS, **EXTRA,
                  **{k: (lambda n=n: [study_run(n, keep=args.keep)]) for k, n in STUDIES.items()}}
    if args.keep:
        benchmarks["default-study"] = lambda: [study_run("default", keep=args.keep)]
    import torch

    print(f"# {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"torch {torch.__version__}, {load()}")
    print("| benchmark | measured | baseline | ratio | target | met | note |")
    print("|---|---|---|---|---|---|---|")
    ok = True
    start = time.perf_counter()
    for name in names:
        for r in benchmarks[name]():
            ok &= bool(r["met"])
            print(f"| {r['benchmark']} | {r['value']} | {r['baseline']} | {r['ratio']} | {r['target']} | "
                  f"{'yes' if r['met'] else 'NO'} | {r['note']} |", flush=True)
    print(f"# {time.perf_counter() - start:.0f} s in all, {load()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
