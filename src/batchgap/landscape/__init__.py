"""Geometry of a trained model, each quantity on an explicit evaluation protocol."""
from .adaptive import AdaptiveSharpnessResult, adaptive_sharpness
from .density import DensityResult, density_and_trace, hessian_density
from .flatness import (
    AverageSharpnessResult, PacBayesResult, WorstCaseFlatnessResult, average_sharpness, pac_bayes_flatness,
    worst_case_flatness,
)
from .curves import CurveResult, SurfaceResult, loss_curve, loss_surface
from .directions import Direction, filter_normalized_direction
from .evaluate import BN_MODES, Metrics, batches, evaluate, recompute_bn_statistics
from .hessian import EigenResult, hessian_eigenvalues
from .trace import TraceResult, hessian_trace
from .interpolation import InterpolationResult, PathCurve, interpolate
from .objective import BatchLoss, Objective, huggingface_objective, pair_objective, tuple_objective
from .noise import NoiseScaleResult, exact_gradient_noise_scale, gradient_noise_scale
from .norms import NormResult, norm_measures
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
    "DensityResult", "density_and_trace", "hessian_density", "NormResult", "norm_measures",
    "AverageSharpnessResult", "PacBayesResult", "WorstCaseFlatnessResult", "average_sharpness", "pac_bayes_flatness",
    "worst_case_flatness", "BatchLoss", "Objective", "huggingface_objective", "pair_objective", "tuple_objective",
]
