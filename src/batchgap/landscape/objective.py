"""How a batch of any form becomes a loss: the one seam every measure reads.

An objective turns a model and one batch into the batch's summed loss and how many units it summed:

    objective(model, batch) -> (loss_sum, weight)        or        -> per-unit losses, a 1-D tensor

where the units are examples (a classifier) or tokens (a language model). Over all of the data, every
measure reads

    L(theta) = sum_b loss_sum_b / sum_b weight_b,

never a mean of batch means. ``model`` is what the objective calls: the user's module, or (inside a
measure) a stand-in that calls the module with the measured parameters substituted
(:func:`torch.func.functional_call`) and passes every other attribute (``config``, ...) through.

Ready objectives, each a :class:`Objective` with a ``name`` and a ``unit`` that every result's protocol
records:

* :func:`pair_objective` (the default): ``(inputs, targets)`` pairs, ``loss_fn(model(inputs), targets)``
  returning the batch MEAN (default: cross-entropy of logits), weight = rows. Exactly today's numbers.
* :func:`tuple_objective`: the same for a model that returns a tuple (``index`` picks the logits).
* :func:`huggingface_objective`: a Hugging Face model on dict or ``BatchEncoding`` batches holding
  ``labels``: cross-entropy of ``.logits`` summed over the labelled units (``ignore_index`` left out),
  weight = their count; ``causal_lm=True`` shifts by one token (position t predicts token t + 1), unit
  "token"; ``from_output="loss"`` reads the model's own mean ``.loss`` instead (then times the count).
* any callable ``fn(model, batch)`` returning ``(loss_sum, weight)`` or a vector of per-unit losses.

Per-unit losses (what the per-example measures need: noise scale, margins, Fisher-Rao norm) come from
:meth:`Objective.per_unit`; an objective that cannot give them returns None and the measure refuses in one
sentence. Batches move to the model's device (:func:`to_device`). This module imports no framework.

Second-order measures (HVPs) build graphs through the gradient; fused attention kernels
(``scaled_dot_product_attention``'s flash and memory-efficient backends) have no double backward, so
:func:`second_order` runs such computations on the math backend and counts the attention calls it saw.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class BatchLoss:
    """One batch through an objective: ``mean`` (0-dim, differentiable) = loss sum / ``weight`` (units summed,
    a positive Python number); ``correct`` = units classified right (0-dim, no gradient) or None when the
    objective is not a classification."""

    mean: torch.Tensor
    weight: float
    correct: torch.Tensor | None = None


def mean_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default loss: mean cross-entropy of logits ``(batch, classes)`` against class indices."""
    if not torch.is_tensor(logits):
        raise ValueError(f"the model returned a {type(logits).__name__}: with the default objective it must return "
                         "logits (a tensor of shape (batch, classes)); otherwise pass loss_fn(outputs, targets) "
                         "that takes what it returns, or an objective (batchgap.tuple_objective, "
                         "batchgap.huggingface_objective, or your own objective(model, batch))")
    return F.cross_entropy(logits, y)


def is_classification(out, y) -> bool:
    """Whether ``out`` are logits ``(batch, classes)`` and ``y`` class indices ``(batch,)``."""
    return torch.is_tensor(out) and torch.is_tensor(y) and out.dim() == 2 and y.dim() == 1 and \
        not y.is_floating_point()


def loss_fn_name(loss_fn) -> str:
    """The loss in words for a result: "mean cross-entropy" for the default, else the function's name."""
    return "mean cross-entropy" if loss_fn is None else getattr(loss_fn, "__name__", repr(loss_fn))


def _is_pair(batch) -> bool:
    return isinstance(batch, (tuple, list)) and len(batch) == 2


def batch_rows(batch) -> int:
    """The number of rows (examples, sequences) of a batch: the first dimension of its first tensor."""
    if torch.is_tensor(batch):
        return len(batch)
    if _is_pair(batch) and torch.is_tensor(batch[1]):
        return len(batch[1])
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        if torch.is_tensor(item) and item.dim() > 0:
            return len(item)
    raise ValueError(f"a batch of type {type(batch).__name__} holds no tensor: accepted batches are (inputs, targets) "
                     "pairs, tuples or lists of tensors, and dicts (or BatchEncodings) of tensors")


def to_device(batch, device: torch.device):
    """``batch`` with every tensor on ``device`` (tuples, lists and mappings walked; a tensor already there is
    returned as it is, not copied). A ``BatchEncoding`` or other mapping becomes a plain dict."""
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        moved = [to_device(v, device) for v in batch]
        return tuple(moved) if isinstance(batch, tuple) else moved
    return batch


