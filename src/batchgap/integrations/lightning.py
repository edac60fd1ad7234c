"""``GeometryCallback``: a Lightning ``Callback`` that measures the module every N optimizer steps via
:func:`batchgap.track` (``pip install batchgap[lightning]``).

    trainer = lightning.Trainer(..., callbacks=[GeometryCallback((x_val, y_val), every=50, out="track.jsonl")])

The LightningModule itself is the model the measures call (``module(inputs)``, so its ``forward`` must give
what the objective reads: logits for the default). Measured on global rank 0 only, after the optimizer step
(``on_train_batch_end`` when ``trainer.global_step`` reaches a multiple of ``every``; once per step under
gradient accumulation); training is left bit for bit as it was.
"""
from __future__ import annotations

from ..landscape import ranks
from ..track.sinks import need
from ..track.tracker import track

_lightning = need("lightning", "lightning", "batchgap.integrations.lightning")


class GeometryCallback(_lightning.Callback):
    """Measure the LightningModule every ``every`` optimizer steps on ``data``.

    Args:
        data: the measurement data (any form :func:`batchgap.track` takes).
        every: measure when ``trainer.global_step`` is a multiple of this.
        **track_options: the other arguments of :func:`batchgap.track` (``measures``, ``objective``,
            ``loss_fn``, ``budget``, ``out``, ``sinks``, ``subset``, ``seed``, ``options``, ``label``, ...).

    After fitting, ``callback.records`` holds the records.
    """

    def __init__(self, data, every: int = 100, **track_options):
        super().__init__()
        self.data, self.every, self.track_options = data, every, track_options
        self.tracker = None
        self.records: list[dict] = []
        self._last = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            with ranks.alone():
                self.tracker = track(pl_module, self.data, every=self.every, **self.track_options)
            self.records = self.tracker.records

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.tracker is not None and step != self._last:
            self._last = step
            with ranks.alone():  # rank 0 measures by itself while the other ranks train on
                self.tracker.maybe_measure(step)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
