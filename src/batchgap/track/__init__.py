"""batchgap.track: geometry measured from inside the user's own training loop.

``tracker = batchgap.track(model, data, every=N, measures=[...], out="track.jsonl")``, then ``tracker.step()``
once per training step. Records (one JSON line per measurement, each measure with its protocol) go to the JSONL
file (:mod:`batchgap.tracklog`) and to sinks (TensorBoard, Weights & Biases). Imports ``landscape/`` and the
results-level :mod:`batchgap.tracklog`, never the study machinery (study, plan, config, train).
"""
from .sinks import MissingExtra, TensorBoardSink, WandbSink
from .tracker import Tracker, track

__all__ = ["MissingExtra", "TensorBoardSink", "Tracker", "WandbSink", "track"]
