"""Side-by-side rows against the real peer libraries (issue 16): loss-landscapes, PyHessian, curvlinops.

    python benchmarks/run.py peers-curves peers-hessian peers-density

Needs the pinned peers: ``pip install --no-deps -r benchmarks/requirements-peers.txt`` (``--no-deps``:
backpack-for-pytorch, which curvlinops imports, requires torchvision, and resolving it would replace a
CPU torch with another build). Every peer is called as its own documentation shows, on the same model
(the default MLP trained as ``harness.trained_mlp(ds, epochs=10)``: MNIST-1D, 146k parameters, BatchNorm, eval
mode), the same data (all 4000 training examples as plain tensors), float32, cross-entropy, one thread,
interleaved with batchgap in this process; the values are compared, not only the times.

What the peers' sources say, and what each comparison therefore gives batchgap:

* loss-landscapes ``random_line(model, metric, distance, steps, normalization='filter')`` draws its
  direction from the GLOBAL torch RNG as U[0, 1) entries (``rand_u_like``, not Gaussian), rescales every
  filter (row of a >= 2-D tensor) and every entry of a 1-D tensor (biases, BN weight and bias: d_i = |w_i|)
  to the parameter's norm, then rescales the whole direction to norm ||theta|| / distance / steps (so
  ``distance`` DIVIDES: the line ends ||theta|| / distance from the start, 10 ||theta|| at the default
  0.1), and evaluates theta + i s for i = 1..steps (the start point itself is never evaluated), each point
  by adding s in place to the previous one. batchgap's :func:`loss_curve` gets that same direction
  (:func:`ll_line_direction`, loss-landscapes' own functions from the same RNG state) and alphas 1..steps.
* ``random_plane``: d1 as above, d2 = ``orthogonal_to(d1)`` (a second U[0,1) draw made orthogonal to d1
  BEFORE both are filter-normalized, so they are not orthogonal after), both scaled to ||theta|| /
  distance / steps, start moved by -steps/2 of each; it then walks the grid in a serpentine whose odd
  columns are one step behind the even ones: the value [i, j] is at theta + (i - steps/2) d1 + (j + 1 -
  steps/2) d2 for even i and + (j - steps/2) d2 for odd i (with 11 steps the centre theta is never on the
  grid). batchgap evaluates exactly those points (:func:`plane_like_random_plane`: one
  :func:`loss_surface` for the even rows, one for the odd).
* ``linear_interpolation(start, end, metric, steps)`` moves the PARAMETERS only, in ``steps`` in-place
  steps, evaluating alpha = i / steps for i = 1..steps; BatchNorm buffers stay the start model's all the
  way, also at alpha = 1. batchgap's :func:`interpolate` (bn="eval", which interpolates float buffers)
  gets an end model carrying the start model's buffers, so both compute the same function.
* All three leave the model's parameters at the last point and set ``requires_grad=False`` on them
  (``wrap_model``) unless ``deepcopy_model=True``: every call here passes it.
* PyHessian ``hessian(model, criterion, data=(x, y), cuda=False)``: one batch, its gradient graph kept
  (``loss.backward(create_graph=True)``), HVPs by double backward. ``trace(maxIter, tol)`` stops when
  ``abs(mean_k - mean_{k-1}) / (mean_{k-1} + 1e-6) < tol`` (the denominator is not abs()), so only
  ``tol=-inf`` guarantees exactly ``maxIter`` probes. ``eigenvalues(maxIter=100, tol=1e-3, top_n)`` is
  power iteration with deflation, stopping on a relative change of the Rayleigh quotient < tol.
  ``density()`` calls ``torch.eig``, removed from torch. Its random vectors come from the global RNG.
* curvlinops ``HessianLinearOperator(model, loss_func, params, data)``, data a list of batches (here the
  4000 examples in batches of 1000, batchgap's default batch size); construction checks determinism
  (two loss and gradient passes and a matvec check); ``hutchinson_trace(H, num_matvecs)`` multiplies H
  onto all probes at once (vmap); ``scipy.sparse.linalg.eigsh(H.to_scipy(), k, which='LA', tol)``;
  ``lanczos_approximate_spectrum(H, ncv, num_repeats)`` (Papyan 2020: Lanczos without
  reorthogonalization from Gaussian starts) first estimates the spectrum's boundaries with ``eigsh(k=2,
  which='BE', tol=1e-2)``, HVPs on top of its ncv * num_repeats.
* The eigenvalue errors are against a reference outside all three: scipy ``eigsh(tol=1e-10)`` on a
  float64 copy of the model (plain double-backward HVPs), computed once per process.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy.sparse.linalg import LinearOperator, eigsh

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import interleaved, load, mnist1d, row, set_threads, timed, trained_mlp  # noqa: E402

INSTALL = "pip install --no-deps -r benchmarks/requirements-peers.txt"
SAME_PROBES = ": the same probes, both drawn from torch CPU generators seeded 0 in the same order"
EIG_TOLS = (1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1, 2e-1, 5e-1)  # searched for batchgap's loosest tol


# ------------------------------------------------------------------------------------------ loss-landscapes
def _named(model, tensors) -> dict:
    """A list aligned with ``model.parameters()`` (loss-landscapes' order) as ``{name: tensor}``."""
    return {name: t for (name, _), t in zip(model.named_parameters(), tensors)}


def ll_line_direction(model, distance: float, steps: int, normalization: str = "filter") -> list:
    """The step vector s that ``loss_landscapes.random_line`` draws from the current global RNG state,
    built with loss-landscapes' own functions in its order (call ``torch.manual_seed`` first, as before
    the call it reproduces)."""
    from loss_landscapes.model_interface.model_parameters import rand_u_like
    from loss_landscapes.model_interface.model_wrapper import wrap_model

    start = wrap_model(copy.deepcopy(model)).get_module_parameters()
    direction = rand_u_like(start)
    getattr(direction, f"{normalization}_normalize_")(start)
    direction.mul_(((start.model_norm() / distance) / steps) / direction.model_norm())
    return [t.clone() for t in direction.parameters]


def ll_plane_directions(model, distance: float, steps: int, normalization: str = "filter") -> tuple[list, list]:
    """``random_plane``'s two step vectors, as it leaves them before its walk (same RNG remark)."""
    from loss_landscapes.model_interface.model_parameters import orthogonal_to, rand_u_like
    from loss_landscapes.model_interface.model_wrapper import wrap_model

    start = wrap_model(copy.deepcopy(model)).get_module_parameters()
    d1 = rand_u_like(start)
    d2 = orthogonal_to(d1)
    for d in (d1, d2):
        getattr(d, f"{normalization}_normalize_")(start)
    for d in (d1, d2):
        d.mul_(((start.model_norm() / distance) / steps) / d.model_norm())
    for d in (d1, d2):  # random_plane's in-place round trip, reproduced for the last bit
        d.mul_(steps / 2)
        d.truediv_(steps / 2)
    return [t.clone() for t in d1.parameters], [t.clone() for t in d2.parameters]


def line_like_random_line(model, data, steps: int, direction: list) -> np.ndarray:
    """batchgap's :func:`loss_curve` at the points ``random_line`` evaluates: theta + i s, i = 1..steps."""
    from batchgap.landscape import loss_curve

    return loss_curve(model, _named(model, direction), data, alphas=np.arange(1, steps + 1)).loss


def plane_like_random_plane(model, data, steps: int, d1: list, d2: list) -> np.ndarray:
    """batchgap's :func:`loss_surface` at the points ``random_plane`` evaluates (module docstring), laid
    out as it returns them: ``[i, j]``, i along d1. ``steps`` odd (an even one can make a row's grid
    symmetric about 0 without containing it, which :func:`loss_surface` refuses)."""
    from batchgap.landscape import loss_surface

    if steps % 2 != 1:
        raise ValueError("steps must be odd")
    half, j = steps / 2, np.arange(steps)
    D1, D2 = _named(model, d1), _named(model, d2)
    out = np.empty((steps, steps))
    even, odd = np.arange(0, steps, 2), np.arange(1, steps, 2)
    out[even] = loss_surface(model, D1, D2, data, alphas=even - half, betas=j + 1 - half).loss
    if len(odd):
        out[odd] = loss_surface(model, D1, D2, data, alphas=odd - half, betas=j - half).loss
    return out


def with_buffers_of(model, source):
    """A copy of ``model`` carrying ``source``'s buffers (BN running statistics)."""
    out = copy.deepcopy(model)
    src = dict(source.named_buffers())
    for name, buf in out.named_buffers():
        buf.copy_(src[name])
    return out


def interpolation_like_linear_interpolation(model_start, model_end, data, steps: int) -> np.ndarray:
    """batchgap's :func:`interpolate` at ``linear_interpolation``'s points, alpha = i / steps, i = 1..steps,
    with the start model's BN buffers throughout (as loss-landscapes moves the parameters only)."""
    from batchgap.landscape import interpolate

    end = with_buffers_of(model_end, model_start)
    return interpolate(model_start, end, data, alphas=np.arange(1, steps + 1) / steps, bn="eval").loss


# ------------------------------------------------------------------------------------------ Hessian peers
@contextlib.contextmanager
def counting_pyhessian_hvps():
    """Count PyHessian's single-batch HVPs (its module-level ``hessian_vector_product``, looked up at
    each call); the package re-exports the class ``hessian`` under its module's name, hence sys.modules."""
    import pyhessian  # noqa: F401

    module = sys.modules["pyhessian.hessian"]
    original, count = module.hessian_vector_product, [0]

    def hvp(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    module.hessian_vector_product = hvp
    try:
        yield count
    finally:
        module.hessian_vector_product = original


def pyhessian_comp(model, criterion, x, y):
    """``hessian(model, criterion, data=(x, y), cuda=False)``, gradients cleared first: its gradient is
    ``loss.backward(create_graph=True)`` added to whatever ``.grad`` already holds."""
    from pyhessian import hessian

    model.zero_grad(set_to_none=True)
    return hessian(model, criterion, data=(x, y), cuda=False)


def pyhessian_trace(model, criterion, x, y, probes: int, seed: int = 0) -> tuple[list, int]:
    """PyHessian's Hutchinson values z^T H z, exactly ``probes`` of them (tol=-inf: module docstring)."""
    import torch

    torch.manual_seed(seed)
    with counting_pyhessian_hvps() as count:
        values = pyhessian_comp(model, criterion, x, y).trace(maxIter=probes, tol=-math.inf)
    model.zero_grad(set_to_none=True)
    return values, count[0]


def pyhessian_top(model, criterion, x, y, top_n: int, seed: int = 0, **kwargs) -> tuple[np.ndarray, int]:
    """PyHessian ``eigenvalues(top_n=top_n)`` (defaults maxIter=100, tol=1e-3 unless given), descending,
    and its HVP count."""
    import torch

    torch.manual_seed(seed)
    with counting_pyhessian_hvps() as count:
        values, _ = pyhessian_comp(model, criterion, x, y).eigenvalues(top_n=top_n, **kwargs)
    model.zero_grad(set_to_none=True)
    return np.sort(np.array(values, dtype=np.float64))[::-1], count[0]


def curvlinops_hessian(model, criterion, x, y, batch_size: int = 1000):
    """curvlinops' ``HessianLinearOperator`` over the data in batches of ``batch_size``."""
    from curvlinops import HessianLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    data = list(zip(x.split(batch_size), y.split(batch_size)))
    return HessianLinearOperator(model, criterion, params, data)


def count_torch_matvecs(H) -> list:
    """Count the vectors H is multiplied onto from now on (``@`` and ``to_scipy()`` go through ``_matmat``)."""
    original, count = H._matmat, [0]

    def matmat(X):
        count[0] += X[0].shape[-1]
        return original(X)

    H._matmat = matmat
    return count


class CountingOperator(LinearOperator):
    """A scipy LinearOperator wrapping another, counting the vectors it is applied to."""

    def __init__(self, A):
        self.A, self.count = A, 0
        super().__init__(A.dtype, A.shape)

    def _matvec(self, v):
        self.count += 1
        return self.A.matvec(v)

    def _matmat(self, V):
        self.count += V.shape[1]
        return self.A.matmat(V)


def curvlinops_top(model, criterion, x, y, k: int, tol: float = 1e-3) -> tuple[np.ndarray, int]:
    """``eigsh(H.to_scipy(), k=k, which='LA', tol=tol)`` on curvlinops' Hessian, descending, matvecs."""
    op = CountingOperator(curvlinops_hessian(model, criterion, x, y).to_scipy())
    values = eigsh(op, k=k, which="LA", tol=tol, return_eigenvectors=False)
    return np.sort(values)[::-1], op.count


_REFERENCE: dict = {}


def exact_top_eigenvalues(model, x, y, k: int = 3, tol: float = 1e-10) -> tuple[np.ndarray, int, float]:
    """The k largest eigenvalues by scipy ``eigsh(which='LA', tol)`` on a float64 copy of ``model``
    (double-backward HVPs over all of x, one graph kept), descending; with its matvecs and seconds.
    Cached per parameter vector, k and tol."""
    import torch
    import torch.nn.functional as F

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    key = (hashlib.sha1(flat.numpy().tobytes()).hexdigest(), len(x), k, tol)
    if key in _REFERENCE:
        return _REFERENCE[key]
    start = time.perf_counter()
    m64 = copy.deepcopy(model).double().eval()
    params = [p for p in m64.parameters() if p.requires_grad]
    loss = F.cross_entropy(m64(x.double()), y)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])
    n, count = grad.numel(), [0]

    def matvec(v):
        count[0] += 1
        v = torch.as_tensor(np.asarray(v, dtype=np.float64).reshape(-1))
        hv = torch.autograd.grad(grad, params, grad_outputs=v, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).numpy()

    op = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(n)
    values = eigsh(op, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    _REFERENCE[key] = (np.sort(values)[::-1], count[0], time.perf_counter() - start)
    return _REFERENCE[key]


# ------------------------------------------------------------------------------------------ rows
def _rel(a, ref) -> float:
    """max |a - ref| / |ref|"""
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - ref) / np.abs(ref)))


