"""Callbacks that track curvature inside training frameworks (optional extras).

``curvkern.integrations.lightning.CurvatureCallback`` needs ``lightning`` (pip install
"curvkern[lightning]"); ``curvkern.integrations.huggingface.CurvatureCallback`` needs
``transformers`` (pip install "curvkern[text]"). Neither is imported by ``import curvkern``.
"""