def device_of(model) -> torch.device:
    """Where the model's first parameter (or buffer) lives; the CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _weight(value, where: str) -> float:
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise ValueError(f"{where}: the weight must be one number (how many units the batch summed), "
                             f"got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: the weight must be a number (how many units the batch summed), got "
                        f"{type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{where}: the weight must be positive (how many units the batch summed), got {value}")
    return int(value) if float(value).is_integer() else float(value)


class Objective:
    """How a batch becomes a loss. Subclasses implement :meth:`__call__` (and :meth:`per_unit`,
    :meth:`logits` where they can); ``name`` and ``unit`` go into every result's protocol."""

    name: str = "objective"  # the loss in words (a result's ``loss_fn``)
    kind: str = "objective"  # the batch form and where the loss comes from (a result's ``objective``)
    unit: str = "example"

    def __call__(self, model, batch) -> BatchLoss:
        raise TypeError(f"{type(self).__name__} does not define __call__(model, batch)")

    def per_unit(self, model, batch) -> torch.Tensor | None:
        """The vector of per-unit losses of the batch (their mean is ``self(model, batch).mean``), or None."""
        return None

    def logits(self, model, batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(logits (units, classes), class targets (units,))`` of the counted units, or None (no classifier)."""
        return None

    def describe(self) -> str:
        return f"{self.name} (weighted by {self.unit})"


class PairObjective(Objective):
    """``(inputs, targets)`` pairs: ``loss_fn(output(model(inputs)), targets)`` is the batch mean over rows."""

    unit = "example"

    def __init__(self, loss_fn: LossFn | None = None, output: Callable | None = None, output_name: str = ""):
        self.loss_fn = loss_fn
        self._fn = loss_fn or mean_cross_entropy
        self._output = output
        self.name = loss_fn_name(loss_fn) + output_name
        self.kind = "(inputs, targets) pairs" + (", a tuple output" if output is not None else "")

    def _split(self, batch):
        if not _is_pair(batch):
            kind = "a dict" if isinstance(batch, Mapping) else f"a {type(batch).__name__}"
            raise ValueError(f"the default objective reads (inputs, targets) pairs and got {kind} batch: pass "
                             "objective=batchgap.huggingface_objective() for dict batches with 'labels', or your own "
                             "objective(model, batch) -> (loss_sum, weight)")
        return batch

    @property
    def plain(self) -> bool:
        """The model's output is the loss's input as it is (no tuple element picked)."""
        return self._output is None

    def loss_of(self, out, y) -> torch.Tensor:
        """``loss_fn(out, y)``: the batch mean of outputs already selected (:meth:`forward`)."""
        return self._fn(out, y)

    def forward(self, model, batch):
        """``(outputs, targets)`` of a pair batch: the model's output (the picked element for a tuple)."""
        x, y = self._split(batch)
        out = model(x)
        return (out if self._output is None else self._output(out)), y

    def __call__(self, model, batch) -> BatchLoss:
        out, y = self.forward(model, batch)
        mean = self._fn(out, y)
        hit = (out.argmax(-1) == y).sum() if is_classification(out, y) else None
        return BatchLoss(mean, len(y), hit)

    def per_unit(self, model, batch) -> torch.Tensor:
        out, y = self.forward(model, batch)
        if self.loss_fn is None and is_classification(out, y):
            return F.cross_entropy(out, y, reduction="none")
        return torch.stack([self._fn(out[i : i + 1], y[i : i + 1]) for i in range(len(y))])

    def logits(self, model, batch):
        out, y = self.forward(model, batch)
        return (out, y) if is_classification(out, y) else None


class HuggingFaceObjective(Objective):
    """A Hugging Face model on dict batches with ``labels`` (see the module docstring)."""

    def __init__(self, causal_lm: bool = False, ignore_index: int = -100, from_output: str = "logits"):
        if from_output not in ("logits", "loss"):
            raise ValueError(f"from_output must be 'logits' or 'loss', not {from_output!r}")
        self.causal_lm, self.ignore_index, self.from_output = causal_lm, ignore_index, from_output
        self.unit = "token" if causal_lm else "example"
        self.kind = "Hugging Face dict batches with labels" + (", causal LM" if causal_lm else "")
        kind = "causal-LM token cross-entropy (shifted by one)" if causal_lm else "cross-entropy of .logits"
        self.name = f"huggingface: {kind}, labels == {ignore_index} ignored" + (
            ", the model's own .loss" if from_output == "loss" else "")

    def _split(self, batch):
        if not isinstance(batch, Mapping):
            raise ValueError(f"the Hugging Face objective reads dict (or BatchEncoding) batches and got a "
                             f"{type(batch).__name__}: use the default objective for (inputs, targets) pairs")
        if "labels" not in batch:
            raise ValueError("the batch has no 'labels': the Hugging Face objective needs them (add labels to "
                             "each batch, e.g. labels = input_ids for a causal language model)")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch["labels"]

    def _targets(self, logits: torch.Tensor, labels: torch.Tensor):
        if self.causal_lm:
            logits, labels = logits[..., :-1, :], labels[..., 1:]
        logits = logits.reshape(-1, logits.shape[-1])
        labels = labels.reshape(-1)
        keep = labels != self.ignore_index
        return logits, labels, keep

    def _logits(self, out):
        logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
        if not torch.is_tensor(logits):
            raise ValueError(f"the model's output has no .logits tensor (got {type(out).__name__})")
        return logits

    def __call__(self, model, batch) -> BatchLoss:
        inputs, labels = self._split(batch)
        if self.from_output == "loss":
            out = model(**inputs, labels=labels)
            logits, targets, keep = self._targets(self._logits(out), labels)
            count = int(keep.sum())
            if count == 0:
                raise ValueError(f"a batch has no labelled unit (every label is {self.ignore_index})")
            mean = out.loss
        else:
            out = model(**inputs)
            logits, targets, keep = self._targets(self._logits(out), labels)
            count = int(keep.sum())
            if count == 0:
                raise ValueError(f"a batch has no labelled unit (every label is {self.ignore_index})")
            mean = F.cross_entropy(logits, targets, ignore_index=self.ignore_index, reduction="sum") / count
        hit = ((logits.argmax(-1) == targets) & keep).sum().detach()
        return BatchLoss(mean, count, hit)

    def per_unit(self, model, batch) -> torch.Tensor:
        inputs, labels = self._split(batch)
        logits, targets, keep = self._targets(self._logits(model(**inputs)), labels)
        return F.cross_entropy(logits[keep], targets[keep], reduction="none")

    def logits(self, model, batch):
        inputs, labels = self._split(batch)
        logits, targets, keep = self._targets(self._logits(model(**inputs)), labels)
        return logits[keep], targets[keep]


class FunctionObjective(Objective):
    """A user's ``fn(model, batch)`` returning ``(loss_sum, weight)`` or a 1-D tensor of per-unit losses."""

    def __init__(self, fn: Callable, unit: str = "unit"):
        self.fn, self.unit = fn, unit
        self.name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
        self.kind = "a function objective(model, batch) -> (loss_sum, weight) or per-unit losses"

    def _result(self, model, batch):
        got = self.fn(model, batch)
        where = f"objective {self.name}"
        if torch.is_tensor(got):
            if got.dim() != 1 or got.numel() == 0:
                raise ValueError(f"{where} returned a tensor of shape {tuple(got.shape)}: return (loss_sum, weight) "
                                 "with a 0-dim loss_sum, or the 1-D vector of per-unit losses")
            return got.sum(), got.numel(), got
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            raise TypeError(f"{where} returned a {type(got).__name__}: return (loss_sum, weight) or the 1-D "
                            "vector of per-unit losses")
        total, weight = got
        if not torch.is_tensor(total) or total.dim() != 0:
            shape = tuple(total.shape) if torch.is_tensor(total) else type(total).__name__
            raise ValueError(f"{where} returned a loss sum of shape {shape}: it must be a 0-dim tensor (the summed "
                             "loss over the batch's units); return the vector itself for per-unit losses")
        return total, _weight(weight, where), None

    def __call__(self, model, batch) -> BatchLoss:
        total, weight, _ = self._result(model, batch)
        return BatchLoss(total / weight, weight)

    def per_unit(self, model, batch) -> torch.Tensor | None:
        return self._result(model, batch)[2]


def pair_objective(loss_fn: LossFn | None = None) -> Objective:
    """The default objective: ``(inputs, targets)`` pairs and ``loss_fn(model(inputs), targets)``.

        loss_sum = |b| * loss_fn(model(x_b), y_b),    weight = |b| (rows)

    Args:
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch MEAN; None for cross-entropy of logits.

    Returns:
        An :class:`Objective` with unit "example"; per-unit losses for cross-entropy (one call) or any
        ``loss_fn`` (a loop over rows), logits for margins when the model returns ``(batch, classes)``.
    """
    return PairObjective(loss_fn)


def tuple_objective(index: int = 0, loss_fn: LossFn | None = None) -> Objective:
    """``(inputs, targets)`` pairs for a model returning a tuple (or list): ``output[index]`` are the logits.

    Args:
        index: which element of the model's output is passed to ``loss_fn``.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch MEAN; None for cross-entropy of logits.

    Returns:
        An :class:`Objective` with unit "example", as :func:`pair_objective` on ``model(x)[index]``.
    """
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"index must be an int, not {type(index).__name__}")

    def pick(out):
        if not isinstance(out, (tuple, list)):
            raise ValueError(f"tuple_objective: the model returned a {type(out).__name__}, not a tuple")
        return out[index]

    return PairObjective(loss_fn, output=pick, output_name=f" of output[{index}]")


