"""Geometry of a trained model, each quantity on an explicit evaluation protocol."""
from .curves import CurveResult, SurfaceResult, loss_curve, loss_surface
from .directions import Direction, filter_normalized_direction
from .evaluate import BN_MODES, Metrics, batches, evaluate, recompute_bn_statistics
from .interpolation import InterpolationResult, PathCurve, interpolate
from .params import distance, preserved, restore, snapshot

__all__ = [
    "BN_MODES", "Metrics", "batches", "evaluate", "recompute_bn_statistics",
    "distance", "preserved", "restore", "snapshot",
    "InterpolationResult", "PathCurve", "interpolate",
    "CurveResult", "SurfaceResult", "loss_curve", "loss_surface",
    "Direction", "filter_normalized_direction",
]
