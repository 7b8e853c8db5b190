"""The curvkern command line: info, score (resume, same numbers as the Python API), report, and
its errors (one line, exit status 2, no traceback)."""

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from curvkern import CurvatureTracker, IndexedDataset, score_checkpoints
from curvkern.cli import main
from curvkern.report import MAX_POINTS, MAX_ROWS, ReportScores, build_report, load_scores

N, CLASSES = 40, 3

MODEL_SOURCE = textwrap.dedent(
    """
    from torch import nn


    def make_model():
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))


    def wider():
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 9), nn.Tanh(), nn.Linear(9, 3))
    """
)


def _model(width=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(16, width), nn.Tanh(), nn.Linear(width, 3))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A user's folder: model module, digits-like data (1x4x4 images), three checkpoints."""
    monkeypatch.chdir(tmp_path)
    # The command line puts the working directory on sys.path and imports the user's module:
    # both are undone after each test, so that every test imports its own folder's module.
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("user_models", "broken_models"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    (tmp_path / "user_models.py").write_text(MODEL_SOURCE)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(N, 1, 4, 4, generator=gen)
    y = torch.randint(0, CLASSES, (N,), generator=gen)
    np.savez(tmp_path / "data.npz", x=x.numpy(), y=y.numpy())
    (tmp_path / "ckpt").mkdir()
    for epoch in (1, 2, 3):
        torch.manual_seed(epoch)
        torch.save(_model().state_dict(), tmp_path / "ckpt" / f"epoch_{epoch:02d}.pt")
    return tmp_path


def _score(*extra, out="scores.npz"):
    return main(
        [
            "score",
            "--model",
            "user_models:make_model",
            "--checkpoints",
            "ckpt/epoch_*.pt",
            "--data",
            "data.npz",
            "--out",
            out,
            "--n-probes",
            "3",
            "--batch-size",
            "16",
            "--device",
            "cpu",
            *extra,
        ]
    )


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^curvkern \d+\.\d+", out, re.M)
    assert "torch " in out and "compiled kernels:" in out and "devices: cpu" in out


def test_score_matches_the_python_api_and_resumes(workdir, capsys):
    assert _score() == 0
    out = capsys.readouterr().out
    assert "scoring 3 checkpoints x 40 samples" in out
    saved = CurvatureTracker.load("scores.npz")
    assert saved.epochs == [1, 2, 3]
    curvature = saved.history

    # The same numbers as score_checkpoints called from Python with the same settings.
    data = torch.utils.data.TensorDataset(
        torch.from_numpy(np.load("data.npz")["x"]), torch.from_numpy(np.load("data.npz")["y"])
    )
    # The CLI's batch size (16): in float32 a pass of another size may take another BLAS
    # kernel, whose rounding, divided by h, moves a score by ~1e-4 relative; batch invariance
    # itself is tested in float64 (test_scorer.py).
    loader = torch.utils.data.DataLoader(IndexedDataset(data), batch_size=16)
    files = {e: f"ckpt/epoch_{e:02d}.pt" for e in (1, 2, 3)}
    tracker = score_checkpoints(_model(), files, loader, n_probes=3, progress=False)
    torch.testing.assert_close(curvature, tracker.history)

    # A new checkpoint: only it is scored; the others are said to be skipped and kept as they were.
    torch.manual_seed(4)
    torch.save(_model().state_dict(), "ckpt/epoch_04.pt")
    assert _score() == 0
    out = capsys.readouterr().out
    assert "3 of 4 checkpoints already scored in scores.npz (epochs 1-3): not scored again" in out
    assert "scoring 1 checkpoints" in out
    saved = CurvatureTracker.load("scores.npz")
    assert saved.epochs == [1, 2, 3, 4]
    torch.testing.assert_close(saved.history[:3], curvature, rtol=0, atol=0)

    assert _score() == 0
    assert "nothing to score" in capsys.readouterr().out


def test_model_given_as_a_file_path(workdir, capsys):
    code = main(
        ["score", "--model", "user_models.py:make_model", "--checkpoints", "ckpt/epoch_01.pt"]
        + ["--data", "data.npz", "--out", "s.npz", "--n-probes", "2", "--device", "cpu"]
    )
    assert code == 0, capsys.readouterr().err
    assert CurvatureTracker.load("s.npz").epochs == [1]


def _write(path, text):
    Path(path).write_text(text)


# (arguments or a setup, a phrase the one-line message must contain)
ERRORS = {
    "missing --model": (
        ["score", "--checkpoints", "c", "--data", "d", "--out", "o"],
        "the following arguments are required: --model",
    ),
    "no colon in --model": (["--model", "user_models"], "--model must be MODULE:FACTORY"),
    "module not found": (["--model", "nosuch_module:f"], "cannot import 'nosuch_module'"),
    "module raises on import": (["--model", "broken_models:f"], "importing 'broken_models' failed"),
    "no such factory": (["--model", "user_models:nope"], "has no attribute 'nope'"),
    "factory raises": (["--model", "broken_factory.py:f"], "calling broken_factory.py:f() failed"),
    "no checkpoint": (["--checkpoints", "ckpt/none_*.pt"], "matches no file"),
    "no number in a name": (["--checkpoints", "ckpt/final.pt"], "has no number in its name"),
    "checkpoint of another model": (
        ["--checkpoints", "ckpt/wider_07.pt"],
        "does not fit the model from user_models:make_model: size mismatch for 1.weight",
    ),
    "not a checkpoint": (["--checkpoints", "ckpt/garbage_09.pt"], "garbage_09.pt does not fit"),
    # (the other mistakes in DATA, load_data's own: tests/test_data.py)
    "no data file": (["--data", "missing.npz"], "missing.npz does not exist"),
    "data the model cannot take": (["--data", "wide.npz"], "cannot take x of shape (5,)"),
    "labels past the model's classes": (["--data", "many_labels.npz"], "labels up to 7"),
    "zero probes": (["--n-probes", "0"], "--n-probes must be at least 1, got 0"),
    "negative h": (["--h", "-1"], "--h must be a positive finite number, got -1.0"),
    # argparse reads "-1e-3" as an option, not a value: the CLI attaches it to --h first
    "negative h in scientific notation": (
        ["--h", "-1e-3"],
        "--h must be a positive finite number, got -0.001",
    ),
    "infinite h": (["--h", "inf"], "--h must be a positive finite number, got inf"),
    "h below x's resolution": (["--h", "1e-12"], "--h: h = 1e-12 is below the floating-point"),
    "NaN in the data": (["--data", "nan.npz"], "--data: x in nan.npz has non-finite values"),
    "truncated data file": (["--data", "cut.npz"], "cut.npz (1,000 bytes) is not a complete"),
    "negative workers": (["--workers", "-1"], "--workers must be at least 0"),
    "factory calls sys.exit": (
        ["--model", "odd_models:exits"],
        "calling odd_models:exits() called sys.exit(3) instead of returning an nn.Module",
    ),
    "module calls sys.exit": (
        ["--model", "exiting_models:f"],
        "importing 'exiting_models' called sys.exit('no GPU here')",
    ),
    "output without class scores": (
        ["--model", "odd_models:as_dict"],
        "--model: the model from odd_models:as_dict returned a dict, and the command line "
        "scores the cross entropy of (N, C) class scores",
    ),
    "unknown method": (["--method", "exact"], "argument --method: invalid choice: 'exact'"),
    "unknown device": (["--device", "tpu"], "--device: cannot use 'tpu'"),
    "out written with other settings": (["--out", "other.npz"], "written by a scorer with other"),
    "out is not a tracker file": (
        ["--out", "data.npz"],
        "--out: data.npz is not a curvkern tracker file",
    ),
    "report: no tracker file": (
        ["report", "nothing.npz", "--data", "data.npz", "--out", "r.html"],
        "tracker file nothing.npz does not exist",
    ),
    "report: other data": (
        ["report", "other.npz", "--data", "wide.npz", "--out", "r.html"],
        "wide.npz has 10 samples but other.npz scored 40",
    ),
    "report: K = 0": (
        ["report", "other.npz", "--data", "data.npz", "--out", "r.html", "--top", "0"],
        "--top must be at least 1",
    ),
}


ODD_MODELS = textwrap.dedent(
    """
    import sys

    from torch import nn


    class WithAux(nn.Sequential):
        def forward(self, x):
            logits = super().forward(x)
            return logits, logits.sum()


    class AsDict(nn.Sequential):
        def forward(self, x):
            return {"scores": super().forward(x)}


    def with_aux():
        return WithAux(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))


    def as_dict():
        return AsDict(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))


    def exits():
        sys.exit(3)
    """
)


def _error_setup(workdir):
    _write("odd_models.py", ODD_MODELS)
    _write("exiting_models.py", "import sys\nsys.exit('no GPU here')\n")
    for name in ("odd_models", "exiting_models"):
        sys.modules.pop(name, None)
    x = np.random.default_rng(0).random((N, 1, 4, 4), dtype=np.float32)
    x[5, 0, 1, 2] = np.nan
    np.savez("nan.npz", x=x, y=np.zeros(N, np.int64))
    Path("cut.npz").write_bytes(Path("data.npz").read_bytes()[:1000])
    _write("broken_models.py", "raise RuntimeError('boom')\n")
    _write("broken_factory.py", "def f():\n    raise ValueError('no weights here')\n")
    torch.save(_model().state_dict(), "ckpt/final.pt")
    torch.save(_model(9).state_dict(), "ckpt/wider_07.pt")
    _write("ckpt/garbage_09.pt", "not a checkpoint")
    np.savez("wide.npz", x=np.zeros((10, 5), np.float32), y=np.zeros(10, np.int64))
    np.savez("many_labels.npz", x=np.zeros((8, 16), np.float32), y=np.arange(8))


NEEDS_SCORES = {"out written with other settings", "report: other data", "report: K = 0"}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_with_status_2(workdir, capsys, case):
    _error_setup(workdir)
    if case in NEEDS_SCORES:
        assert _score("--h", "0.01", out="other.npz") == 0
    capsys.readouterr()
    args, phrase = ERRORS[case]
    if args[0] in ("score", "report"):
        code = main(args)
    else:  # a valid score command with one argument replaced
        base = {"--model": "user_models:make_model", "--checkpoints": "ckpt/epoch_*.pt"}
        base |= {"--data": "data.npz", "--out": "scores.npz", "--device": "cpu"}
        flags = dict(zip(args[::2], args[1::2], strict=True))
        code = main(["score", *(t for kv in (base | flags).items() for t in kv)])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("curvkern: error: "), captured.err
    assert phrase in lines[0], lines[0]


def test_a_model_returning_logits_and_more_is_scored_on_its_logits(workdir, capsys):
    _error_setup(workdir)
    assert _score(out="plain.npz") == 0
    assert _score("--model", "odd_models:with_aux", out="aux.npz") == 0, capsys.readouterr().err
    plain, aux = CurvatureTracker.load("plain.npz"), CurvatureTracker.load("aux.npz")
    torch.testing.assert_close(aux.history, plain.history, rtol=0, atol=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_is_named(tmp_path, monkeypatch, capsys, workers):
    Image = pytest.importorskip("PIL.Image")
    pytest.importorskip("torchvision")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    sys.modules.pop("user_models", None)
    _write("user_models.py", "from torch import nn\n\ndef rgb():\n    return nn.Sequential("
           "nn.Flatten(), nn.Linear(48, 3))\n")  # fmt: skip
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(48, 3)).state_dict(), "epoch_1.pt")
    pixels = np.random.default_rng(0).integers(0, 255, (4, 4, 3), dtype=np.uint8)
    for c in ("cat", "dog"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(pixels).save(tmp_path / "images" / c / f"{i}.png")
    _write("images/dog/2.png", "not a picture")  # the last: after the fit check's samples
    code = main(
        ["score", "--model", "user_models:rgb", "--checkpoints", "epoch_*.pt", "--data", "images"]
        + ["--out", "s.npz", "--device", "cpu", "--batch-size", "2", "--workers", str(workers)]
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "--data: cannot read the image images/dog/2.png (UnidentifiedImageError" in lines[0]


def test_errors_from_the_console_entry_point(workdir):
    """As a real process: status 2 and one line on stderr, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "curvkern.cli", "score", "--model", "nosuch:f"]
        + ["--checkpoints", "ckpt/*.pt", "--data", "data.npz", "--out", "o.npz"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "cannot import 'nosuch'" in result.stderr


def test_report_is_self_contained(workdir, capsys):
    assert _score() == 0
    assert (
        main(["report", "scores.npz", "--data", "data.npz", "--out", "r.html", "--top", "4"]) == 0
    )
    assert "wrote r.html" in capsys.readouterr().out
    page = Path("r.html").read_text()
    # Nothing fetched when the page is opened: no external resource of any kind.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "<script src" not in page and "@import" not in page and "url(http" not in page
    # K pictures per class (every class here has more than K samples), as PNG data URIs.
    labels = np.load("data.npz")["y"]
    assert page.count('<figure id="s') == 4 * CLASSES
    assert page.count('src="data:image/png;base64,') == 4 * CLASSES
    assert "@@PAGE_SIZE@@" not in page and "{{" not in page
    for section in ("top-samples", "distribution", "baselines", "table"):
        assert f'id="{section}"' in page
    assert "mean loss" in page and "Spearman" in page
    # The highest-scored sample of each class is pictured, with its rank.
    scores = load_scores("scores.npz")
    for c in range(CLASSES):
        members = np.flatnonzero(labels == c)
        best = int(members[np.argmax(scores.curvature[members])])
        assert f'<figure id="s{best}">' in page


def _big_scores(n, classes, seed=0):
    rng = np.random.default_rng(seed)
    curvature = rng.lognormal(1.0, 1.0, n)
    baselines = {"loss_mean": curvature * rng.lognormal(-2, 0.5, n)}
    baselines["grad_norm_mean"] = rng.lognormal(0, 1, n)
    baselines["forgetting"] = np.where(rng.random(n) < 0.05, np.inf, rng.integers(0, 4, n))
    scores = ReportScores("big.npz", n, list(range(5)), curvature, curvature / 10, baselines)
    return scores, rng.integers(0, classes, n)


def test_report_size_stays_small_for_100k_samples(tmp_path):
    """100,000 samples of 28x28 grey: the page is capped (K pictures per class, MAX_ROWS rows,
    MAX_POINTS points per plot), so its size hardly grows with N."""
    from curvkern.data import Data

    n = 100_000
    scores, labels = _big_scores(n, 10)
    images = np.random.default_rng(1).random((n, 28, 28), dtype=np.float32)
    data = Data(None, labels, [f"class {c}" for c in range(10)], "big", images=images)
    size = build_report(scores, data, tmp_path / "big.html", top=12)
    page = (tmp_path / "big.html").read_text()
    assert size < 2_500_000, size
    assert page.count('<figure id="s') == 120
    rows = re.search(r'"rows":(\[.*?\]\]),"tableRows"', page).group(1)
    assert rows.count("],[") + 1 == MAX_ROWS
    assert f"the {MAX_ROWS:,} highest-scored of {n:,} samples" in page
    assert f"{MAX_POINTS:,} points" in page
    assert "samples never learned (infinite) left out" in page


@pytest.mark.skipif(shutil.which("curvkern") is None, reason="the package is not pip-installed")
def test_console_script():
    """`pip install` puts the console script on PATH (pyproject's [project.scripts])."""
    result = subprocess.run(["curvkern", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("curvkern ")