def huggingface_objective(causal_lm: bool = False, ignore_index: int = -100, from_output: str = "logits"
                          ) -> Objective:
    """A Hugging Face model on dict or ``BatchEncoding`` batches with ``labels``.

        loss_sum = sum over labelled units u of CE(logits_u, labels_u),    weight = #{u : labels_u != ignore_index}

    Units are examples (sequence classification: logits ``(batch, classes)``), or tokens (token classification,
    and ``causal_lm=True``, where logits at position t are scored against the label at t + 1, as the models'
    own loss does). The model is called as ``model(**inputs)`` without ``labels`` (so it computes no loss of its
    own), except with ``from_output="loss"``.

    Args:
        causal_lm: shift logits and labels by one token (a causal language model); unit "token".
        ignore_index: the label value of units left out (padding, prompts), as ``torch.nn.CrossEntropyLoss``.
        from_output: ``"logits"`` (default) computes the summed cross-entropy from ``.logits``; ``"loss"``
            passes ``labels`` to the model and takes its mean ``.loss`` times the counted units.

    Returns:
        An :class:`Objective` with per-unit losses and logits (for margins).
    """
    return HuggingFaceObjective(causal_lm, ignore_index, from_output)


READY = {"cross-entropy": lambda: pair_objective(), "huggingface": lambda: huggingface_objective(),
         "huggingface-causal-lm": lambda: huggingface_objective(causal_lm=True),
         "tuple": lambda: tuple_objective()}


