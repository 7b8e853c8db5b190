"""curvkern: find what a neural network memorized, by the curvature of its loss around samples.

Quick use::

    from curvkern import CurvatureScorer
    scores = CurvatureScorer(model).score(x, y, ids)   # per-sample CurvatureScores
"""

from . import ops, reference, torch_ops
from ._extension import has_cuda_kernels, has_kernels, kernels_available
from .scorer import CurvatureScorer
from .scores import CurvatureScores

__version__ = "0.1.0"

__all__ = [
    "CurvatureScorer",
    "CurvatureScores",
    "has_cuda_kernels",
    "has_kernels",
    "kernels_available",
    "ops",
    "reference",
    "torch_ops",
]
