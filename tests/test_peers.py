"""batchgap against the real peer libraries on a tiny model (issue 16; the timings: benchmarks/peers.py).

Each comparison is also shown to be able to fail: a different direction, grid or BN buffer choice gives
values outside the tolerance the equality is checked to.
"""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import peers  # noqa: E402

# PyHessian's own loss.backward(create_graph=True); peers.pyhessian_comp clears the gradients after use
pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")


def tiny(seed=0):
    """Linear(5, 8) -> BatchNorm1d(8) -> ReLU -> Linear(8, 3), BN running statistics made non-trivial, eval."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.2, 0.2)
    return m.eval()


@pytest.fixture(scope="module")
def xy():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)


@pytest.fixture(scope="module")
def trained(xy):
    """The tiny model after 300 full-batch Adam steps (train mode), then eval: near a minimum, so its
    top eigenvalues are its largest in magnitude too (what power iteration finds)."""
    x, y = xy
    m = tiny(0).train()
    opt = torch.optim.Adam(m.parameters(), lr=0.03)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    m.zero_grad(set_to_none=True)
    return m.eval()


def dense_hessian(model, x, y):
    params = [p for p in model.parameters() if p.requires_grad]
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params]).double()
    m64 = __import__("copy").deepcopy(model).double()
    names = [n for n, _ in m64.named_parameters()]

    def loss(w):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = w[i : i + s.numel()].reshape(s)
            i += s.numel()
        return nn.functional.cross_entropy(torch.func.functional_call(m64, parts, (x.double(),)), y)

    return torch.func.hessian(loss)(flat0)


# ------------------------------------------------------------------------------------------ loss-landscapes
def test_loss_curve_equals_random_line_on_its_direction(xy):
    ll = pytest.importorskip("loss_landscapes")
    import loss_landscapes.metrics

    x, y = xy
    m = tiny()
    metric = loss_landscapes.metrics.Loss(nn.CrossEntropyLoss(), x, y)
    before = [p.detach().clone() for p in m.parameters()]
    torch.manual_seed(3)
    theirs = ll.random_line(m, metric, distance=0.5, steps=9, normalization="filter", deepcopy_model=True)
    torch.manual_seed(3)
    d = peers.ll_line_direction(m, 0.5, 9)
    ours = peers.line_like_random_line(m, (x, y), 9, d)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert np.ptp(theirs) > 0.1  # a curve, not a constant
    # the model is untouched and still trainable (deepcopy_model=True keeps wrap_model off it)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert all(p.requires_grad for p in m.parameters())
    # could fail: another draw, or the start point included (alphas 0..8), is far outside the tolerance
    torch.manual_seed(4)
    other = peers.line_like_random_line(m, (x, y), 9, peers.ll_line_direction(m, 0.5, 9))
    assert np.abs(other - theirs).max() > 1e-2
    from batchgap.landscape import loss_curve
    shifted = loss_curve(m, peers._named(m, d), (x, y), alphas=np.arange(0, 9)).loss
    assert np.abs(shifted - theirs).max() > 1e-2


def test_loss_surface_equals_random_plane_on_its_grid(xy):
    ll = pytest.importorskip("loss_landscapes")
    import loss_landscapes.metrics

    x, y = xy
    m = tiny()
    metric = loss_landscapes.metrics.Loss(nn.CrossEntropyLoss(), x, y)
    torch.manual_seed(5)
    theirs = ll.random_plane(m, metric, distance=0.5, steps=5, normalization="filter", deepcopy_model=True)
    torch.manual_seed(5)
    d1, d2 = peers.ll_plane_directions(m, 0.5, 5)
    ours = peers.plane_like_random_plane(m, (x, y), 5, d1, d2)
    assert ours.shape == theirs.shape == (5, 5)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    # could fail: the plain (unstaggered) grid i - 5/2, j - 5/2 differs on the even rows
    from batchgap.landscape import loss_surface
    plain = loss_surface(m, peers._named(m, d1), peers._named(m, d2), (x, y),
                         alphas=np.arange(5) - 2.5, betas=np.arange(5) - 2.5).loss
    assert np.abs(plain[1::2] - theirs[1::2]).max() < 1e-5  # odd rows: that grid
    assert np.abs(plain[::2] - theirs[::2]).max() > 1e-3  # even rows: one d2 step further


def test_interpolate_equals_linear_interpolation_with_the_start_buffers(xy):
    ll = pytest.importorskip("loss_landscapes")
    import loss_landscapes.metrics
    from batchgap.landscape import interpolate

    x, y = xy
    a, b = tiny(0), tiny(1)
    assert not torch.equal(a[1].running_mean, b[1].running_mean)
    metric = loss_landscapes.metrics.Loss(nn.CrossEntropyLoss(), x, y)
    theirs = ll.linear_interpolation(a, b, metric, steps=8, deepcopy_model=True)
    ours = peers.interpolation_like_linear_interpolation(a, b, (x, y), 8)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    # could fail: batchgap's own buffer interpolation (bn="eval" with b's buffers) is another function
    own = interpolate(a, b, (x, y), alphas=np.arange(1, 9) / 8, bn="eval").loss
    assert np.abs(own - theirs).max() > 1e-3


# ------------------------------------------------------------------------------------------ Hessian peers
def test_top3_eigenvalues_equal_pyhessians_and_eigshs(trained, xy):
    pytest.importorskip("pyhessian")
    pytest.importorskip("curvlinops")
    from batchgap.landscape import hessian_eigenvalues

    x, y = xy
    exact = np.sort(np.linalg.eigvalsh(dense_hessian(trained, x, y).numpy()))[::-1]
    assert exact[0] > exact[1] > exact[2] > 0 and exact[2] > 2 * abs(exact[-1])  # what each method finds
    ours = hessian_eigenvalues(trained, (x, y), k=3, tol=1e-6, max_hvp=91).eigenvalues
    pyh, _ = peers.pyhessian_top(trained, nn.CrossEntropyLoss(), x, y, 3, maxIter=3000, tol=1e-9)
    cl, _ = peers.curvlinops_top(trained, nn.CrossEntropyLoss(), x, y, 3, tol=1e-6)
    ref = peers.exact_top_eigenvalues(trained, x, y, k=3)[0]
    np.testing.assert_allclose(ref, exact[:3], rtol=1e-8)
    np.testing.assert_allclose(ours, exact[:3], rtol=1e-5)
    np.testing.assert_allclose(cl, exact[:3], rtol=1e-5)
    np.testing.assert_allclose(pyh, exact[:3], rtol=1e-3)  # power iteration, float32
    np.testing.assert_allclose(ours, pyh, rtol=1e-3)
    np.testing.assert_allclose(ours, cl, rtol=1e-5)
    assert np.abs(exact[1:4] - exact[:3]).min() / exact[0] > 1e-2  # could fail: off by one is far outside


def test_trace_estimates_agree_with_the_dense_trace(trained, xy):
    pytest.importorskip("pyhessian")
    pytest.importorskip("curvlinops")
    from curvlinops import hutchinson_trace
    from batchgap.landscape import hessian_trace

    x, y = xy
    exact = float(torch.trace(dense_hessian(trained, x, y)))
    ours = hessian_trace(trained, (x, y), n_probes=400, method="hutchinson", seed=0, confidence=0.99)
    assert ours.ci_low <= exact <= ours.ci_high
    assert ours.ci_high - ours.ci_low < 0.2 * abs(exact)  # could fail: the interval is narrow
    vhv, hvps = peers.pyhessian_trace(trained, nn.CrossEntropyLoss(), x, y, 60, seed=0)
    assert len(vhv) == hvps == 60  # tol=-inf: exactly maxIter probes
    torch.manual_seed(0)
    cl = float(hutchinson_trace(peers.curvlinops_hessian(trained, nn.CrossEntropyLoss(), x, y), num_matvecs=60))
    # each a 60-probe Hutchinson estimate: within 4 of its standard errors (batchgap's per-probe spread)
    se60 = ours.stderr * math.sqrt(400 / 60)
    for estimate in (float(np.mean(vhv)), cl):
        assert abs(estimate - exact) < 4 * se60
    # PyHessian after torch.manual_seed(0) draws the same Rademacher probes as batchgap's seed 0 (both take
    # torch's CPU generator's draws in parameter order, probe after probe): the same estimate to rounding.
    # If batchgap's draw ever changes, this equality, not the estimator, is what breaks.
    same = hessian_trace(trained, (x, y), n_probes=60, method="hutchinson", seed=0).value
    assert same == pytest.approx(float(np.mean(vhv)), rel=1e-5)
    assert abs(same - exact) > 1e-3 * abs(exact)  # could fail: not the exact trace, the same 60 probes


def test_pyhessian_density_fails_on_this_torch(trained, xy):
    pytest.importorskip("pyhessian")
    if hasattr(torch, "eig") and "removed" not in (torch.eig.__doc__ or "") and _eig_works():
        pytest.skip("this torch still has torch.eig")
    x, y = xy
    with pytest.raises(RuntimeError, match="torch.linalg.eig"):
        peers.pyhessian_comp(trained, nn.CrossEntropyLoss(), x, y).density(iter=3, n_v=1)
    trained.zero_grad(set_to_none=True)


def _eig_works() -> bool:
    try:
        torch.eig(torch.eye(2))
        return True
    except Exception:
        return False


# ------------------------------------------------------------------------------------------ pins
def test_requirements_peers_and_the_bench_extra_list_the_same_pins():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    lines = (ROOT / "benchmarks" / "requirements-peers.txt").read_text().splitlines()
    pins = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["bench"]
    assert sorted(pins) == sorted(extra)
    assert all("==" in p for p in pins) and len(pins) == 9
    assert "backpack-for-pytorch==1.7.1" in pins
