"""batchgap: the large-batch generalization gap, measured.

The names a notebook user imports::

    from batchgap import TrainConfig, evaluate, eps_sharpness, hessian_eigenvalues, ...
    from batchgap.train import train

Every measurement takes a plain ``nn.Module`` and data given as a pair of tensors ``(inputs, targets)``,
a :class:`TensorData`, a ``torch.utils.data.TensorDataset`` or other map-style dataset, or any re-iterable
of batches (a DataLoader, a list of dicts); ``objective=`` says how a batch becomes a loss (default:
``(inputs, targets)`` pairs and cross-entropy; :func:`huggingface_objective`, :func:`tuple_objective`, or
your own ``objective(model, batch) -> (loss_sum, weight)``). ``gradient_noise_scale``, which draws random
batches, takes a tensor pair or a TensorData. Each restores the model bit for bit and returns its numbers
together with their protocol. The README's API table gives each one's cost in data passes.
"""
from .version import __version__

from .config import StudyConfig, TrainConfig, load_study
from .data import Dataset, TensorData, load_dataset
from .errors import UserError
from .landscape import (
    adaptive_sharpness,
    average_sharpness,
    density_and_trace,
    distance,
    eps_sharpness,
    evaluate,
    exact_gradient_noise_scale,
    filter_normalized_direction,
    gradient_noise_scale,
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
    huggingface_objective,
    interpolate,
    loss_curve,
    loss_surface,
    norm_measures,
    Objective,
    pac_bayes_flatness,
    pair_objective,
    tuple_objective,
    worst_case_flatness,
)
from .models import build_model, init_model
from .study import run_study
from .track import track

# ``train`` (the function) is imported from ``batchgap.train``: exporting it here would hide the module
# of the same name (``import batchgap.train as m`` would give the function). ``track`` IS the function here (what
# users call, ``batchgap.track(...)``); its package's modules are imported by their full names
# (``from batchgap.track.sinks import ...``).


def write_report(out):
    """Write ``out/report.md`` and its figures from ``out/results.json`` (imports matplotlib on first use).

    Args:
        out: the output directory of a finished (or merged) study.

    Returns:
        The path of the written ``report.md``.

    Cost:
        Reading ``results.json`` and drawing the figures (seconds); no training or measurement.
    """
    from .report import write_report as _write

    return _write(out)


__all__ = [
    "Dataset", "StudyConfig", "TensorData", "TrainConfig", "UserError", "__version__",
    "adaptive_sharpness", "average_sharpness", "build_model", "density_and_trace", "distance", "eps_sharpness",
    "evaluate",
    "exact_gradient_noise_scale", "filter_normalized_direction", "gradient_noise_scale", "hessian_density",
    "hessian_eigenvalues", "hessian_trace", "init_model", "interpolate", "load_dataset", "load_study", "loss_curve",
    "loss_surface", "norm_measures", "pac_bayes_flatness", "run_study", "worst_case_flatness", "write_report",
    "Objective", "pair_objective", "tuple_objective", "huggingface_objective", "track",
]