def _differences(ours, theirs) -> str:
    return (f"max abs loss difference {float(np.abs(ours - theirs).max()):.1e}, relative {_rel(ours, theirs):.1e} "
            f"(loss {theirs.min():.4g} to {theirs.max():.4g})")


def _setup():
    import torch

    set_threads(1)
    ds = mnist1d()
    model = trained_mlp(ds, epochs=10).eval()
    return ds, model, ds.train.x, ds.train.y, torch.nn.CrossEntropyLoss()


def _missing(group: str, modules: tuple) -> list[dict] | None:
    import importlib

    try:
        for m in modules:
            importlib.import_module(m)
    except ImportError as e:
        return [row(f"peers: {group}", "-", "", "", "peer libraries installed", False,
                    f"{type(e).__name__}: {e}; install them with `{INSTALL}`")]
    return None


def _done(rows: list[dict], start: float) -> list[dict]:
    rows[-1]["note"] += f"; this group took {time.perf_counter() - start:.0f} s in all"
    return rows


def curves_rows() -> list[dict]:
    """Rows 1-3: loss-landscapes' random_line, random_plane and linear_interpolation against batchgap."""
    missing = _missing("curves", ("loss_landscapes",))
    if missing:
        return missing
    import loss_landscapes
    import loss_landscapes.metrics
    import torch
    from batchgap.landscape import evaluate
    from batchgap.models import init_model

    begin = time.perf_counter()
    ds, model, x, y, criterion = _setup()
    metric = loss_landscapes.metrics.Loss(criterion, x, y)
    data, seed, rows, out = (x, y), 0, [], {}

    # 1. random_line, 21 points; distance=1: the line ends ||theta|| away, as batchgap's alpha = 1
    steps, distance = 21, 1.0
    torch.manual_seed(seed)
    d = ll_line_direction(model, distance, steps)
    draw = timed(lambda: (torch.manual_seed(seed), ll_line_direction(model, distance, steps)))

    def peer_line():
        torch.manual_seed(seed)
        out["peer"] = loss_landscapes.random_line(model, metric, distance=distance, steps=steps,
                                                  normalization="filter", deepcopy_model=True)

    t = interleaved({"peer": peer_line,
                     "ours": lambda: out.__setitem__("ours", line_like_random_line(model, data, steps, d))}, repeats=3)
    r = t["peer"] / t["ours"]
    rows.append(row(
        "peers: 1-D filter-normalized curve, 21 points (loss_landscapes.random_line)",
        f"{steps / t['ours']:.1f} points/s (loss_curve)",
        f"{steps / t['peer']:.1f} points/s (random_line, normalization='filter', distance=1)",
        f"{r:.2f}x", ">= 3x loss-landscapes points/s", r >= 3,
        f"same direction (loss-landscapes' own U[0,1) draw, filter- and 1-D-normalized, norm ||theta||/21 per "
        f"step) and points theta + i s, i = 1..21: {_differences(out['ours'], out['peer'])}; random_line's "
        f"direction draw alone {draw * 1e3:.0f} ms of its time; {load()}"))

    # 2. random_plane 11 x 11; distance=0.5: half-width ||theta||, as batchgap's default [-1, 1]^2
    steps, distance = 11, 0.5
    torch.manual_seed(seed)
    d1, d2 = ll_plane_directions(model, distance, steps)

    def peer_plane():
        torch.manual_seed(seed)
        out["peer"] = loss_landscapes.random_plane(model, metric, distance=distance, steps=steps,
                                                   normalization="filter", deepcopy_model=True)

    t = interleaved({"peer": peer_plane,
                     "ours": lambda: out.__setitem__("ours", plane_like_random_plane(model, data, steps, d1, d2))},
                    repeats=2)
    r = t["peer"] / t["ours"]
    rows.append(row(
        "peers: 2-D filter-normalized surface, 11 x 11 (loss_landscapes.random_plane)",
        f"{steps * steps / t['ours']:.1f} points/s (loss_surface, 2 calls)",
        f"{steps * steps / t['peer']:.1f} points/s (random_plane, normalization='filter', distance=0.5)",
        f"{r:.2f}x", ">= 3x loss-landscapes points/s", r >= 3,
        f"same two directions and the same 121 points (random_plane's serpentine puts its odd rows one d2 step "
        f"behind the even ones; the centre is not on its 11-step grid): {_differences(out['ours'], out['peer'])}; "
        f"{load()}"))

    # 3. linear_interpolation from the initialization to the trained model, 25 steps
    steps = 25
    start_model = init_model("mlp", (40,), 10, 0).eval()  # the initialization trained_mlp trains from

    def peer_interp():
        out["peer"] = loss_landscapes.linear_interpolation(start_model, model, metric, steps=steps, deepcopy_model=True)

    t = interleaved({"peer": peer_interp, "ours": lambda: out.__setitem__(
        "ours", interpolation_like_linear_interpolation(start_model, model, data, steps))}, repeats=3)
    r = t["peer"] / t["ours"]
    trained_loss = evaluate(model, data).loss
    rows.append(row(
        "peers: linear interpolation init -> trained, 25 points (loss_landscapes.linear_interpolation)",
        f"{steps / t['ours']:.1f} points/s (interpolate, bn='eval')",
        f"{steps / t['peer']:.1f} points/s (linear_interpolation)",
        f"{r:.2f}x", ">= 3x loss-landscapes points/s", r >= 3,
        f"same alphas i/25, i = 1..25, and both with the init model's BN running statistics at every point "
        f"(loss-landscapes interpolates parameters only; batchgap given an end model carrying the start's buffers): "
        f"{_differences(out['ours'], out['peer'])}; so at alpha = 1 loss-landscapes reports {out['peer'][-1]:.4g} "
        f"(trained weights, init running statistics) where the trained model's own loss is {trained_loss:.4g}, what "
        f"batchgap's bn='eval' with each model's own buffers gives there (its default for BN models, 'recompute', "
        f"recomputes the statistics at every alpha); {load()}"))
    return _done(rows, begin)


