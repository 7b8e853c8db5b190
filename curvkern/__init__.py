"""curvkern: find what a neural network memorized, by the curvature of its loss around samples.

Quick use::

    from curvkern import CurvatureScorer
    scores = CurvatureScorer(model).score(x, y, ids)   # per-sample CurvatureScores
"""

from . import losses, metrics, ops, privacy, reference, text, torch_ops
from ._extension import has_cuda_kernels, has_kernels, kernels_available
from ._pass_memory import empty_cpu_cache
from .checkpoints import score_checkpoints
from .dataset import IndexedDataset, score_dataset
from .diagnostics import SampleWarning
from .io import TrackerConflictError, merge_trackers
from .scorer import CurvatureScorer
from .scores import CurvatureScores
from .tracker import CurvatureTracker

__version__ = "0.1.0"

__all__ = [
    "CurvatureScorer",
    "CurvatureScores",
    "CurvatureTracker",
    "TrackerConflictError",
    "merge_trackers",
    "IndexedDataset",
    "SampleWarning",
    "score_checkpoints",
    "score_dataset",
    "losses",
    "metrics",
    "privacy",
    "text",
    "has_cuda_kernels",
    "has_kernels",
    "kernels_available",
    "empty_cpu_cache",
    "ops",
    "reference",
    "torch_ops",
]
