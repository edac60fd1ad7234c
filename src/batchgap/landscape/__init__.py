"""Geometry of a trained model, each quantity on an explicit evaluation protocol."""
from .adaptive import AdaptiveSharpnessResult, adaptive_sharpness
from .curves import CurveResult, SurfaceResult, loss_curve, loss_surface
from .directions import Direction, filter_normalized_direction
from .evaluate import BN_MODES, Metrics, batches, evaluate, recompute_bn_statistics
from .hessian import EigenResult, TraceResult, hessian_eigenvalues, hessian_trace
from .interpolation import InterpolationResult, PathCurve, interpolate
from .noise import NoiseScaleResult, exact_gradient_noise_scale, gradient_noise_scale
from .params import distance, preserved, restore, snapshot
from .sharpness import SharpnessResult, eps_sharpness

__all__ = [
    "BN_MODES", "Metrics", "batches", "evaluate", "recompute_bn_statistics",
    "distance", "preserved", "restore", "snapshot",
    "InterpolationResult", "PathCurve", "interpolate",
    "CurveResult", "SurfaceResult", "loss_curve", "loss_surface",
    "Direction", "filter_normalized_direction",
    "EigenResult", "TraceResult", "hessian_eigenvalues", "hessian_trace",
    "SharpnessResult", "eps_sharpness", "AdaptiveSharpnessResult", "adaptive_sharpness",
    "NoiseScaleResult", "gradient_noise_scale", "exact_gradient_noise_scale",
]
