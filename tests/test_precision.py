"""The scorer's precision setting: "fp32" (IEEE float32), and for hvp "tf32" and "bf16"."""

import math

import pytest
import torch
from torch import nn

from curvkern import CurvatureScorer, CurvatureTracker
from curvkern._model_state import float32_precision, reduced_precision_passes
from curvkern.text import TokenScorer

from .conftest import N, indexed_loader, labelled_batch, smooth_classifier

BACKENDS = torch.backends


@pytest.mark.parametrize("method", ["fd", "zo"])
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_differencing_methods_refuse_reduced_precision(method, precision):
    with pytest.raises(ValueError, match=rf"precision='{precision}' is for method='hvp' only"):
        CurvatureScorer(smooth_classifier(), method=method, precision=precision)


@pytest.mark.parametrize("method", ["fd", "hvp", "zo"])
@pytest.mark.parametrize("precision", ["fp16", "float32", None, 32])
def test_unknown_precision_refused(method, precision):
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'tf32', 'bf16'\)"):
        CurvatureScorer(smooth_classifier(), method=method, precision=precision)


class _Embedded(nn.Module):
    """A token model in the Hugging Face convention: get_input_embeddings and inputs_embeds."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.head = smooth_classifier(sample_shape=(3, 6), dtype=torch.float32)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, inputs_embeds, attention_mask=None):
        return self.head(inputs_embeds)


def test_token_scorer_passes_precision():
    scorer = TokenScorer(_Embedded(), method="hvp", precision="bf16")
    assert scorer.precision == "bf16" == scorer.scorer.precision
    assert "precision='bf16'" in repr(scorer)
    with pytest.raises(ValueError, match="is for method='hvp' only"):
        TokenScorer(_Embedded(), method="fd", precision="bf16")


def _knobs():
    return (
        BACKENDS.cuda.matmul.fp32_precision,
        BACKENDS.cudnn.conv.fp32_precision,
        BACKENDS.mkldnn.matmul.fp32_precision,
        BACKENDS.mkldnn.conv.fp32_precision,
    )


def test_tf32_context_sets_and_restores_cuda_flags():
    before = _knobs()
    with float32_precision("cuda", "tf32"):
        assert BACKENDS.cuda.matmul.fp32_precision == "tf32"
        assert BACKENDS.cudnn.conv.fp32_precision == "tf32"
    assert _knobs() == before
    for precision in ("fp32", "bf16"):
        with float32_precision("cuda", precision):
            assert BACKENDS.cuda.matmul.fp32_precision == "ieee"
            assert BACKENDS.cudnn.conv.fp32_precision == "ieee"
        assert _knobs() == before
    with pytest.raises(KeyError), float32_precision("cuda", "tf32"):
        raise KeyError("restored on errors too")
    assert _knobs() == before


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_hvp_passes_see_their_precision_and_leave_the_flags(precision):
    # The CPU has no TF32: "tf32" is IEEE float32 there, as "fp32" is, whatever the caller set.
    model = smooth_classifier(dtype=torch.float32)
    seen = set()

    def recording(x):
        seen.add((BACKENDS.mkldnn.matmul.fp32_precision, torch.is_autocast_enabled("cpu")))
        return model(x)

    x, y = labelled_batch(4, dtype=torch.float32)
    before = _knobs()
    BACKENDS.mkldnn.matmul.fp32_precision = "tf32"
    try:
        CurvatureScorer(recording, method="hvp", n_probes=2, precision=precision).score(x, y)
        assert BACKENDS.mkldnn.matmul.fp32_precision == "tf32"
    finally:
        BACKENDS.mkldnn.matmul.fp32_precision = before[2]
    assert _knobs() == before
    # bf16: the probe passes under autocast; the pass at x and the model check in float32.
    expected = {("ieee", False)} | ({("ieee", True)} if precision == "bf16" else set())
    assert seen == expected


def test_fp32_unchanged():
    model = smooth_classifier(dtype=torch.float32)
    x, y = labelled_batch(16, dtype=torch.float32)
    default = CurvatureScorer(model, method="hvp", n_probes=4).score(x, y)
    for precision in ("fp32", "tf32"):  # on the CPU tf32 is IEEE float32 too
        again = CurvatureScorer(model, method="hvp", n_probes=4, precision=precision).score(x, y)
        for field, value in default.to_dict().items():
            torch.testing.assert_close(
                getattr(again, field), value, rtol=0, atol=0, equal_nan=True, msg=field
            )


def test_bf16_hvp_close_to_fp32():
    # Bound on H r's relative error in bf16, for this model (3 Linear layers, 2 tanh): bf16 keeps
    # 8 significant bits, so each rounding is at most u = 2^-8 relative. Under autocast every
    # Linear rounds its input, its weight and its output (9 roundings on the forward) and each
    # tanh its output (2); the first backward rounds each Linear's incoming gradient and product
    # (6) and each tanh derivative's two products (4); the double backward runs the same ops
    # once more (21). R = 42 roundings, so per element at most R u (errors aligned, first order)
    # and typically sqrt(R) u (independent roundings add like a random walk). A curvature is a
    # mean of norms ||H r_k||, and | ||a|| - ||b|| | <= ||a - b||: the same bounds per sample.
    # Measured: max 2.2%, median 0.45% (bounds 16% and 2.5%).
    u, rounds = 2.0**-8, 42
    model = smooth_classifier(dtype=torch.float32)
    x, y = labelled_batch(64, dtype=torch.float32)
    exact = CurvatureScorer(model, method="hvp", n_probes=8).score(x, y)
    low = CurvatureScorer(model, method="hvp", n_probes=8, precision="bf16").score(x, y)
    assert low.curvature.dtype == torch.float32
    rel = ((low.curvature - exact.curvature) / exact.curvature).abs()
    assert float(rel.max()) <= rounds * u
    assert float(rel.median()) <= math.sqrt(rounds) * u
    assert float(rel.max()) > 0  # bf16 rounding did happen: the passes ran in bf16
    # The pass at x stays float32: loss, gradient and classification fields are exact.
    for field in ("loss", "grad_norm", "margin", "p_label"):
        torch.testing.assert_close(getattr(low, field), getattr(exact, field), rtol=0, atol=0)


def test_bf16_context_is_autocast_only_for_bf16():
    with reduced_precision_passes("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    for precision in ("fp32", "tf32"):
        with reduced_precision_passes("cpu", precision):
            assert not torch.is_autocast_enabled("cpu")


def test_tracker_refuses_mixing_precisions(data, tmp_path):
    path = tmp_path / "t.npz"
    scorer = CurvatureScorer(smooth_classifier(dtype=torch.float64), method="hvp", n_probes=2)
    CurvatureTracker(scorer, N, path).score_epoch(indexed_loader(data), 0, progress=False)
    fast = CurvatureScorer(smooth_classifier(), method="hvp", n_probes=2, precision="bf16")
    with pytest.raises(ValueError, match="precision: file 'fp32', scorer 'bf16'"):
        CurvatureTracker(fast, N, path)


def test_precision_accuracy_script_quick(tmp_path):
    # The accuracy table's script, at its smoke size: it trains and scores every model it can
    # and reports what the table shows.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("sklearn")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "benchmarks.precision_accuracy", "--quick", "--json", str(out)],
        cwd=root,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    rows = {r["model"]: r for r in json.loads(out.read_text())}
    assert {"digits CNN 1x8x8, ReLU", "digits CNN 1x8x8, GELU"} <= set(rows)
    for r in rows.values():
        # On the CPU "tf32" is IEEE float32: the same scores bit for bit.
        assert r["tf32_equals_fp32_on_cpu"], r["model"]
        # bf16 ran (its rounding shows) and measured the same quantity: a rank correlation with
        # fp32 hvp far from chance (a bf16 path computing something else would be near 0).
        assert 0 < r["rel_err_bf16_median"] <= r["rel_err_bf16_p90"], r["model"]
        assert r["spearman_bf16_vs_hvp_fp32"] > 0.5, r["model"]
        for key in ("spearman_bf16_vs_fd_fp32", "spearman_hvp_fp32_vs_fd_fp32"):
            assert -1 <= r[key] <= 1, (r["model"], key)


def test_fd_agrees_with_hvp_where_nothing_has_a_kink():
    # benchmarks.precision_accuracy --kinks at its smoke size: the same GELU CNN with average
    # pooling (smooth) and max pooling (a kink wherever a window's maximum changes hands). With
    # no kink, float64 fd converges to hvp (O(h)): the rankings agree at every h. With max
    # pooling, fd's steps cross kinks that hvp, the Hessian at x, does not see.
    pytest.importorskip("sklearn")
    from benchmarks.precision_accuracy import KINK_STEPS, kinks

    rows = {r["pooling"]: r for r in kinks(quick=True)}
    for h in KINK_STEPS:
        assert rows["average"][f"float64 h={h:g}"] > 0.999, (h, rows["average"])
    assert rows["max"]["float64 h=0.001"] < 0.99, rows["max"]
