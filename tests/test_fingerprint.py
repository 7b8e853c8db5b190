"""Files remember what made them: scores carry their loss function's name, a tracker file records
it with the model factory and a fingerprint of the data, and record(), resuming, `curvkern score`
and `curvkern report --data` refuse what does not match, naming the field."""

import functools
import json

import numpy as np
import pytest
import torch
from torch import nn

from curvkern import CurvatureScorer, CurvatureTracker, IndexedDataset, io, score_dataset
from curvkern.cli import main
from curvkern.data import Data, fingerprint, load_data
from curvkern.scores import qualified_name

from .test_cli import _score, workdir  # noqa: F401 (a fixture)

N = 10


def _abs_loss(output, y):
    return output.gather(1, y[:, None]).squeeze(1).abs()


def _data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, 4, generator=gen), torch.randint(0, 3, (N,), generator=gen)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _loader():
    x, y = _data()
    return torch.utils.data.DataLoader(
        IndexedDataset(torch.utils.data.TensorDataset(x, y)), batch_size=4
    )


def test_scores_carry_the_name_of_their_loss():
    model = _model()
    x, y = _data()
    assert CurvatureScorer(model, n_probes=2).score(x, y).loss_fn == "curvkern.losses.cross_entropy"
    scorer = CurvatureScorer(model, _abs_loss, n_probes=2)
    assert scorer.score(x, y).loss_fn == f"{__name__}._abs_loss"
    assert score_dataset(scorer, _loader(), progress=False).loss_fn == f"{__name__}._abs_loss"
    # A loss object is named with its settings, so other settings make another loss.
    assert qualified_name(nn.CrossEntropyLoss()) == (
        "torch.nn.modules.loss.CrossEntropyLoss(ignore_index=-100, label_smoothing=0.0, "
        "reduction='mean')"
    )
    weighted = qualified_name(nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0])))
    assert weighted != qualified_name(nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0])))
    assert qualified_name(functools.partial(_abs_loss, scale=2)) == f"{__name__}._abs_loss(scale=2)"


def test_record_refuses_scores_of_another_loss(tmp_path):
    tracker = CurvatureTracker(CurvatureScorer(_model(), n_probes=2), N, tmp_path / "t.npz")
    other = score_dataset(CurvatureScorer(_model(), _abs_loss, n_probes=2), _loader(), N, False)
    with pytest.raises(ValueError, match=r"loss_fn .*_abs_loss.*loss_fn curvkern.losses"):
        tracker.record(0, other)
    assert tracker.epochs == []


def test_resuming_refuses_another_loss_model_or_data(tmp_path):
    path = tmp_path / "t.npz"
    x, y = _data()
    fp = fingerprint(Data(None, y.numpy(), ["a", "b", "c"], "d.npz", images=x.numpy()))
    tracker = CurvatureTracker(
        CurvatureScorer(_model(), n_probes=2), N, path, model_factory="m:f", data_fingerprint=fp
    )
    tracker.score_epoch(_loader(), 0, progress=False)

    def reopen(loss_fn=None, model_factory="m:f", data=fp):
        scorer = CurvatureScorer(_model(), loss_fn, n_probes=2)
        return CurvatureTracker(scorer, N, path, model_factory=model_factory, data_fingerprint=data)

    with pytest.raises(ValueError, match=r"holds scores of loss_fn curvkern.losses.cross_entropy"):
        reopen(loss_fn=_abs_loss)
    with pytest.raises(ValueError, match=r"model factory m:f, this tracker has m:g"):
        reopen(model_factory="m:g")
    y2 = y.clone()
    y2[3] = (y2[3] + 1) % 3
    fp2 = fingerprint(Data(None, y2.numpy(), ["a", "b", "c"], "d.npz", images=x.numpy()))
    with pytest.raises(ValueError, match=r"the labels differ \(data.labels_sha256"):
        reopen(data=fp2)
    x2 = x.clone()
    x2[0, 1] += 1e-6
    fp3 = fingerprint(Data(None, y.numpy(), ["a", "b", "c"], "d.npz", images=x2.numpy()))
    with pytest.raises(ValueError, match=r"x \(a fixed sample of its rows\) differ"):
        reopen(data=fp3)
    # What this tracker does not know is not checked; the same everything resumes.
    assert reopen(model_factory=None, data=None).epochs == [0]
    assert reopen().epochs == [0]


def _strip_origin(path):
    """The file as an older curvkern wrote it: no origin record."""
    metadata, arrays = io.read_arrays(path)
    del metadata["origin"]
    io.write_arrays(path, metadata, arrays)