def hessian_rows() -> list[dict]:
    """Rows 4-6: Hessian trace (100 probes), top-1 and top-3 eigenvalues against PyHessian and curvlinops."""
    missing = _missing("hessian", ("pyhessian", "curvlinops"))
    if missing:
        return missing
    import torch
    from curvlinops import hutchinson_trace
    from batchgap.landscape import hessian_eigenvalues, hessian_trace

    begin = time.perf_counter()
    ds, model, x, y, criterion = _setup()
    data, rows, out = (x, y), [], {}

    # 4. trace, 100 Rademacher probes each
    probes = 100

    def peer_cl_trace():
        torch.manual_seed(0)
        out["cl"] = float(hutchinson_trace(curvlinops_hessian(model, criterion, x, y), num_matvecs=probes))

    t = interleaved({
        "pyh": lambda: out.__setitem__("pyh", pyhessian_trace(model, criterion, x, y, probes)),
        "ours": lambda: out.__setitem__("ours", hessian_trace(model, data, n_probes=probes, method="hutchinson",
                                                               seed=0)),
        "cl": peer_cl_trace,
    }, repeats=1)
    ours, (vhv, pyh_hvps) = out["ours"], out["pyh"]
    pyh_est = float(np.mean(vhv))
    same = abs(pyh_est - ours.value) / abs(ours.value)
    inside = lambda v: "inside" if ours.ci_low <= v <= ours.ci_high else "OUTSIDE"  # noqa: E731
    r = t["pyh"] / t["ours"]
    rows.append(row(
        "peers: Hessian trace, 100 Rademacher probes (PyHessian trace, curvlinops hutchinson_trace)",
        f"{t['ours']:.1f} s (hessian_trace, {ours.hvps} HVPs)",
        f"PyHessian {t['pyh']:.1f} s ({pyh_hvps} HVPs); curvlinops {t['cl']:.1f} s ({probes} matvecs)",
        f"{r:.2f}x PyHessian, {t['cl'] / t['ours']:.2f}x curvlinops", ">= 2x PyHessian at the same probe count",
        r >= 2 and len(vhv) == probes,
        f"batchgap {ours.value:.6g} +- {ours.stderr:.2g} (95% CI [{ours.ci_low:.5g}, {ours.ci_high:.5g}]); PyHessian "
        f"{pyh_est:.6g} ({inside(pyh_est)}; trace(maxIter=100, tol=-inf) ran {len(vhv)} probes; relative difference "
        f"{same:.0e}{SAME_PROBES if same < 1e-4 else ''}); "
        f"curvlinops {out['cl']:.6g} ({inside(out['cl'])}; its own Bernoulli draws); one repeat each; {load()}"))

    # reference for rows 5 and 6, outside every timing
    ref, ref_mv, ref_s = exact_top_eigenvalues(model, x, y, k=3, tol=1e-10)

    # 5. top-1: PyHessian's defaults; batchgap at its default tol and at the loosest tol matching PyHessian's error
    pyh_vals, pyh_hvps = pyhessian_top(model, criterion, x, y, 1)
    pyh_err = _rel(pyh_vals[0], ref[0])
    tried = {}
    for tol in EIG_TOLS:
        res = hessian_eigenvalues(model, data, k=1, tol=tol, seed=0)
        tried[tol] = (_rel(res.eigenvalues[0], ref[0]), res.hvps)
    ok = [tol for tol, (err, _) in tried.items() if err <= pyh_err]
    loose = max(ok) if ok else EIG_TOLS[0]

    def peer_cl_top(k):
        return lambda: out.__setitem__("cl", curvlinops_top(model, criterion, x, y, k))

    t = interleaved({
        "pyh": lambda: out.__setitem__("pyh", pyhessian_top(model, criterion, x, y, 1)),
        "ours": lambda: out.__setitem__("ours", hessian_eigenvalues(model, data, k=1, seed=0)),
        "loose": lambda: out.__setitem__("loose", hessian_eigenvalues(model, data, k=1, tol=loose, seed=0)),
        "cl": peer_cl_top(1),
    }, repeats=3)
    o, lo, (cl_vals, cl_mv) = out["ours"], out["loose"], out["cl"]
    e_o, e_lo, e_cl = _rel(o.eigenvalues[0], ref[0]), _rel(lo.eigenvalues[0], ref[0]), _rel(cl_vals[0], ref[0])
    met = t["loose"] < t["pyh"] and t["ours"] <= 1.5 * t["pyh"] and e_lo <= pyh_err
    rows.append(row(
        "peers: top-1 Hessian eigenvalue (PyHessian eigenvalues(top_n=1), curvlinops + eigsh k=1 LA tol 1e-3)",
        f"tol {o.tol:g} (default): {t['ours']:.2f} s, {o.hvps} HVPs, error {e_o:.1e}; tol {loose:g}: "
        f"{t['loose']:.2f} s, {lo.hvps} HVPs, error {e_lo:.1e}",
        f"PyHessian (maxIter 100, tol 1e-3) {t['pyh']:.2f} s, {out['pyh'][1]} HVPs, error {pyh_err:.1e}; "
        f"curvlinops eigsh {t['cl']:.2f} s, {cl_mv} matvecs, error {e_cl:.1e}",
        f"{t['pyh'] / t['loose']:.2f}x PyHessian at its accuracy, ours at tol {o.tol:g} takes "
        f"{t['ours'] / t['pyh']:.2f}x its time; {t['cl'] / t['ours']:.2f}x curvlinops",
        "faster than PyHessian at its accuracy; <= 1.5x PyHessian's time at ours", met,
        f"relative errors against eigsh tol 1e-10 on a float64 copy (lambda_1 = {ref[0]:.6g}, {ref_mv} matvecs, "
        f"{ref_s:.0f} s, outside the timings); batchgap tol {loose:g} is the loosest of "
        f"{', '.join(f'{k:g}' for k in EIG_TOLS)} with error <= PyHessian's (errors "
        f"{', '.join(f'{e:.0e}' for e, _ in tried.values())}); HVP counts include batchgap's residual check and "
        f"not curvlinops' construction check; {load()}"))

    # 6. top-3
    t = interleaved({
        "pyh": lambda: out.__setitem__("pyh", pyhessian_top(model, criterion, x, y, 3)),
        "ours": lambda: out.__setitem__("ours", hessian_eigenvalues(model, data, k=3, seed=0)),
        "cl": peer_cl_top(3),
    }, repeats=2)
    o, (pv, ph), (cv, cm) = out["ours"], out["pyh"], out["cl"]
    e_o, e_p, e_c = _rel(o.eigenvalues, ref), _rel(pv, ref), _rel(cv, ref)
    rp, rc = t["pyh"] / t["ours"], t["cl"] / t["ours"]
    fmt = lambda v: ", ".join(f"{a:.6g}" for a in v)  # noqa: E731
    rows.append(row(
        "peers: top-3 Hessian eigenvalues (PyHessian top_n=3, curvlinops + eigsh k=3 LA tol 1e-3)",
        f"{t['ours']:.2f} s (hessian_eigenvalues k=3, tol {o.tol:g}), {o.hvps} HVPs, max error {e_o:.1e}",
        f"PyHessian {t['pyh']:.2f} s, {ph} HVPs, max error {e_p:.1e}; curvlinops eigsh {t['cl']:.2f} s, "
        f"{cm} matvecs, max error {e_c:.1e}",
        f"{rp:.2f}x PyHessian, {rc:.2f}x curvlinops", ">= 2x both peers", rp >= 2 and rc >= 2,
        f"reference {fmt(ref)}; batchgap {fmt(o.eigenvalues)}; PyHessian {fmt(pv)}; curvlinops {fmt(cv)}; "
        f"max relative error over the three; {load()}"))
    return _done(rows, begin)


