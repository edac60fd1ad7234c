"""density_and_trace: the spectral density and a trace that reuses its HVPs, against a tiny net's dense Hessian.

The coverage bounds are those of test_landscape_trace.py (over 200 seeds, [0.91, 0.99] fails an honest 95%
interval about 1 time in 160; the seeds are fixed, so the test is deterministic).
"""
import numpy as np
import pytest
import torch
from scipy import stats

from batchgap import density_and_trace, hessian_density
from batchgap.landscape.hessian import rademacher
from batchgap.landscape.trace import estimate, shared_estimate

import test_landscape_trace
from test_landscape_trace import HIGH, LOW, SEEDS


@pytest.fixture(scope="module")
def net():
    """test_landscape_trace's net: a 93-parameter tanh MLP, its dense Hessian, and the same with 3 outliers."""
    return test_landscape_trace.net.__wrapped__()


def projector(H, z0, k):
    """P = I - Q^T Q for the Krylov space K_k(H, z0) (orthonormalized by QR of the Krylov matrix, k small)."""
    K = torch.stack([torch.linalg.matrix_power(H, j) @ z0 for j in range(k)])
    Q, _ = torch.linalg.qr((K / K.norm(dim=1, keepdim=True)).T)
    return Q, torch.eye(len(z0), dtype=H.dtype) - Q @ Q.T


def test_the_trace_is_hutchinson_on_the_complement_of_chain_0s_krylov_space(net):
    """Oracle: the dense Hessian, the same probes (start vectors, then the drawn ones) and the same Krylov space:
    value = tr(Q^T H Q) + mean z^T P H P z over chains 1.. and the drawn probes, with the t interval."""
    model, data, H, _ = net
    steps, n_v, m = 5, 4, 6
    dens, tr = density_and_trace(model, data, n_vectors=n_v, steps=steps, trace_probes=m, batch_size=16, seed=3)
    gen = torch.Generator().manual_seed(3)
    Z = rademacher(n_v, H.shape[0], gen, "cpu")
    G = rademacher(m, H.shape[0], gen, "cpu")
    Q, P = projector(H, Z[0], steps)
    exact = float(torch.trace(Q.T @ H @ Q))
    samples = np.array([float(z @ P @ H @ P @ z) for z in torch.cat([Z[1:], G])])
    half = stats.t.ppf(0.975, len(samples) - 1) * samples.std(ddof=1) / np.sqrt(len(samples))
    assert tr.exact_part == pytest.approx(exact, rel=1e-8) and tr.deflated == steps
    assert tr.value == pytest.approx(exact + samples.mean(), rel=1e-8)
    assert tr.ci_high - tr.value == pytest.approx(half, rel=1e-6)
    assert tr.hvps == m and dens.hvps == n_v * steps and "3 the density's start vectors, 6 drawn" in tr.interval


def test_the_density_is_hessian_densitys_to_the_bit(net):
    model, data, _, _ = net
    dens, _ = density_and_trace(model, data, n_vectors=3, steps=6, trace_probes=4, batch_size=16, seed=5)
    alone = hessian_density(model, data, n_vectors=3, steps=6, batch_size=16, seed=5)
    a, b = dens.as_dict(), alone.as_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key], equal_nan=True) if isinstance(a[key], list) else a[key] == b[key], key


def shared_coverage(A, n_v, steps, m):
    exact, hits, halves = float(torch.trace(A)), 0, []
    for seed in range(SEEDS):
        _, q_trace, free, drawn, _ = shared_estimate(lambda V: V @ A, A.shape[0], "cpu", n_v, steps, m,
                                                     torch.Generator().manual_seed(seed))
        s = np.concatenate([free, drawn])
        half = stats.t.ppf(0.975, len(s) - 1) * s.std(ddof=1) / np.sqrt(len(s))
        hits += abs(q_trace + s.mean() - exact) <= half
        halves.append(half)
    return hits / SEEDS, float(np.median(halves)) / abs(exact)


@pytest.mark.parametrize("spectrum", ["net", "outliers"])
def test_95_percent_intervals_cover_in_91_to_99_percent_of_200_seeds(net, spectrum):
    _, _, H, H_out = net
    cover, _ = shared_coverage(H if spectrum == "net" else H_out, 4, 6, 10)
    assert LOW <= cover <= HIGH, (spectrum, cover)


def test_the_shared_trace_is_narrower_than_a_separate_one_at_the_same_added_hvps(net):
    """What sharing buys: beside a density of 4 x 6 HVPs, 10 more HVPs as a shared trace against
    hessian_trace(n_probes=10) (Lanczos-deflated, its own 5-step basis and 5 probes), median half-width."""
    _, _, _, A = net
    _, shared = shared_coverage(A, 4, 6, 10)
    separate = float(np.median([estimate(lambda V: V @ A, A.shape[0], "cpu", "lanczos-deflated", 10,
                                         torch.Generator().manual_seed(s))[2] for s in range(SEEDS)]))
    assert shared < 0.8 * separate / abs(float(torch.trace(A)))


def test_bad_arguments(net):
    model, data, _, _ = net
    with pytest.raises(ValueError, match="n_vectors must be an integer >= 2"):
        density_and_trace(model, data, n_vectors=1, steps=4, trace_probes=4)
    with pytest.raises(ValueError, match="trace_probes"):
        density_and_trace(model, data, n_vectors=2, steps=4, trace_probes=0)
    with pytest.raises(ValueError, match="trace_probes"):
        density_and_trace(model, data, n_vectors=4, steps=4, trace_probes=-1)