def as_objective(objective=None, loss_fn: LossFn | None = None) -> Objective:
    """The :class:`Objective` a measure reads: ``objective`` (an Objective, a ready name from ``READY``, or a
    callable ``fn(model, batch)``), or :func:`pair_objective` of ``loss_fn`` when it is None."""
    if objective is None:
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, not {type(loss_fn).__name__}")
        return PairObjective(loss_fn)
    if loss_fn is not None:
        raise ValueError("pass loss_fn or objective, not both (an objective says how the loss is computed)")
    if isinstance(objective, Objective):
        return objective
    if isinstance(objective, str):
        if objective not in READY:
            raise ValueError(f"objective {objective!r}: not a ready objective; ready: {', '.join(READY)}")
        return READY[objective]()
    if callable(objective):
        return FunctionObjective(objective)
    raise TypeError(f"objective must be an Objective, a ready name ({', '.join(READY)}) or a callable "
                    f"objective(model, batch) -> (loss_sum, weight), not {type(objective).__name__}")


class Bound:
    """``module`` called with ``params`` substituted (:func:`torch.func.functional_call`); every other attribute
    is the module's. What an objective receives as ``model`` inside a measure."""

    def __init__(self, module, params: dict):
        self.__dict__["_module"], self.__dict__["_params"] = module, params

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self._module, self._params, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


class _AttentionCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


ATTENTION_NOTE = ("scaled_dot_product_attention on its math backend (the fused kernels have no double-backward or "
                  "forward-mode derivative)")


@contextlib.contextmanager
def second_order() -> Iterator[_AttentionCounter]:
    """For graphs that are differentiated twice (HVPs): ``scaled_dot_product_attention`` restricted to its math
    backend, which is twice differentiable; yields a counter whose ``calls`` says whether any was made."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    counter = _AttentionCounter()
    with sdpa_kernel([SDPBackend.MATH]), counter:
        yield counter
