"""batchgap's full-data HVP as of commit 976ebaa, the baseline of the HVP rows of benchmarks/run.py.

Frozen: ``batchgap.landscape.functional.FullDataLoss.hvp`` as it was at 976ebaa, for a model whose
parameters are all trainable and untied (the default MLP the rows use), on a tensor pair, with its
plumbing copied in (``flat``, ``unflatten``: one ``torch.split``, and the forward through
``torch.func.functional_call``). Reverse-over-reverse with no kept graphs and no BatchNorm folding: per
batch one forward pass, the gradient with its graph (``create_graph``), one backward of ``grad . v`` per
vector, weighted |b|/n; every call rebuilds every batch's graph. Beside it, :meth:`forward_over_reverse`, the
HVP batchgap had before (``torch.func.jvp`` of ``torch.func.grad`` per batch), over the same plumbing.

The model's mode is the caller's: the rows call it with the model in eval mode (BN running statistics).
Imports torch alone (tests/test_benchmarks.py checks it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp


class FullDataLoss:
    """L(theta) = (1/n) sum_b |b| cross_entropy(model(x_b; theta), y_b) over all of (x, y), theta the flat
    vector of every parameter of ``model``."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if len(named) != len(list(model.parameters())):
            raise ValueError("the frozen 976ebaa HVP covers models whose parameters are all trainable")
        self.model, self.x, self.y, self.batch_size = model, x, y, batch_size
        self.names = [n for n, _ in named]
        self.shapes = [p for _, p in named]
        self.x0 = torch.cat([t.detach().reshape(-1) for t in self.shapes])
        self.num_params = self.x0.numel()
        self.n = len(y)

    def as_dict(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(vector, [t.numel() for t in self.shapes])
        return {n: p.view(t.shape) for n, p, t in zip(self.names, parts, self.shapes)}

    def forward(self, vector: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.as_dict(vector), (x,))

    def batches(self):
        for start in range(0, self.n, self.batch_size):
            yield self.x[start : start + self.batch_size], self.y[start : start + self.batch_size]

    def hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        """H v (float64) for ``vectors`` of shape ``(N,)`` or ``(k, N)``: 976ebaa's reverse-over-reverse."""
        at = self.x0
        single = vectors.dim() == 1
        V = (vectors[None] if single else vectors).to(dtype=at.dtype, device=at.device)
        out = torch.zeros(V.shape, dtype=torch.float64, device=at.device)
        for x, y in self.batches():
            leaf = at.detach().requires_grad_(True)
            loss = F.cross_entropy(self.forward(leaf, x), y)
            (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
            for i in range(len(V)):
                (hv,) = torch.autograd.grad(g @ V[i], leaf, retain_graph=i + 1 < len(V))
                out[i] += hv.double() * len(y)
        out /= self.n
        return out[0] if single else out

    def forward_over_reverse(self, v: torch.Tensor) -> torch.Tensor:
        """H v (float64) for one vector: ``torch.func.jvp`` of ``torch.func.grad`` per batch, weighted |b|/n."""
        out = torch.zeros(v.shape, dtype=torch.float64, device=self.x0.device)
        for x, y in self.batches():
            g = grad(lambda w, x=x, y=y: F.cross_entropy(self.forward(w, x), y))
            out += jvp(g, (self.x0,), (v.to(self.x0.dtype),))[1].double() * len(y)
        return out / self.n
