"""``GeometryCallback``: a ``transformers.TrainerCallback`` that measures the model every N optimizer steps via
:func:`batchgap.track` (``pip install batchgap[huggingface]``).

    trainer = transformers.Trainer(model, args, train_dataset=...,
                                   callbacks=[GeometryCallback(batches, every=50, out="track.jsonl",
                                                               objective=batchgap.huggingface_objective(causal_lm=True))])

``data`` is the measurement data, typically a list of dict batches (``input_ids``, ``attention_mask``,
``labels``) or a DataLoader; the default objective is :func:`batchgap.huggingface_objective` (the model's
``labels`` and ``.logits``; pass ``causal_lm=True`` for a language model). Measured in ``on_step_end`` (after
the optimizer step) on the main process only; training is left bit for bit as it was.
"""
from __future__ import annotations

from ..landscape import ranks
from ..landscape.objective import huggingface_objective
from ..track.sinks import need
from ..track.tracker import track

_transformers = need("transformers", "huggingface", "batchgap.integrations.huggingface")


class GeometryCallback(_transformers.TrainerCallback):
    """Measure the Trainer's model every ``every`` optimizer steps on ``data``.

    Args:
        data: the measurement data: dict batches with ``labels`` (a list, a DataLoader or a dataset of dicts).
        every: measure when ``state.global_step`` is a multiple of this.
        objective: how a batch becomes a loss; None for ``batchgap.huggingface_objective()``.
        **track_options: the other arguments of :func:`batchgap.track` (``measures``, ``budget``, ``out``,
            ``sinks``, ``subset``, ``seed``, ``options``, ``label``, ...).

    After training, ``callback.records`` holds the records.
    """

    def __init__(self, data, every: int = 100, objective=None, **track_options):
        self.data, self.every, self.track_options = data, every, track_options
        self.objective = huggingface_objective() if objective is None else objective
        self.tracker = None
        self.records: list[dict] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            with ranks.alone():  # the main process measures by itself while the others train on
                self.tracker = track(model, self.data, objective=self.objective, every=self.every,
                                     **self.track_options)
            self.records = self.tracker.records

    def on_step_end(self, args, state, control, **kwargs):
        if self.tracker is not None:
            with ranks.alone():
                self.tracker.maybe_measure(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
