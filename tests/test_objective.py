"""Issue 25: one objective read by every measure (dict batches, Hugging Face outputs, tuple outputs, tokens).

Oracles: the Hessian of the flat parameter vector by ``torch.func.hessian`` through the same objective, a
brute-force maximum for eps-sharpness on a 2-parameter objective, a hand computation of token weighting with
padding, and, for tuple outputs, the default objective on the same network (equal to the bit).
"""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import batchgap
from batchgap.landscape.objective import FunctionObjective, as_objective, second_order
from batchgap.landscape.params import flat, named_parameters, unflatten

transformers = pytest.importorskip("transformers")


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=7, n_positions=6, n_embd=4, n_layer=1, n_head=1, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def lm_batches(seed: int = 1):
    """Two dict batches of different padding: labels -100 where the attention mask is 0."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows, lengths in ((3, (6, 4, 5)), (2, (3, 6))):
        ids = torch.randint(0, 7, (rows, 6), generator=g)
        mask = torch.zeros(rows, 6, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def oracle_loss(model, data, objective):
    """L(theta) = sum_b loss_sum_b / sum_b weight_b as a function of the flat parameters, by functional_call."""
    named = named_parameters(model, "all")
    names = [n for n, _ in named]
    x0 = flat([p for _, p in named]).detach()

    def f(theta):
        params = dict(zip(names, unflatten(theta, [p for _, p in named])))
        total, weight = 0.0, 0
        for batch in data:
            step = objective(batchgap.landscape.objective.Bound(model, params), batch)
            total = total + step.mean * step.weight
            weight += step.weight
        return total / weight

    return f, x0


def test_token_weighting_with_padding_equals_the_hand_computation():
    model, data = tiny_gpt2(), lm_batches()
    obj = batchgap.huggingface_objective(causal_lm=True)
    total, count, means = 0.0, 0, []
    with torch.no_grad():
        for b in data:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
            s = 0.0
            c = 0
            for i in range(len(logits)):
                for t in range(5):  # position t predicts token t + 1
                    label = int(b["labels"][i, t + 1])
                    if label != -100:
                        s += float(-torch.log_softmax(logits[i, t], -1)[label])
                        c += 1
            total, count = total + s, count + c
            means.append(s / c)
    m = batchgap.evaluate(model, data, objective=obj)
    assert m.n == count == (5 + 3 + 4) + (2 + 5)
    assert m.loss == pytest.approx(total / count, rel=1e-5)
    assert abs(np.mean(means) - total / count) > 1e-3  # a mean of batch means would be another number
    # the model's own .loss (a mean over the batch's counted tokens) times the count gives the same
    assert batchgap.evaluate(model, data, objective=batchgap.huggingface_objective(
        causal_lm=True, from_output="loss")).loss == pytest.approx(total / count, rel=1e-5)


def test_hessian_of_a_gpt2_on_dict_batches_equals_torch_func_hessian_through_the_same_objective():
    model, data = tiny_gpt2(), lm_batches()
    obj = batchgap.huggingface_objective(causal_lm=True)
    f, x0 = oracle_loss(model, data, obj)
    with sdpa_kernel([SDPBackend.MATH]):
        H = torch.func.hessian(f)(x0).double()
    exact = torch.linalg.eigvalsh((H + H.T) / 2).flip(0).numpy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    eig = batchgap.hessian_eigenvalues(model, data, k=3, objective=obj, tol=1e-6, max_hvp=300)
    np.testing.assert_allclose(eig.eigenvalues, exact[:3], rtol=1e-3, atol=1e-4)
    assert eig.unit == "token" and eig.n == 19 and "causal" in eig.objective.lower()
    assert eig.attention is not None and "math" in eig.attention  # GPT-2 calls scaled_dot_product_attention
    tr = batchgap.hessian_trace(model, data, n_probes=400, method="hutchinson", objective=obj, confidence=0.999)
    assert tr.ci_low <= float(torch.trace(H)) <= tr.ci_high
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class Attention(nn.Module):
    """One head of causal self-attention through F.scaled_dot_product_attention, on (batch, T, d) inputs."""

    def __init__(self, d: int = 3, classes: int = 2):
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, classes)

    def forward(self, x):
        q, k, v = self.qkv(x)[:, None].chunk(3, dim=-1)  # (batch, 1 head, T, d): what the fused kernels take
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, 0].mean(1))


def test_second_order_measures_run_through_fused_attention_on_its_math_backend():
    torch.manual_seed(0)
    model, x, y = Attention(), torch.randn(8, 4, 3), torch.randint(0, 2, (8,))
    # the fault the math backend fixes: the fused CPU kernel has no double backward
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        loss = F.cross_entropy(model(x), y)
        (g,) = torch.autograd.grad(loss, model.qkv.weight, create_graph=True)
        with pytest.raises(RuntimeError, match="(?i)derivative|not implemented"):
            torch.autograd.grad(g.sum(), model.qkv.weight)
    f, x0 = oracle_loss(model, [(x, y)], as_objective())
    with sdpa_kernel([SDPBackend.MATH]):
        exact = torch.linalg.eigvalsh(torch.func.hessian(f)(x0).double()).flip(0).numpy()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # what a user's default would pick: still measured
        r = batchgap.hessian_eigenvalues(model, (x, y), k=2, tol=1e-8, max_hvp=200)
    np.testing.assert_allclose(r.eigenvalues, exact[:2], rtol=1e-4, atol=1e-6)
    assert r.attention is not None
    plain = batchgap.hessian_eigenvalues(nn.Sequential(nn.Linear(3, 2)), (x[:, 0], y), k=1)
    assert plain.attention is None


class TupleNet(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        h = self.net(x)
        return h, h.detach() * 0  # logits and something else, as many models return


def test_a_tuple_output_model_measures_what_the_plain_model_measures_to_the_bit():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    wrapped = TupleNet(plain)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    obj = batchgap.tuple_objective(0)
    assert batchgap.evaluate(wrapped, (x, y), objective=obj).loss == batchgap.evaluate(plain, (x, y)).loss
    a = batchgap.eps_sharpness(wrapped, (x, y), eps=1e-3, objective=obj)
    b = batchgap.eps_sharpness(plain, (x, y), eps=1e-3)
    assert a.value == b.value and a.objective != b.objective
    ea = batchgap.hessian_eigenvalues(wrapped, (x, y), k=2, objective=obj).eigenvalues
    np.testing.assert_array_equal(ea, batchgap.hessian_eigenvalues(plain, (x, y), k=2).eigenvalues)
    na = batchgap.exact_gradient_noise_scale(wrapped, (x, y), objective=obj)
    nb = batchgap.exact_gradient_noise_scale(plain, (x, y))
    assert "closed form" not in na.grad_path and "closed form" in nb.grad_path  # enumerated vs closed form:
    assert na.b_simple == pytest.approx(nb.b_simple, rel=1e-6)  # equal to float32 rounding
    assert batchgap.norm_measures(wrapped, (x, y), objective=obj).margin == batchgap.norm_measures(plain, (x, y)).margin


def test_eps_sharpness_of_a_two_parameter_dict_objective_equals_a_brute_force_maximum():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([0.3, -0.2]))

        def forward(self, inputs):
            return torch.tanh(inputs @ self.w)

    def squared_error(model, batch):
        r = model(batch["inputs"]) - batch["target"]
        return (r * r).sum(), len(r)

    g = torch.Generator().manual_seed(0)
    data = [{"inputs": torch.randn(6, 2, generator=g), "target": torch.randn(6, generator=g)} for _ in range(3)]
    model, eps = Two(), 0.05
    res = batchgap.eps_sharpness(model, data, eps=eps, objective=squared_error)
    w = model.w.detach().double()
    X = torch.cat([b["inputs"] for b in data]).double()
    t = torch.cat([b["target"] for b in data]).double()

    def loss(v):
        return float(((torch.tanh(X @ v) - t) ** 2).mean())

    f0 = loss(w)
    half = eps * (w.abs() + 1)
    grid = [torch.linspace(-1, 1, 201, dtype=torch.float64) * h for h in half]
    best = max(loss(w + torch.stack([a, b])) for a, b in itertools.product(*grid))
    phi = (best - f0) / (1 + f0) * 100
    assert res.f_x == pytest.approx(f0, rel=1e-5)
    assert res.value == pytest.approx(phi, rel=2e-3)
    assert res.unit == "unit" and res.n == 18 and "squared_error" in res.loss_fn


def test_every_measure_runs_on_a_dict_batch_hugging_face_model_and_restores_it():
    model, data = tiny_gpt2(), lm_batches()
    obj = batchgap.huggingface_objective(causal_lm=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = batchgap.evaluate(model, data, objective=obj)
    assert 0 < base.accuracy < 1 and base.n == 19
    results = [
        batchgap.eps_sharpness(model, data, objective=obj, max_iter=2),
        batchgap.eps_sharpness(model, data, objective=obj, subspace_dim=5, max_iter=2),
        batchgap.adaptive_sharpness(model, data, rho=0.01, objective=obj, max_iter=2),
        batchgap.hessian_density(model, data, n_vectors=2, steps=8, objective=obj),
        batchgap.average_sharpness(model, data, sigma=0.01, n_samples=4, objective=obj),
        batchgap.pac_bayes_flatness(model, data, n_samples=4, objective=obj),
        batchgap.worst_case_flatness(model, data, objective=obj, max_iter=2),
        batchgap.norm_measures(model, data, objective=obj),
        batchgap.exact_gradient_noise_scale(model, data, objective=obj),
    ]
    for r in results:
        assert r.unit == "token" and r.n == 19, type(r).__name__
        assert "Hugging Face" in r.objective, type(r).__name__
    norms = results[7]
    assert norms.margin is not None and math.isfinite(norms.fisher_rao_norm)
    d = batchgap.filter_normalized_direction(model, seed=0)
    curve = batchgap.loss_curve(model, d, data, alphas=[-0.5, 0.0, 0.5], objective=obj)
    assert curve.loss[1] == pytest.approx(base.loss, rel=1e-6) and curve.unit == "token"
    surface = batchgap.loss_surface(model, d, batchgap.filter_normalized_direction(model, seed=1), data,
                                    alphas=[0.0], betas=[0.0, 0.1], objective=obj)
    assert surface.loss[0, 0] == pytest.approx(base.loss, rel=1e-6)
    other = tiny_gpt2(seed=3)
    path = batchgap.interpolate(model, other, data, alphas=[0.0, 1.0], objective=obj)
    assert path.loss[0] == pytest.approx(base.loss, rel=1e-6)
    assert path.loss[1] == pytest.approx(batchgap.evaluate(other, data, objective=obj).loss, rel=1e-6)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_per_unit_noise_scale_equals_enumerated_token_gradients():
    model, data = tiny_gpt2(), lm_batches()
    obj = batchgap.huggingface_objective(causal_lm=True)
    f, x0 = oracle_loss(model, data, obj)
    rows = []
    for b in data:
        for i in range(len(b["labels"])):
            for t in range(1, 6):
                if b["labels"][i, t] == -100:
                    continue
                one = {k: v[i : i + 1] for k, v in b.items()}
                one["labels"] = torch.full_like(one["labels"], -100)
                one["labels"][0, t] = b["labels"][i, t]
                g = torch.func.grad(oracle_loss(model, [one], obj)[0])(x0)
                rows.append(g.double())
    G = torch.stack(rows)
    mean = G.mean(0)
    trace = float((G - mean).pow(2).sum(1).mean())
    r = batchgap.exact_gradient_noise_scale(model, data, objective=obj)
    assert r.n == len(rows) == 19
    assert r.grad_norm_sq == pytest.approx(float(mean @ mean), rel=1e-5)
    assert r.trace_sigma == pytest.approx(trace, rel=1e-5)


@pytest.mark.parametrize("fn, error, words", [
    (lambda m, b: (torch.ones(3), 3), ValueError, "0-dim"),
    (lambda m, b: (m(b[0]).sum(), 0), ValueError, "positive"),
    (lambda m, b: (m(b[0]).sum(), "3"), TypeError, "number"),
    (lambda m, b: torch.ones(2, 2), ValueError, "1-D"),
    (lambda m, b: 3.0, TypeError, "(loss_sum, weight)"),
])
def test_a_wrong_objective_is_refused_with_one_sentence_naming_the_fix(fn, error, words):
    model, x = nn.Linear(2, 1), torch.randn(4, 2)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        batchgap.evaluate(model, [(x, x[:, 0])], objective=FunctionObjective(fn))


def test_batch_forms_the_objective_does_not_read_are_refused_with_what_is_accepted():
    model = nn.Linear(2, 3)
    with pytest.raises(ValueError, match="huggingface_objective"):
        batchgap.evaluate(model, [{"input_ids": torch.zeros(2, 2)}])
    with pytest.raises(ValueError, match="no 'labels'"):
        batchgap.evaluate(tiny_gpt2(), [{"input_ids": torch.zeros(2, 3, dtype=torch.long)}],
                          objective=batchgap.huggingface_objective())
    with pytest.raises(ValueError, match="not both"):
        batchgap.evaluate(model, (torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)), loss_fn=F.cross_entropy,
                          objective="cross-entropy")
    with pytest.raises(ValueError, match="ready"):
        batchgap.evaluate(model, (torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)), objective="mse")
    one_shot = ((torch.randn(4, 2), torch.randint(0, 3, (4,))) for _ in range(2))
    with pytest.raises(ValueError, match="one-shot"):
        batchgap.eps_sharpness(model, one_shot, max_iter=2)


def test_the_default_objective_is_the_old_loss_to_the_bit():
    """Today's behaviour for (inputs, targets) pairs: the same float operations, so the same bits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(70, 5), torch.randint(0, 4, (70,))
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, 70, 32):
            total += F.cross_entropy(model(x[s : s + 32]), y[s : s + 32]).double() * len(y[s : s + 32])
    assert batchgap.evaluate(model, (x, y), batch_size=32).loss == float(total / 70)
    with second_order() as attention:  # the math backend changes nothing for a model without attention
        assert batchgap.evaluate(model, (x, y), batch_size=32).loss == float(total / 70)
    assert attention.calls == 0
