"""What a study measures on trained models, each number with its protocol.

Per run: full-set train and test metrics and the distance from the start point x0.
Per pair of runs of one seed (small batch, large batch): the parametric plot (paper Figure 3).
Knows nothing of studies or files: it takes models and data, returns plain dicts for results.json.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .config import MeasureConfig
from .data.base import Dataset
from .landscape import evaluate, interpolate
from .landscape.evaluate import describe_bn
from .landscape.params import distance


def data_protocol(dataset: Dataset) -> dict:
    """Which examples the measures use: the sets as the study holds them (subsets recorded in info)."""
    return {
        "dataset": dataset.name,
        "train_examples": len(dataset.train),
        "test_examples": len(dataset.test),
        "subset": dataset.info.get("subset", "none: full sets"),
    }


def endpoint_metrics(model: nn.Module, dataset: Dataset, mcfg: MeasureConfig) -> dict:
    """Loss and accuracy on the full train and test sets, batch-weighted, BN as ``mcfg.bn``."""
    out = {}
    for split in ("train", "test"):
        m = evaluate(model, getattr(dataset, split), batch_size=mcfg.eval_batch_size, bn=mcfg.bn)
        out[split] = {"loss": m.loss, "accuracy": m.accuracy, "n": m.n}
    out["protocol"] = {
        "bn": describe_bn(model, mcfg.bn, mcfg.eval_batch_size),
        "eval_batch_size": mcfg.eval_batch_size,
        "dropout": "off",
        "data": "full train and test sets",
    }
    return out


def distance_from_init(model: nn.Module, x0_state: dict) -> dict:
    """||x* - x0|| over all trainable parameters (BN affine included), and ||x0|| for scale."""
    x0_norm = float(torch.sqrt(sum((x0_state[n].double() ** 2).sum() for n, _ in model.named_parameters())))
    return {"value": distance(model, x0_state), "x0_norm": x0_norm, "parameters": "all trainable (BN affine included)"}


def parametric_plot(
    model_sb: nn.Module, model_lb: nn.Module, dataset: Dataset, mcfg: MeasureConfig, names: tuple[str, str] = ("SB", "LB")
) -> dict:
    """f(alpha x_LB + (1 - alpha) x_SB) on the full train and test sets (paper Figure 3).

    BN ``auto``: for running-statistics models the statistics at each alpha are recomputed on the
    training set and shared by the train and test curves (interpolated running statistics are not the
    statistics of any network, and extrapolated variances can turn negative); otherwise eval mode.
    """
    lo, hi = mcfg.interpolation_range
    # the grid always holds alpha = 0 and 1 (the two solutions themselves) when they are in range
    alphas = np.union1d(np.linspace(lo, hi, mcfg.interpolation_points), [a for a in (0.0, 1.0) if lo <= a <= hi])
    r = interpolate(
        model_sb, model_lb, {"train": dataset.train, "test": dataset.test}, alphas,
        path=mcfg.interpolation_path, bn=None if mcfg.interpolation_bn == "auto" else mcfg.interpolation_bn,
        batch_size=mcfg.eval_batch_size,
    )
    out = {"alphas": alphas.tolist()}
    for split in ("train", "test"):
        out[split] = {"loss": r.curves[split].loss.tolist(), "accuracy": r.curves[split].accuracy.tolist()}
    out["protocol"] = {
        "path": r.path,
        "formula": (f"alpha * x_{names[1]} + (1 - alpha) * x_{names[0]}" if r.path == "linear"
                    else f"sin(alpha pi/2) * x_{names[1]} + cos(alpha pi/2) * x_{names[0]}"),
        "points": len(alphas),
        "bn": ("statistics recomputed at each alpha on the training set" if r.bn == "recompute" else r.bn_description),
        "buffers": r.buffers,
        "eval_batch_size": r.batch_size,
        "data": "full train and test sets",
        "parameters": "all trainable parameters interpolated",
    }
    return out