def test_older_files_load_with_a_warning_naming_what_is_not_checked(tmp_path):
    path = tmp_path / "t.npz"
    tracker = CurvatureTracker(CurvatureScorer(_model(), n_probes=2), N, path)
    tracker.score_epoch(_loader(), 0, progress=False)
    _strip_origin(path)
    scorer = CurvatureScorer(_model(), _abs_loss, n_probes=2)
    with pytest.warns(
        UserWarning, match="does not record loss_fn, model .*cannot be checked"
    ) as record:
        resumed = CurvatureTracker(scorer, N, path, model_factory="m:f")
    assert record[0].filename == __file__  # the user's line, not curvkern's
    assert resumed.epochs == [0]
    assert CurvatureTracker.load(path).epochs == [0]  # read-only: nothing to check, no warning
    # The next save records this tracker's origin, which is checked from then on.
    resumed.score_epoch(_loader(), 1, progress=False)
    assert io.read_metadata(path)["origin"]["loss_fn"] == f"{__name__}._abs_loss"


def test_fingerprint_is_cheap_and_tells_files_apart(tmp_path):
    x, y = _data()
    np.savez(tmp_path / "a.npz", x=x.numpy(), y=y.numpy())
    np.savez(tmp_path / "b.npz", x=x.numpy(), y=y.numpy())
    fp = fingerprint(load_data(tmp_path / "a.npz"))
    assert fp == fingerprint(load_data(tmp_path / "b.npz"))
    assert fp["num_samples"] == N and fp["sample_shape"] == [4] and fp["dtype"] == "float32"
    json.dumps(fp)
    np.savez(tmp_path / "c.npz", x=x.double().numpy(), y=y.numpy())
    assert fingerprint(load_data(tmp_path / "c.npz"))["dtype"] == "float64"


def test_fingerprint_of_an_image_folder(tmp_path):
    image = pytest.importorskip("PIL.Image")
    pytest.importorskip("torchvision")
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            pixels = np.full((4, 4, 3), 40 * i + (c == "dog"), dtype=np.uint8)
            image.fromarray(pixels).save(tmp_path / "imgs" / c / f"{i}.png")
    fp = fingerprint(load_data(tmp_path / "imgs"))
    assert fp["num_samples"] == 6 and fp["sample_shape"] is None
    pixels = np.full((4, 4, 3), 200, dtype=np.uint8)
    image.fromarray(pixels).save(tmp_path / "imgs" / "dog" / "2.png")
    changed = fingerprint(load_data(tmp_path / "imgs"))
    assert changed["x_sha256"] != fp["x_sha256"]
    assert changed["labels_sha256"] == fp["labels_sha256"]


# -- the command line ---------------------------------------------------------------------------


def _other_data(name, labels=False, pictures=False):
    with np.load("data.npz") as data:
        x, y = data["x"].copy(), data["y"].copy()
    if labels:
        y[5] = (y[5] + 1) % 3
    if pictures:
        x[0] = 1 - x[0]
    np.savez(name, x=x, y=y)


def test_score_refuses_other_data_or_model_into_an_existing_file(workdir, capsys):  # noqa: F811
    assert _score() == 0
    capsys.readouterr()
    _other_data("relabelled.npz", labels=True)
    assert _score("--data", "relabelled.npz") == 2
    err = capsys.readouterr().err
    assert "--out: scores.npz holds scores of other data than this tracker: the labels" in err
    _other_data("repictured.npz", pictures=True)
    assert _score("--data", "repictured.npz") == 2
    assert "x (a fixed sample of its rows) differ" in capsys.readouterr().err
    (workdir / "other_models.py").write_text((workdir / "user_models.py").read_text())
    assert _score("--model", "other_models:make_model") == 2
    err = capsys.readouterr().err
    assert "model factory user_models:make_model, this tracker has other_models:make_model" in err
    # The same data under another name is the same data.
    _other_data("copy.npz")
    assert _score("--data", "copy.npz") == 0
    # A file that does not record them: scored into, with a one-line warning.
    _strip_origin("scores.npz")
    capsys.readouterr()
    assert _score("--data", "relabelled.npz") == 0
    err = capsys.readouterr().err
    assert err == (
        "curvkern: warning: scores.npz does not record loss_fn, model, data (written by an "
        "older curvkern, or from Python without them), so they cannot be checked against this "
        "run: make sure they are the ones the file was scored with\n"
    )


def test_report_refuses_other_data_of_the_same_size(workdir, capsys):  # noqa: F811
    assert _score() == 0
    _other_data("relabelled.npz", labels=True)
    _other_data("repictured.npz", pictures=True)
    for data, field in (("relabelled.npz", "the labels"), ("repictured.npz", "x (a fixed")):
        capsys.readouterr()
        assert main(["report", "scores.npz", "--data", data, "--out", "r.html"]) == 2
        err = capsys.readouterr().err
        head = f"curvkern: error: --data: scores.npz holds scores of other data than --data {data}"
        assert err.startswith(f"{head}: {field}")
        assert err.count("\n") == 1
    # A file without the record: the report is written, with a warning that it is unchecked.
    _strip_origin("scores.npz")
    assert main(["report", "scores.npz", "--data", "relabelled.npz", "--out", "r.html"]) == 0
    assert "does not record which data it was scored on" in capsys.readouterr().err
