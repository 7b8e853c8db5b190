"""The text examples, shortened (--quick): they run, write their CSV, find what they are meant to
find, and end with exit status 2 and the install command when the fortunes are missing.

Each quick run is deterministic (fixed seeds, one torch thread). Thresholds sit under what seed 0
gives (in the comments) and over chance (AUROC 0.5).
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import EXAMPLES, csv_rows

pytest.importorskip("transformers", reason="the text examples build transformers models")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(EXAMPLES))
FORTUNE_DIR = importlib.import_module("fortunes").FORTUNE_DIR
sys.path.remove(str(EXAMPLES))
needs_fortunes = pytest.mark.skipif(
    not os.path.isfile(os.path.join(FORTUNE_DIR, "computers")),
    reason="Debian's fortunes package is not installed (sudo apt-get install fortunes)",
)


@needs_fortunes
def test_canary_exposure(examples, tmp_path):
    result = examples("canary_exposure").main(["--quick", "--seeds", "2", "--out", str(tmp_path)])
    rows = csv_rows(tmp_path / "scores.csv")
    # 3 canaries per repetition count, 9 held out, 60 ordinary texts
    assert len(rows) == 9 + 9 + 60
    assert sorted({int(r["role"]) for r in rows}) == [-1, 0, 1, 4, 16]
    seeds = csv_rows(tmp_path / "seeds.csv")
    assert len(seeds) == 2 * 8 * 3 and {r["seed"] for r in seeds} == {"0", "1"}
    name = "curvature on the secret, mean over epochs"
    found = result["found"][name]
    per_seed = [
        float(r["auroc_found"]) for r in seeds if (r["score"], r["repeats"]) == (name, "16")
    ]
    assert abs(found[16] - sum(per_seed) / 2) < 1e-6  # the mean over seeds (CSV: 6 digits)
    members = result["members"]
    # Seeds 0 and 1: canaries repeated 16 times are told from held-out ones by their loss and
    # Min-K% probability (AUROC 1.000 for both in both seeds).
    assert members["loss, final (low = memorized)"][16] > 0.8
    assert members["Min-K% probability, k = 20%"][16] > 0.8
    # Curvature on the secret, averaged over epochs, flags every canary above ordinary text
    # (AUROC 0.994 to 1.000 over 1, 4, 16 repetitions, mean over seeds 0 and 1).
    assert min(found.values()) > 0.8


@needs_fortunes
def test_text_classification(examples, tmp_path):
    aurocs = examples("text_classification").main(
        ["--quick", "--seeds", "2", "--out", str(tmp_path)]
    )
    rows = csv_rows(tmp_path / "scores.csv")
    assert len(rows) == 4 * 40
    assert sum(int(r["flipped"]) for r in rows) == 16
    assert {"curvature_mean", "loss_mean", "given", "category", "text"} <= rows[0].keys()
    keys = {"curvature_mean", "curvature_last", "loss_final", "loss_mean"}
    assert set(aurocs) == keys
    seeds = csv_rows(tmp_path / "seeds.csv")
    assert [r["score"] for r in seeds[:4]] == list(aurocs)
    assert {r["seed"] for r in seeds} == {"0", "1"} and len(seeds) == 8
    for key in keys:  # the returned AUROC is the mean over the seeds (the CSV has 6 digits)
        mean = sum(float(r["auroc"]) for r in seeds if r["score"] == key) / 2
        assert abs(aurocs[key] - mean) < 1e-6
    # Seeds 0 and 1: 0.740 and 0.790 for the epoch-averaged curvature (0.692 and 0.664 for the
    # mean loss); 16 flipped labels give an AUROC a standard error of about 0.07.
    assert aurocs["curvature_mean"] > 0.6


def test_embedding_step(examples):
    errors = examples("embedding_step").main(["--quick"])  # h / std = 1e-3 and 1
    for label, (small, large) in errors.items():
        # Measured (2 probes): 1.9e-4 / 3.3e-4 (BERT, float64 / float32) and 4.5e-5 / 4.1e-5
        # (GPT-2) at h / std = 1e-3; 0.18 and 0.14 at h / std = 1: the O(h) term, about 1000
        # times larger for a 1000 times larger step.
        assert small < 1e-3, label
        assert large > 10 * small, label


@pytest.mark.parametrize("script", ["canary_exposure.py", "text_classification.py"])
def test_missing_fortunes_exit_2_with_the_install_command(script, tmp_path):
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--quick", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "apt-get install fortunes" in run.stderr
    assert "Traceback" not in run.stderr
