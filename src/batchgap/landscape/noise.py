"""Gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish, Kaplan, Amodei et al. 2018, appendix A.1).

McCandlish et al., "An Empirical Model of Large-Batch Training": B_simple predicts the batch size
beyond which larger batches stop paying (the "critical batch size" in their simplified model). Here:

* g_i: the gradient of example i's loss with respect to the measured parameters theta (``params``:
  ``"all"`` or ``"no-bn"``), at the model's parameters, on the BN protocol ``bn``;
* G = (1/n) sum_i g_i, the full-data gradient (the gradient of the batch-weighted full-data loss);
* Sigma = (1/n) sum_i (g_i - G)(g_i - G)^T, the POPULATION covariance of the per-example gradients
  over the n training examples (divisor n, not n - 1), so tr(Sigma) = (1/n) sum_i |g_i|^2 - |G|^2;
* G_B = (1/B) sum_{i in batch} g_i, the gradient of a batch's mean loss.

Sampling. A batch here is a uniformly random subset of B distinct examples (without replacement
within the batch, as a training epoch draws them); batches are independent of each other. Then
E G_B = G and Cov G_B = Sigma / B * (n - B) / (n - 1) (the finite-population correction), so

    E|G_B|^2 = |G|^2 + c(B) tr(Sigma),    c(B) = (n - B) / (B (n - 1)).

McCandlish et al. write 1/B (sampling with replacement, or B << n); we apply the correction exactly,
which makes B = n the exact full gradient (c(n) = 0) and B = 1 the per-example second moment
(c(1) = 1). From the mean squared norms m_s, m_b at two sizes B_small < B_big
(:func:`two_batch_estimate`):

    tr(Sigma)_est = (m_s - m_b) / (c(B_small) - c(B_big)),
    |G|^2_est     = (c(B_small) m_b - c(B_big) m_s) / (c(B_small) - c(B_big)),
    B_simple      = tr(Sigma)_est / |G|^2_est.

Both are unbiased (linear in m_s, m_b); their ratio is not, unless B_big = n (``big=None``): then
|G|^2 is exact and B_simple is linear in m_s, hence unbiased. With c(B) = 1/B these are the paper's
formulas; the correction multiplies its tr(Sigma) by (n - 1)/n and adds tr(Sigma)/n to its |G|^2.

Two functions, one result type (:class:`NoiseScaleResult`):

* :func:`gradient_noise_scale`: the two-batch estimator. ``n_batches`` random batches of size
  ``small`` (and of ``big``, or with ``big=None`` the exact full-data gradient, one batch-weighted
  pass, so m_b = |G|^2 exactly). Uncertainty: the standard error of each mean (sample std, ddof 1,
  / sqrt(k)); for B_simple both a delta-method standard error from those two and a percentile
  bootstrap interval (the per-batch values of each size resampled with replacement, ``n_boot`` times).
* :func:`exact_gradient_noise_scale`: every per-example gradient, ``torch.func.vmap(torch.func.grad)``
  over chunks of examples; only the sums of g_i and of |g_i|^2 are kept. In the two-batch form this
  is B_small = 1 and B_big = n with every size-1 batch enumerated: no sampling error.

BatchNorm. Per-example gradients are defined only when each example's loss depends on that example
alone: BN with running statistics (``bn="eval"`` on a tracking model, or ``"recompute"``), or no BN.
The exact method refuses batch statistics. The estimator accepts ``bn="batch"``: each sampled batch
then uses its own statistics (the gradients a training step sees); the examples are coupled, so the
identity above holds only approximately, and the protocol says so. Dropout is off. Every random draw
comes from ``torch.Generator().manual_seed(seed)``; the model is restored bit for bit, also on error.

Precision: gradients in the model's dtype; per-chunk sums and norms in that dtype, everything across
chunks and batches accumulated in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap

from .evaluate import batches, model_bn_semantics
from .functional import FullDataLoss, session
from .params import is_batchnorm
from .protocol import Measured
from .sharpness import bn_protocol, loss_fn_name

SAMPLING = ("batches: uniform random subsets of B distinct examples, independent across batches; "
            "E|G_B|^2 = |G|^2 + tr(Sigma) (n - B) / (B (n - 1)) (finite-population correction), "
            "Sigma the population covariance of per-example gradients")


@dataclass(frozen=True)
class NoiseScaleResult(Measured):
    b_simple: float  # tr(Sigma)_est / |G|^2_est
    b_simple_stderr: float  # delta method from the two means' standard errors; 0 when exact
    ci_low: float  # percentile bootstrap interval for b_simple; = b_simple when exact
    ci_high: float
    confidence: float  # of [ci_low, ci_high]; 1.0 for the exact method (no sampling error)
    grad_norm_sq: float  # |G|^2 estimate
    trace_sigma: float  # tr(Sigma) estimate, population covariance
    small: int  # B_small (1 for the exact method)
    big: int  # B_big (n: the full data set)
    n_batches_small: int  # batches measured at B_small (n for the exact method: every example)
    n_batches_big: int  # 1 when B_big = n (the exact full gradient)
    sq_norm_small: float  # mean |G_B|^2 over the small batches
    sq_norm_small_stderr: float  # its standard error (0 when exact)
    sq_norm_big: float
    sq_norm_big_stderr: float
    sampling: str
    interval: str
    seed: int | None  # None for the exact method (no randomness)
    method: str


# -- the estimator's algebra, on numbers or tensors ---------------------------------------------------


def finite_population_factor(batch: int, n: int) -> float:
    """c(B) = (n - B) / (B (n - 1)): E|G_B|^2 = |G|^2 + c(B) tr(Sigma) for B of n without replacement."""
    if n < 2:
        raise ValueError(f"need at least 2 examples, got n={n}")
    if not 1 <= batch <= n:
        raise ValueError(f"batch size must be in [1, {n}], got {batch}")
    return (n - batch) / (batch * (n - 1))


def expected_batch_sq_norm(grad_norm_sq: float, trace_sigma: float, batch: int, n: int) -> float:
    """E|G_B|^2 = |G|^2 + tr(Sigma) (n - B) / (B (n - 1)), batches of B distinct examples out of n."""
    return grad_norm_sq + finite_population_factor(batch, n) * trace_sigma


def two_batch_estimate(sq_small, sq_big, small: int, big: int, n: int):
    """``(|G|^2_est, tr(Sigma)_est)`` from mean squared batch-gradient norms at ``small`` < ``big``.

    Solves m = |G|^2 + c(B) tr(Sigma) at the two sizes (module docstring). Works elementwise on
    tensors (the bootstrap) as well as on floats.
    """
    c_s, c_b = finite_population_factor(small, n), finite_population_factor(big, n)
    if not c_s > c_b:
        raise ValueError(f"need small < big, got small={small}, big={big}")
    trace = (sq_small - sq_big) / (c_s - c_b)
    return (c_s * sq_big - c_b * sq_small) / (c_s - c_b), trace


def _ratio(num: float, den: float) -> float:
    if den != 0:
        return num / den
    return math.copysign(math.inf, num) if num != 0 else math.nan


def b_simple_stderr(sq_small: float, se_small: float, sq_big: float, se_big: float,
                    small: int, big: int, n: int) -> float:
    """Delta-method standard error of B_simple = (m_s - m_b) / D, D = c_s m_b - c_b m_s.

    dB/dm_s = (c_s - c_b) m_b / D^2, dB/dm_b = -(c_s - c_b) m_s / D^2, the two means independent:
    se(B) = (c_s - c_b) sqrt(m_b^2 se_s^2 + m_s^2 se_b^2) / D^2.
    """
    c_s, c_b = finite_population_factor(small, n), finite_population_factor(big, n)
    d = c_s * sq_big - c_b * sq_small
    return _ratio((c_s - c_b) * math.hypot(sq_big * se_small, sq_small * se_big), d * d)


# -- measurements -------------------------------------------------------------------------------------


def _tensor_pair(data) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        x, y = data
    elif hasattr(data, "x") and hasattr(data, "y"):
        x, y = data.x, data.y
    else:
        raise ValueError("gradient_noise_scale draws random batches: data must be a tensor pair (x, y) "
                         "or a TensorData, not an iterable of batches")
    if len(x) != len(y):
        raise ValueError(f"inputs have {len(x)} rows but targets have {len(y)}")
    return x, y


def _draw_batches(gen: torch.Generator, n: int, size: int, count: int) -> torch.Tensor:
    """``count`` independent uniformly random subsets of ``size`` distinct indices out of n, (count, size)."""
    return torch.stack([torch.randperm(n, generator=gen)[:size] for _ in range(count)])


def _sq_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """|g_j|^2 (float64) for each j of a stacked gradient {name: (k, *shape)}: summed over the tensors.

    Each tensor's norm in its own dtype (``vector_norm``, no temporary), the sum over tensors in float64.
    """
    return sum(torch.linalg.vector_norm(g.reshape(len(g), -1), dim=1).double() ** 2 for g in grads.values())


def _functional(F: FullDataLoss):
    """The measured parameters as a dict of tensors, and ``loss(params, x, y)`` of the batch mean loss.

    Gradients are taken with respect to the dict, not the flat vector: differentiating through the
    slices of a flat vector costs a full-size zero tensor per parameter tensor and per example under vmap.
    """
    params = {name: t.detach() for name, t in F.as_dict(F.x0).items()}

    def loss(p, x, y):
        return F.loss_fn(functional_call(F.model, p, (x,)), y)

    return params, loss


@torch.no_grad()  # torch.func.grad still differentiates; no autograd graph to parameters left out of theta
def _batch_sq_norms(F: FullDataLoss, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                    chunk: int) -> torch.Tensor:
    """|G_B|^2 (float64, on the CPU) for each row of ``index`` (k, B): the gradient of each batch's mean loss.

    ``vmap`` over up to ``max(1, chunk // B)`` batches at a time (memory: that many gradients of P entries).
    """
    theta, batch_loss = _functional(F)
    grad_fn = grad(batch_loss)
    many = vmap(grad_fn, in_dims=(None, 0, 0))
    per_call = max(1, chunk // index.shape[1])
    out = torch.empty(len(index), dtype=torch.float64)
    index = index.to(x.device)
    for s in range(0, len(index), per_call):
        block = index[s : s + per_call]
        if len(block) == 1:
            g = {name: t[None] for name, t in grad_fn(theta, x[block[0]], y[block[0]]).items()}
        else:
            g = many(theta, x[block], y[block])
        out[s : s + len(block)] = _sq_norms(g).cpu()
    return out


def _mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    if len(values) == 1:
        return float(values[0]), 0.0
    return float(values.mean()), float(values.std(correction=1)) / math.sqrt(len(values))


def _bootstrap_interval(small_values: torch.Tensor, big_values: torch.Tensor, small: int, big: int, n: int,
                        n_boot: int, confidence: float, gen: torch.Generator) -> tuple[float, float]:
    """Percentile interval of B_simple over ``n_boot`` resamples (with replacement) of each size's batch values."""
    def resampled_means(values: torch.Tensor) -> torch.Tensor:
        if len(values) == 1:  # the exact full gradient: no sampling error to resample
            return values.expand(n_boot)
        means = torch.empty(n_boot, dtype=torch.float64)
        step = max(1, 2**20 // len(values))  # bounded memory for the index matrix
        for s in range(0, n_boot, step):
            m = min(step, n_boot - s)
            means[s : s + m] = values[torch.randint(len(values), (m, len(values)), generator=gen)].mean(1)
        return means

    g2, trace = two_batch_estimate(resampled_means(small_values), resampled_means(big_values), small, big, n)
    b = trace / g2
    q = torch.quantile(b, torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64))
    return float(q[0]), float(q[1])


def _bn_description(model: nn.Module, bn: str, batch_size: int, bn_data, full_pass: bool) -> str:
    uses_batch_stats = any(is_batchnorm(m) for m in model.modules()) and (
        bn == "batch" or model_bn_semantics(model) in ("batch", "mixed"))
    if not uses_batch_stats:
        return bn_protocol(model, bn, batch_size, bn_data)
    full = f"; the full-data gradient over eval batches of {batch_size}" if full_pass else ""
    return ("batch statistics of each sampled batch (examples coupled: E|G_B|^2 = |G|^2 + c(B) tr(Sigma) "
            f"holds only approximately){full}")


def gradient_noise_scale(
    model: nn.Module,
    data,
    small: int = 32,
    big: int | None = None,
    n_batches: int = 200,
    seed: int = 0,
    loss_fn: Callable | None = None,
    bn: str = "eval",
    params: str = "all",
    batch_size: int = 1000,
    confidence: float = 0.95,
    n_boot: int = 2000,
    chunk: int = 1024,
    bn_data=None,
) -> NoiseScaleResult:
    """B_simple from mean squared gradient norms at two batch sizes (module docstring).

    ``n_batches`` independent random batches of ``small`` distinct examples; likewise of ``big``, or
    with ``big=None`` the exact full-data gradient (batch-weighted over eval batches of
    ``batch_size``). ``data`` is a tensor pair or a TensorData (batches are drawn by index).
    ``loss_fn(outputs, targets)`` returns the batch MEAN (default cross-entropy). Batch indices
    come from ``torch.Generator().manual_seed(seed)`` (each batch ``randperm(n)[:B]``), then the
    bootstrap draws from the same generator; the global RNG is not touched. ``chunk`` bounds the
    examples per vmapped gradient call (memory: ``chunk // B`` gradients). 1 <= small < big <= n.
    """
    x, y = _tensor_pair(data)
    n = len(y)
    if n < 2:
        raise ValueError(f"need at least 2 examples, got {n}")
    big_size = n if big is None else big
    if not 1 <= small < big_size <= n:
        raise ValueError(f"need 1 <= small < big <= n = {n}, got small={small}, big={big}")
    if n_batches < 2:
        raise ValueError(f"n_batches must be >= 2 (for a standard error), got {n_batches}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1 or chunk < 1:
        raise ValueError(f"n_boot and chunk must be >= 1, got {n_boot} and {chunk}")
    gen = torch.Generator().manual_seed(seed)
    with session(model, bn, (x, y), bn_data, batch_size):
        F = FullDataLoss(model, (x, y), loss_fn, batch_size, params)
        small_values = _batch_sq_norms(F, x, y, _draw_batches(gen, n, small, n_batches), chunk)
        if big is None:
            _, full_grad = F.value_and_grad(F.x0)
            big_values = (full_grad.double().norm() ** 2).reshape(1).cpu()
        else:
            big_values = _batch_sq_norms(F, x, y, _draw_batches(gen, n, big, n_batches), chunk)
        bn_description = _bn_description(model, bn, batch_size, bn_data, full_pass=big is None)
        num_params = F.num_params
    m_s, se_s = _mean_and_stderr(small_values)
    m_b, se_b = _mean_and_stderr(big_values)
    g2, trace = two_batch_estimate(m_s, m_b, small, big_size, n)
    ci_low, ci_high = _bootstrap_interval(small_values, big_values, small, big_size, n, n_boot, confidence, gen)
    full = "B_big = n: the exact full-data gradient (one batch-weighted pass)" if big is None else (
        f"{n_batches} random batches of B_big = {big}")
    return NoiseScaleResult(
        b_simple=_ratio(trace, g2), b_simple_stderr=b_simple_stderr(m_s, se_s, m_b, se_b, small, big_size, n),
        ci_low=ci_low, ci_high=ci_high, confidence=confidence, grad_norm_sq=g2, trace_sigma=trace,
        small=small, big=big_size, n_batches_small=n_batches, n_batches_big=len(big_values),
        sq_norm_small=m_s, sq_norm_small_stderr=se_s, sq_norm_big=m_b, sq_norm_big_stderr=se_b,
        sampling=SAMPLING,
        interval=(f"b_simple_stderr: delta method from the two means' standard errors (sample std, ddof 1, "
                  f"/ sqrt(k)); ci: percentile bootstrap, {n_boot} resamples of each size's batch values"),
        seed=seed, n=n, bn=bn, bn_description=bn_description, params=params, num_params=num_params,
        batch_size=batch_size, loss_fn=loss_fn_name(loss_fn),
        method=(f"two batch sizes (McCandlish et al. 2018, app. A.1, with the finite-population correction): "
                f"{n_batches} random batches of B_small = {small}; {full}; torch.func.vmap of torch.func.grad"),
    )


def _refuse_batch_statistics(model: nn.Module, bn: str) -> None:
    if not any(is_batchnorm(m) for m in model.modules()):
        return
    if bn == "batch":
        raise ValueError('exact_gradient_noise_scale needs per-example losses, but bn="batch" couples the '
                         'examples of a batch through its statistics; use bn="eval" or "recompute" (running '
                         'statistics), or gradient_noise_scale')
    if model_bn_semantics(model) != "running":
        raise ValueError("exact_gradient_noise_scale needs per-example losses, but this model's BatchNorm uses "
                         "batch statistics in eval mode (track_running_stats=False), which couples the "
                         "examples of a batch; use gradient_noise_scale")


def exact_gradient_noise_scale(
    model: nn.Module,
    data,
    loss_fn: Callable | None = None,
    bn: str = "eval",
    params: str = "all",
    batch_size: int = 1000,
    chunk: int = 256,
    bn_data=None,
) -> NoiseScaleResult:
    """B_simple from every per-example gradient g_i (module docstring): no sampling, no seed.

    |G|^2 = |(1/n) sum g_i|^2, tr(Sigma) = (1/n) sum |g_i|^2 - |G|^2 (population covariance). The
    g_i are ``vmap(grad_and_value(loss of one example))`` over chunks of ``chunk`` examples (memory
    ``chunk x P``), never all at once; only sum g_i and sum |g_i|^2 are kept. ``data`` may be a tensor
    pair, a TensorData or an iterable of batches (read in order, ``batch_size`` rows at a time).

    Only meaningful when the loss is a sum over examples: BatchNorm with running statistics
    (``bn="eval"`` on a tracking model, or ``"recompute"``) or no BatchNorm; batch statistics raise
    ValueError. ``loss_fn`` must return the batch mean of per-example losses: checked on the first
    chunk against the mean of the per-example values (ValueError otherwise).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    _refuse_batch_statistics(model, bn)
    with session(model, bn, data, bn_data, batch_size):
        F = FullDataLoss(model, data, loss_fn, batch_size, params)
        theta, batch_loss = _functional(F)

        def example_loss(p, xi, yi):
            return batch_loss(p, xi[None], yi[None])

        per_example = vmap(grad_and_value(example_loss), in_dims=(None, 0, 0))
        grad_sum = {name: torch.zeros(t.shape, dtype=torch.float64, device=t.device) for name, t in theta.items()}
        sq_sum = torch.zeros((), dtype=torch.float64)
        n, checked = 0, False
        # no autograd graph (torch.func.grad ignores an outer no_grad and still differentiates): parameters
        # outside ``params`` that require grad would otherwise keep every chunk's graph alive
        with torch.no_grad():
            for xb, yb in batches(data, batch_size):
                for s in range(0, len(yb), chunk):
                    xc, yc = xb[s : s + chunk], yb[s : s + chunk]
                    g, losses = per_example(theta, xc, yc)
                    if not checked and len(yc) > 1:
                        _check_mean_loss(batch_loss, theta, xc, yc, losses)
                        checked = True
                    for name, t in g.items():
                        grad_sum[name] += t.sum(0).double()
                    sq_sum += _sq_norms(g).sum().cpu()
                    n += len(yc)
        if n < 2:
            raise ValueError(f"need at least 2 examples, got {n}")
        bn_description = _bn_description(model, bn, batch_size, bn_data, full_pass=False)
        num_params = F.num_params
    g2 = float(sum((t / n).pow(2).sum().cpu() for t in grad_sum.values()))
    m1 = float(sq_sum) / n
    trace = m1 - g2
    return NoiseScaleResult(
        b_simple=_ratio(trace, g2), b_simple_stderr=0.0, ci_low=_ratio(trace, g2), ci_high=_ratio(trace, g2),
        confidence=1.0, grad_norm_sq=g2, trace_sigma=trace, small=1, big=n, n_batches_small=n, n_batches_big=1,
        sq_norm_small=m1, sq_norm_small_stderr=0.0, sq_norm_big=g2, sq_norm_big_stderr=0.0, sampling=SAMPLING,
        interval="none: exact (every per-example gradient; B_small = 1 enumerated, B_big = n)",
        seed=None, n=n, bn=bn, bn_description=bn_description, params=params, num_params=num_params,
        batch_size=batch_size, loss_fn=loss_fn_name(loss_fn),
        method=(f"exact per-example gradients: torch.func.vmap(torch.func.grad) in chunks of {chunk}; "
                "|G|^2 = |mean g_i|^2, tr(Sigma) = mean |g_i|^2 - |G|^2 (population covariance)"),
    )


@torch.no_grad()
def _check_mean_loss(batch_loss: Callable, theta: dict, x: torch.Tensor, y: torch.Tensor,
                     losses: torch.Tensor) -> None:
    """The batch loss must be the mean of the per-example losses, else per-example gradients mean nothing."""
    batch_value = float(batch_loss(theta, x, y))
    mean_value = float(losses.double().mean())
    tol = 1000 * torch.finfo(losses.dtype).eps * max(1.0, abs(batch_value))
    if not abs(batch_value - mean_value) <= tol:
        raise ValueError(
            f"loss_fn must return the batch mean of per-example losses (and the model must treat examples "
            f"independently): on {len(y)} examples it gave {batch_value:.6g}, the mean of the per-example "
            f"losses is {mean_value:.6g}"
        )
