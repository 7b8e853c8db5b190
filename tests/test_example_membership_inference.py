"""examples/membership_inference.py, shortened (--quick: 8 shadow + 2 target MLPs on 300 digits).

The quick run is deterministic (fixed seeds). Its attacks see 150 members and 150 non-members
per target, so an AUROC has a standard error of about 0.03 per target; the thresholds below sit
about two of those under what seed 0 gives and above chance (0.5), which a sign error in a
likelihood ratio (members ranked last) would fall far below.
"""

import importlib
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn", reason="the example loads scikit-learn's digits")
pytest.importorskip("matplotlib", reason="the example draws a ROC picture")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def example():
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield importlib.import_module("membership_inference")
    finally:
        sys.path.remove(str(EXAMPLES))


def test_quick_run(example, tmp_path):
    results = example.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "digits_roc.png").stat().st_size > 0
    table = (tmp_path / "digits_results.md").read_text()
    assert table.count("\n| ") == 8  # header + 7 attacks (the separator row starts with "|-")
    assert set(results) == {
        "curvature LR (online)",
        "curvature NLL (Curvature Clues)",
        "curvature, offline (one-sided)",
        "LiRA (online, logit confidence)",
        "LiRA, offline (one-sided)",
        "curvature threshold (no shadow models)",
        "loss threshold (Yeom et al.)",
    }
    for row in results.values():
        assert row["TPR at 0.1% FPR"] <= row["TPR at 1.0% FPR"] <= 1
        assert 0.5 <= row["balanced accuracy"] <= 1
    # seed 0: curvature LR 0.607, curvature NLL 0.639, LiRA online 0.635, loss 0.595
    for name in ("curvature LR (online)", "curvature NLL (Curvature Clues)",
                 "LiRA (online, logit confidence)", "loss threshold (Yeom et al.)"):  # fmt: skip
        assert results[name]["AUROC"] > 0.55, name


def test_shadow_halves_are_balanced(example):
    keep = example.halves(10, shadow=6, targets=3, seed=0)
    assert keep.shape == (9, 10) and keep.dtype == torch.bool
    assert (keep.sum(1) == 5).all()  # every network trains on half the images
    assert (keep[:6].sum(0) == 3).all()  # every image is in exactly half the shadow networks
    assert (keep[0] == ~keep[1]).all()


def test_batched_networks_match_their_extracted_copies(example):
    gen = torch.Generator().manual_seed(0)
    batched = example.BatchedMLP(3, (5, 7, 7, 4), gen)
    x = torch.randn(3, 11, 5)
    with torch.no_grad():
        out = batched(x)
        for k in range(3):
            single = batched.network(k)(x[k].double())
            torch.testing.assert_close(single, out[k].double(), rtol=1e-5, atol=1e-6)