def _trapezoid(f: np.ndarray, t: np.ndarray) -> float:
    return float(np.sum((f[1:] + f[:-1]) * np.diff(t)) / 2)


def density_rows() -> list[dict]:
    """Row 7: spectral density, batchgap's SLQ against curvlinops' Papyan-2020 Lanczos spectrum; PyHessian's fails."""
    missing = _missing("density", ("pyhessian", "curvlinops"))
    if missing:
        return missing
    import torch
    from curvlinops import lanczos_approximate_spectrum
    from batchgap.landscape import hessian_density

    begin = time.perf_counter()
    ds, model, x, y, criterion = _setup()
    data, rows, out = (x, y), [], {}
    n_vectors, steps = 4, 30
    N = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # PyHessian: density(iter, n_v) runs its Lanczos, then torch.eig, removed from torch
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with counting_pyhessian_hvps() as count:
        try:
            pyhessian_comp(model, criterion, x, y).density(iter=steps, n_v=n_vectors)
            error = None
        except Exception as e:  # RuntimeError: torch.eig removed
            error = f"{type(e).__name__}: {' '.join(str(e).split())}"
    spent = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    version = torch.__version__.split("+")[0]
    rows.append(row(
        f"peers: PyHessian density(iter={steps}, n_v={n_vectors})",
        f"fails on torch {version} (torch.eig removed)" if error else "ran", "", "", "reported", True,
        (f"{error} (raised after {count[0]} HVPs, {spent:.1f} s: its first chain's Lanczos, then torch.eig)"
         if error else f"PyHessian density ran on torch {version}") + f"; {load()}"))

    def peer():
        torch.manual_seed(0)
        H = curvlinops_hessian(model, criterion, x, y)
        out["count"] = count_torch_matvecs(H)
        out["cl"] = lanczos_approximate_spectrum(H, ncv=steps, num_repeats=n_vectors)

    def peer_given_boundaries():  # the same 120 HVPs as batchgap: its boundaries passed in (batchgap's extremes)
        torch.manual_seed(0)
        H = curvlinops_hessian(model, criterion, x, y)
        out["count_b"] = count_torch_matvecs(H)
        out["cl_b"] = lanczos_approximate_spectrum(H, ncv=steps, num_repeats=n_vectors,
                                                   boundaries=(out["ours"].lambda_min, out["ours"].lambda_max))

    t = interleaved({
        "ours": lambda: out.__setitem__("ours", hessian_density(model, data, n_vectors=n_vectors, steps=steps, seed=0)),
        "cl": peer,
        "cl_b": peer_given_boundaries,
    }, repeats=1)
    ours, (grid, dens), cl_mv = out["ours"], out["cl"], out["count"][0]
    grid_b, dens_b = (a.double().numpy() for a in out["cl_b"])
    cl_trace_b = N * _trapezoid(grid_b * dens_b, grid_b) / _trapezoid(dens_b, grid_b)
    grid, dens = grid.double().numpy(), dens.double().numpy()
    width = (grid[-1] - grid[0]) / 1.1  # the grid is the eigsh boundaries widened by margin 0.05 each side
    cl_min, cl_max = grid[0] + 0.05 * width, grid[-1] - 0.05 * width
    cl_trace = N * _trapezoid(grid * dens, grid) / _trapezoid(dens, grid)
    ref, _, _ = exact_top_eigenvalues(model, x, y, k=3, tol=1e-10)
    rows.append(row(
        f"peers: Hessian spectral density, {n_vectors} x {steps} Lanczos (curvlinops lanczos_approximate_spectrum)",
        f"{t['ours']:.1f} s (hessian_density), {ours.hvps} HVPs",
        f"curvlinops {t['cl']:.1f} s, {cl_mv} matvecs ({n_vectors * steps} Lanczos + {cl_mv - n_vectors * steps} "
        f"for its eigsh boundaries); given batchgap's extremes as boundaries {t['cl_b']:.1f} s, {out['count_b'][0]} "
        f"matvecs", f"{t['cl'] / t['ours']:.2f}x; {t['cl_b'] / t['ours']:.2f}x at the same HVP count", "reported", True,
        f"lambda_max: batchgap's largest Ritz value {ours.lambda_max:.6g}, curvlinops' eigsh boundary {cl_max:.6g}, "
        f"reference {ref[0]:.6g}; lambda_min: batchgap {ours.lambda_min:.4g}, curvlinops {cl_min:.4g}; support: "
        f"batchgap [{ours.grid[0]:.4g}, {ours.grid[-1]:.4g}], curvlinops [{grid[0]:.4g}, {grid[-1]:.4g}]; "
        f"N x the density's mean (a trace estimate from the 4 start vectors): batchgap {ours.trace:.5g}, curvlinops "
        f"{cl_trace:.5g} ({cl_trace_b:.5g} with the boundaries given); "
        f"one repeat each; {load()}"))
    return _done(rows, begin)
