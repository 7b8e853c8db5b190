"""The examples on real data, shortened (--quick, scikit-learn's digits): they run, write their
pictures and CSV files, find what they are meant to find, and fail helpfully without data.

Each quick run is deterministic (fixed seeds; the same numbers with 1 and 2 threads). The
thresholds below sit well under what the quick runs give with seed 0, the one tested, and well
over chance (AUROC 0.5, correlation 0), with the measured range over seeds 0-4 in comments.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import EXAMPLES, csv_rows

pytest.importorskip("sklearn", reason="the examples load scikit-learn's digits")
pytest.importorskip("matplotlib", reason="the examples draw pictures")

ROOT = Path(__file__).resolve().parent.parent


BASELINES = ("loss_mean", "grad_norm_mean", "aum", "confidence", "variability", "forgetting")


def test_find_mislabeled(examples, tmp_path):
    aurocs = examples("find_mislabeled").main(["--quick", "--seeds", "2", "--out", str(tmp_path)])
    for name in ("digits_top_curvature.png", "digits_roc.png", "digits_scores.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = csv_rows(tmp_path / "digits_scores.csv")
    assert len(rows) == 500  # the quick run's subset
    assert sum(int(r["flipped"]) for r in rows) == 50
    assert {"given_label", "true_label", "curvature_mean", *BASELINES, "el2n"} <= rows[0].keys()
    seeds = csv_rows(tmp_path / "digits_seeds.csv")  # every score of seeds 0 and 1
    assert {r["seed"] for r in seeds} == {"0", "1"} and len(seeds) == 2 * len(aurocs)
    # 500 digits, 50 labels flipped, 15 epochs: seed 0 gives 0.953 (seeds 0-4: 0.945-0.962)
    # for the epoch-averaged curvature, 0.998 for the mean loss and for AUM (low first).
    assert aurocs["curvature_mean"] > 0.85
    assert aurocs["loss_mean"] > 0.9 and aurocs["aum"] > 0.9


def test_noise_sweep(examples, tmp_path):
    means = examples("noise_sweep").main(
        ["--quick", "--rates", "0.1", "0.3", "--seeds", "2", "--out", str(tmp_path)]
    )
    assert (tmp_path / "digits_noise_sweep.png").stat().st_size > 0
    rows = csv_rows(tmp_path / "digits_noise_sweep.csv")
    assert {(r["rate"], r["seed"]) for r in rows} == {(a, b) for a in ("0.1", "0.3") for b in "01"}
    # Seeds 0 and 1 of the quick run give curvature 0.951 and 0.870, mean loss 0.998 and 0.995
    # at 10% and 30%: the mean loss stays ahead, and both stay far above chance.
    assert min(means["curvature_mean"]) > 0.75 and min(means["loss_mean"]) > 0.9


def test_conflicting_duplicates(examples, tmp_path):
    aurocs = examples("conflicting_duplicates").main(["--quick", "--out", str(tmp_path)])
    for name in ("digits_pairs.png", "digits_found.png", "digits_scores.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = csv_rows(tmp_path / "digits_scores.csv")
    roles = [r["role"] for r in rows]
    assert len(rows) == 515 and roles.count("original") == roles.count("copy") == 15
    # 15 pairs among 515 images, 25 epochs: seed 0 gives 0.947 (seeds 0-4: 0.947-0.990) for the
    # epoch-averaged curvature, 0.995 for the final loss.
    assert aurocs["curvature_mean"] > 0.85
    assert aurocs["loss_final"] > 0.9


def test_memorization_validation(examples, tmp_path, capsys):
    example = examples("memorization_validation")
    stats = example.main(["--quick", "--out", str(tmp_path)])
    for name in ("digits_scatter.png", "digits_top_memorized.png", "digits_scores.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert len(list(tmp_path.glob("digits_fz_*.npz"))) == 1
    # mem from 16 networks on 300 digits: seed 0 gives cosine 0.747, Spearman 0.570 (seeds 0-4:
    # 0.63-0.76 and 0.47-0.57) for the epoch-averaged curvature.
    cosine, rho = stats["curvature_mean"]
    assert cosine > 0.55 and rho > 0.35
    # A rerun takes the networks' results from the cache, and gives the same numbers.
    capsys.readouterr()
    np.testing.assert_equal(example.main(["--quick", "--out", str(tmp_path)]), stats)  # NaN: NaN
    assert "cached in" in capsys.readouterr().out


def test_adaptive_probes(examples):
    # --quick: 300 digits, 5 epochs, a reference of 20 probes; seed 0 measured: fd Spearman
    # against the reference 0.786, 0.887, 0.908 for 5, 10, 20 probes; adaptive probing spent
    # 26.5, 81.5, 156.3 probes per sample at rtol 0.2, 0.1, 0.05; the float32 zo warning
    # flagged 239 of 300 samples at h = 1e-3 and none at 1e-2.
    rows = examples("adaptive_probes").main(["--quick"])
    for n in (5, 10, 20):
        assert rows[f"fd, n = {n}"]["probes"] == n
    assert rows["fd, n = 5"]["spearman"] < rows["fd, n = 20"]["spearman"]
    assert rows["fd, n = 20"]["spearman"] > 0.8
    adaptive = [rows[f"fd, adaptive rtol = {r}"]["probes"] for r in (0.2, 0.1, 0.05)]
    # a stricter rtol stops each sample later on the same probe sequence
    assert 5 <= adaptive[0] <= adaptive[1] <= adaptive[2] <= 200
    assert rows["zo, n = 10, h = 1e-3"]["zo_flagged"] > 100
    assert rows["zo, n = 10, h = 1e-2"]["zo_flagged"] < rows["zo, n = 10, h = 1e-3"]["zo_flagged"]


def test_batched_networks_train_independently(examples):
    """Each network of the batched model trains as it would alone: the same subset, weights
    and predictions whether or not other networks share the batch."""
    example = examples("memorization_validation")
    data = examples("data").load_digits().subset(200)
    recipe = examples("models").Recipe(
        hidden=32, epochs=3, lr=3e-3, batch_size=64, decay=0.2, subset=None
    )
    alone = example.train_on_subsets(data.x, data.y, 10, 140, recipe, [7])
    together = example.train_on_subsets(data.x, data.y, 10, 140, recipe, [7, 8, 9])
    assert torch.equal(alone[0][0], together[0][0])  # the same subset
    assert torch.equal(alone[1][0], together[1][0])  # the same predictions
    assert not torch.equal(together[0][0], together[0][1])  # other seeds, other subsets


def test_batched_mlp_matches_its_networks(examples):
    models = examples("models")
    generators = [torch.Generator().manual_seed(s) for s in range(3)]
    model = models.BatchedMLP(20, 5, 16, generators)
    x = torch.randn(3, 7, 20)
    with torch.no_grad():
        batched = model(x)
        for k in range(3):
            torch.testing.assert_close(batched[k], model.network(k)(x[k]))
            # membership_inference scores the networks in float64
            torch.testing.assert_close(
                model.network(k).double()(x[k].double()), batched[k].double(), rtol=1e-5, atol=1e-6
            )


def test_batched_mlp_one_generator_draws_as_one_stacked_draw(examples):
    # membership_inference initializes its K networks from one generator (K entries of it):
    # the weights of layer l must be the (K, in, out) draw it made before the class was shared.
    models = examples("models")
    gen = torch.Generator().manual_seed(4)
    model = models.BatchedMLP(5, 4, 7, [gen] * 3)
    gen = torch.Generator().manual_seed(4)
    for fan_in, fan_out, w, b in zip(
        (5, 7, 7), (7, 7, 4), model.weights, model.biases, strict=True
    ):
        bound = 1 / fan_in**0.5
        assert torch.equal(
            w, torch.empty(3, fan_in, fan_out).uniform_(-bound, bound, generator=gen)
        )
        assert torch.equal(b, torch.empty(3, 1, fan_out).uniform_(-bound, bound, generator=gen))


@pytest.mark.parametrize(
    "name", ["find_mislabeled", "conflicting_duplicates", "memorization_validation"]
)
def test_missing_data_set_says_what_to_install(examples, tmp_path, capsys, name):
    argv = ["--dataset", "fashion-mnist", "--data-root", str(tmp_path), "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        examples(name).main(argv)
    assert exit_info.value.code == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_missing_data_set_exits_without_traceback(tmp_path):
    # The child imports curvkern as this process does, installed or built in place.
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [
            sys.executable, str(EXAMPLES / "find_mislabeled.py"), "--dataset", "fashion-mnist",
            "--data-root", str(tmp_path), "--out", str(tmp_path / "out"),
        ],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": pythonpath},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "--download" in result.stderr and "dataset-fashion-mnist" in result.stderr


def test_curvature_by_layer(examples, tmp_path):
    # Both digits settings always; the canaries where transformers and the fortunes are here.
    fortunes = examples("fortunes").FORTUNE_DIR
    canaries = os.path.isfile(os.path.join(fortunes, "computers"))
    try:
        import transformers  # noqa: F401
    except ImportError:
        canaries = False
    settings = ["digits-mlp", "digits-cnn", *(["canaries"] if canaries else [])]
    aurocs = examples("curvature_by_layer").main(
        ["--quick", "--settings", *settings, "--out", str(tmp_path)]
    )
    assert (tmp_path / "curvature_by_layer.png").stat().st_size > 0
    rows = csv_rows(tmp_path / "seeds.csv")
    assert {r["setting"] for r in rows} == set(settings) and {r["seed"] for r in rows} == {"0"}
    mlp = {layer: v[0] for (_, layer), v in aurocs["digits-mlp"].items()}
    assert list(mlp) == ["input", "hidden 1", "hidden 2", "logits", "loss, mean"]
    cnn = {layer for _, layer in aurocs["digits-cnn"]}
    assert cnn == {"input", "conv 1", "conv 2", "hidden", "logits", "loss, mean"}
    # 500 digits, 50 labels flipped, 15 epochs, scored 5 times: seed 0 gives 0.823, 0.840, 0.863,
    # 0.823 at the input, after each hidden layer and at the logits (seeds 0-2: 0.82-0.91), and
    # 0.998 for the mean loss (seeds 0-2: 0.994-0.998). The quick CNN (300 digits, 6 epochs)
    # has memorized 0-3% of its flipped labels (seeds 0-2): its curvature is near chance, its
    # run is checked for form only.
    assert min(mlp[layer] for layer in ("input", "hidden 1", "hidden 2", "logits")) > 0.7
    assert mlp["loss, mean"] > 0.9
    if canaries:
        layers = {layer for _, layer in aurocs["canaries"]}
        assert layers == {"embeddings", "block 0", "block 1", "logits", "loss, mean"}
        assert {rep for rep, _ in aurocs["canaries"]} == {1, 4, 16}
        # Canaries inserted 16 times are told from held-out ones by their mean loss (seed 0:
        # 1.000): the quick GPT-2 has learned them.
        assert aurocs["canaries"][(16, "loss, mean")][0] > 0.8
