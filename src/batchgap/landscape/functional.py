"""The full-data loss as a function of a flat parameter vector: values, gradients, HVPs, many points.

Everything here evaluates

    L(theta) = sum_b loss_sum_b(theta) / sum_b weight_b     (= (1/n) sum_b |b| * loss_fn(model(x_b; theta), y_b)
                                                              for the default objective on pairs)

exactly over all of ``data`` (unit weighted, never a mean of batch means), each batch through the objective
(:mod:`objective`: how a batch of any form becomes ``(loss_sum, weight)``), with
``torch.func.functional_call`` so the model's own tensors are never written during the computation.
``theta`` is the flat vector of the selected parameters (:func:`params.named_parameters`: ``"all"``
trainable, or ``"no-bn"`` = ``"no-norm"``, outside normalization layers), each tensor once: a tied tensor
(``dec.weight = emb.weight``) is one block of theta under its first name, and ``functional_call``
(``tie_weights=True``) writes it into every place the model uses it. The others and all buffers are
read from the model. :attr:`FullDataLoss.params_measured` says what was selected, with the counts and
the tied names. ``data`` is any form :func:`evaluate.batches` accepts.

:func:`session` fixes the BatchNorm protocol for a whole measurement and restores the model after:

* ``"eval"``: model.eval(). Running statistics where tracked; batch statistics where the model was
  built with ``track_running_stats=False``.
* ``"batch"``: batch statistics of every evaluation batch. BN layers are put in train mode with
  ``track_running_stats`` switched off for the session, so no buffer is ever updated (which also
  keeps the loss a pure function of theta for torch.func).
* ``"recompute"``: running statistics recomputed ONCE, exactly (each layer's mean and unbiased
  variance over all of ``bn_data``, default ``data``; :func:`evaluate.recompute_bn_statistics`), at the
  model's current parameters, then held fixed in eval mode. (Curves recompute per point instead;
  see :mod:`curves`.)

Dropout is off in every mode.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn
from torch.func import vmap

from . import ranks
from .evaluate import BN_MODES, bn_protocol, my_batches, recompute_bn_statistics
from .fold import folded_view
from .objective import (
    ATTENTION_NOTE, Bound, as_objective, batch_rows, device_of, second_order, to_device,
)
from .params import describe_params, flat, is_batchnorm, named_parameters, preserved, tied_parameters, unflatten


@contextmanager
def session(model: nn.Module, bn: str, data=None, bn_data=None, batch_size: int = 1000, objective=None
            ) -> Iterator[None]:
    """Fix the BN protocol (see module docstring) for the body; the model is restored after, even on error."""
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, not {bn!r}")
    with preserved(model):
        if bn == "recompute":
            recompute_bn_statistics(model, data if bn_data is None else bn_data, batch_size, objective)
        model.eval()
        if bn == "batch":
            for m in model.modules():
                if is_batchnorm(m):
                    m.train()
                    m.track_running_stats = False
        yield


def saved_bytes(t: torch.Tensor) -> int:
    """Bytes of the tensors that the autograd graph behind ``t`` saves for its backward (each storage once).

    Read from the nodes' ``_saved_*`` attributes. Not with ``saved_tensors_hooks``: a pack hook that keeps
    the tensor itself makes a graph that saves its own outputs a reference cycle that is never freed. Tensors
    a custom ``torch.autograd.Function`` keeps on its ``ctx`` are not seen (an undercount for such models)."""
    seen, todo, storages = set(), [t.grad_fn], {}
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo += [f for f, _ in node.next_functions]
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            try:
                value = getattr(node, name)
            except RuntimeError:  # freed, or not a tensor that can be unpacked
                continue
            for v in value if isinstance(value, (tuple, list)) else (value,):
                if torch.is_tensor(v) and v.layout == torch.strided:
                    s = v.untyped_storage()
                    storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
    return sum(storages.values())


def objective_fields(objective) -> dict:
    """The objective's :class:`protocol.Measured` fields: the loss in words, the batch form, the unit; and the
    processes that shared the data (:func:`ranks.fields`: ``world_size``, ``backend``)."""
    return dict(loss_fn=objective.name, objective=objective.kind, unit=objective.unit, **ranks.fields())


def measured_protocol(model: nn.Module, F: "FullDataLoss", bn: str, bn_data, batch_size: int, params: str) -> dict:
    """The :class:`protocol.Measured` fields (and ``params_measured``) of a full-data measurement through ``F``,
    after at least one pass (``F.n`` is the units summed): shared by every measure built on :class:`FullDataLoss`."""
    return dict(n=F.n, bn=bn, bn_description=bn_protocol(model, bn, batch_size, bn_data), params=params,
                num_params=F.num_params, params_measured=F.params_measured, batch_size=batch_size,
                attention=F.attention, **objective_fields(F.objective))


GRAPH_BUDGET = 512 << 20  # bytes of saved tensors that hvp keeps between calls (FullDataLoss(graph_budget=...))


class FullDataLoss:
    """L(theta) over all of ``data`` for the parameters ``which`` of ``model``. Use inside :func:`session`.

    Under a process group each pass reads this rank's share of the batches and every sum is summed over the
    ranks (:mod:`ranks`; :meth:`reduce`), so every rank holds the same values; ``n`` counts all ranks' units.

    Costs, in passes over ``data`` (measured on the study's MLP on a CPU, 4000 examples): :meth:`value`
    one forward pass F; :meth:`value_and_grad` one forward and backward, G = 2.2 F; :meth:`hvp` per
    batch a forward, a backward keeping its graph and one backward through it per vector, 4.8 G for
    one vector (less per vector for several); :meth:`values_at_rows` one F per point.
    """

    def __init__(self, model: nn.Module, data, loss_fn: Callable | None = None, batch_size: int = 1000,
                 which: str = "all", fold: bool = True, graph_budget: int = GRAPH_BUDGET, objective=None):
        self.model, self.data, self.batch_size, self.which = model, data, batch_size, which
        self.objective = as_objective(objective, loss_fn)
        self.device = device_of(model)
        self.attention_calls = 0  # scaled_dot_product_attention calls seen while building second-order graphs
        # fixed BN statistics (eval, recompute): each (layer, BN) pair evaluated as one layer (fold.py)
        self.view = folded_view(model) if fold else None
        self.graph_budget = graph_budget
        self._graphs: list | None = None  # kept gradient graphs at x0 for hvp (see hvp)
        named = named_parameters(model, which)
        if not named:
            raise ValueError(f"the model has no trainable parameters for params={which!r}")
        self.names = [n for n, _ in named]
        self.shapes = [p for _, p in named]
        self.tied = tied_parameters(model)  # (alias, name): measured once, under name
        self.params_measured = describe_params(model, which)
        self.x0 = flat(self.shapes)  # the centre, a detached copy
        self.num_params = self.x0.numel()
        self.n: int | float | None = None  # units (objective weights) summed in the last pass
        self.rows: int | None = None  # rows (examples, sequences) read in the last pass

    # -- plumbing ---------------------------------------------------------------------------------
    def as_dict(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, unflatten(vector, self.shapes)))

    def bound(self, vector: torch.Tensor) -> Bound:
        """The model with the measured parameters set to ``vector`` (what the objective calls)."""
        return Bound(self.model if self.view is None else self.view, self.as_dict(vector))

    def forward(self, vector: torch.Tensor, x) -> torch.Tensor:
        return self.bound(vector)(x)

    def loss(self, vector: torch.Tensor, batch):
        """One batch through the objective at ``vector``: a :class:`objective.BatchLoss`."""
        return self.objective(self.bound(vector), batch)

    def batches(self):
        """This rank's share (all, alone) of the data's batches on the model's device, each yielded once per
        pass; after a pass, ``rows`` is checked against the last pass (a one-shot iterator is refused)."""
        count = 0
        for batch in my_batches(self.data, self.batch_size, check=self.rows is None):
            count += batch_rows(batch)
            yield to_device(batch, self.device)
        if self.rows is None and ranks.all_sum(count) == 0:
            raise ValueError("no data to evaluate")
        if self.rows is not None and count != self.rows:
            raise ValueError(f"data changed between passes ({self.rows} then {count} rows): pass a "
                             "tensor pair, a TensorData, a map-style dataset or a re-iterable sequence of "
                             "batches, not a one-shot iterator")
        self.rows = count

    def reduce(self, *values):
        """Sums of this rank's share summed over the ranks (:func:`ranks.all_sum`); the values themselves alone."""
        return ranks.all_sum(*values)

    def count_units(self, weight) -> None:
        """Record the units (objective weights) a full pass summed over all ranks (:meth:`reduce` first); a pass
        that sums others is refused."""
        if self.n is not None and weight != self.n:
            raise ValueError(f"the objective's units changed between passes ({self.n} then {weight})")
        self.n = weight

    @property
    def attention(self) -> str | None:
        """How attention was differentiated twice, for protocols (None when the model made no such call)."""
        return ATTENTION_NOTE if self.attention_calls else None

    # -- quantities -------------------------------------------------------------------------------
    @torch.no_grad()
    def value(self, vector: torch.Tensor) -> float:
        total = torch.zeros((), dtype=torch.float64)
        weight = 0
        for batch in self.batches():
            step = self.loss(vector, batch)
            total += step.mean.double() * step.weight
            weight += step.weight
        total, weight = self.reduce(total, weight)
        self.count_units(weight)
        return float(total / self.n)

    def value_and_grad(self, vector: torch.Tensor) -> tuple[float, torch.Tensor]:
        """L(theta) and its exact gradient (float64), one forward and backward pass per batch."""
        leaf = vector.detach().clone().requires_grad_(True)
        total = torch.zeros((), dtype=torch.float64)
        gsum = torch.zeros(leaf.shape, dtype=torch.float64, device=leaf.device)
        weight = 0
        for batch in self.batches():
            step = self.loss(leaf, batch)
            (g,) = torch.autograd.grad(step.mean, leaf)
            gsum += g.double() * step.weight
            total += step.mean.detach().double() * step.weight
            weight += step.weight
        total, gsum, weight = self.reduce(total, gsum, weight)
        self.count_units(weight)
        return float(total / self.n), gsum / self.n

    def _gradient_graphs(self, at: torch.Tensor):
        """Per data batch ``(leaf, gradient with its graph, |b|)``. At the centre the graphs are kept for
        the next call while the tensors they save (counted as autograd saves them) stay within
        ``graph_budget`` bytes; past it, or elsewhere, each is built, used and dropped (memory: one batch's)."""
        if at is self.x0 and self._graphs:
            yield from self._graphs
            return
        keep = at is self.x0 and self._graphs is None and self.graph_budget > 0
        kept, used, weight = [], 0, 0
        for batch in self.batches():
            leaf = at.detach().requires_grad_(True)
            with second_order() as attention:
                step = self.loss(leaf, batch)
                (g,) = torch.autograd.grad(step.mean, leaf, create_graph=True)
            self.attention_calls += attention.calls
            weight += step.weight
            if keep:
                used += saved_bytes(g)
            if keep and used > self.graph_budget:
                keep, kept = False, []
                self._graphs = False  # over budget: never kept for this loss
            if keep:
                kept.append((leaf, g, step.weight))
            yield leaf, g, step.weight
        if self.n is None or ranks.world()[1] == 1:  # ranks may keep graphs differently: no collective after
            self.count_units(self.reduce(weight))
        if keep:
            self._graphs = kept
            self.graph_bytes = used

    def hvp(self, vectors: torch.Tensor, at: torch.Tensor | None = None, chunk: int = 8) -> torch.Tensor:
        """Hessian-vector products H v (float64) for ``vectors`` of shape ``(N,)`` or ``(k, N)``.

        Reverse-over-reverse: per batch, one forward pass and the gradient with its graph kept
        (``create_graph``), then one backward pass of ``grad . v`` per vector through that graph,
        weighted by |b|/n. On the CPU this measured faster than forward-over-reverse
        (``torch.func.jvp`` of ``torch.func.grad``, vmapped over vectors), 1.2x for one vector and
        1.4x for four, at equal values (docs/performance.md); the graph is built once per batch for
        all the vectors of a call, and at the centre (``at=None``) once for ALL calls while the graphs
        of all batches fit in ``graph_budget`` bytes of saved tensors (:meth:`_gradient_graphs`), so a
        Lanczos chain pays one forward and gradient per batch in all. ``chunk`` is kept for the
        callers' signature and does not change the result.
        """
        at = self.x0 if at is None else at
        single = vectors.dim() == 1
        V = (vectors[None] if single else vectors).to(dtype=at.dtype, device=at.device)
        out = torch.zeros(V.shape, dtype=torch.float64, device=at.device)
        for leaf, g, size in self._gradient_graphs(at):
            keep = at is self.x0 and self._graphs is not False
            for i in range(len(V)):
                with second_order():
                    (hv,) = torch.autograd.grad(g @ V[i], leaf, retain_graph=keep or i + 1 < len(V))
                out[i] += hv.double() * size
        out = self.reduce(out) / self.n
        return out[0] if single else out

    @torch.no_grad()
    def values_at_rows(self, point_fn: Callable, rows: torch.Tensor, chunk: int = 1
                       ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Loss and accuracy at the points ``point_fn(rows[s:s+c])`` (each ``(c, N)``), for all rows.

        Each data batch is read once and every point is evaluated on it before the next batch.
        ``chunk == 1``: one ``functional_call`` per point; ``chunk > 1``: ``vmap`` of
        ``functional_call`` over chunks of stacked parameter vectors (memory ``chunk x N`` for the
        points plus ``chunk`` copies of the activations). Only valid when the loss is a pure
        per-point function of theta (no buffer updates): BN "eval" or "batch" inside a
        :func:`session`. Returns ``(loss (P,), accuracy (P,), classify)``, float64 on the CPU.
        """
        P = len(rows)
        loss = torch.zeros(P, dtype=torch.float64)
        correct = torch.zeros(P, dtype=torch.float64)
        kinds: list[bool] = []  # classification, seen per traced call (shapes are per point in vmap)
        weights: list = []
        total_weight = 0
        for batch in self.batches():
            def one(vec, batch=batch):
                step = self.loss(vec, batch)
                kinds.append(step.correct is not None)
                weights.append(step.weight)
                hit = step.correct if kinds[-1] else torch.zeros((), dtype=torch.long, device=step.mean.device)
                return step.mean, hit

            for s in range(0, P, chunk):
                points = point_fn(rows[s : s + chunk])
                if chunk == 1:
                    values, c = one(points[0])
                else:
                    values, c = vmap(one)(points)
                loss[s : s + chunk] += values.double().cpu() * weights[-1]
                correct[s : s + chunk] += c.double().cpu()
            total_weight += weights[-1] if P else 0
        loss, correct, total_weight, unclassified = self.reduce(loss, correct, total_weight, int(not all(kinds)))
        if P:
            self.count_units(total_weight)
        classify = unclassified == 0
        accuracy = correct / self.n if classify else torch.full((P,), float("nan"), dtype=torch.float64)
        return loss / self.n, accuracy, classify
