"""Scale out: `torchrun -m curvkern score` on two gloo processes (every DATA format, resume after
a rank is killed, one rank's error ending both), score_dataset and the Lightning and Hugging
Face callbacks under torchrun, the table formats in, and the tracker's table out (to_pandas,
`curvkern export`).

The torchrun runs share one module-scoped setup and are few: each start costs seconds.
"""

import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from curvkern import CurvatureTracker
from curvkern.cli import main

pytest.importorskip("datasets")
pytest.importorskip("pandas")
pytest.importorskip("torchvision")

ROOT = Path(__file__).resolve().parent.parent
N = 41  # odd, and not a multiple of the batch size: the last batch is short
BATCH = 4  # 11 batches: rank 0 scores 6, rank 1 scores 5
EPOCHS = (1, 2, 3)
IMAGES = 15  # 3 classes x 5 pictures of 3x8x8

MODELS = textwrap.dedent(
    """
    import os
    import signal

    import torch
    from torch import nn


    class Net(nn.Module):
        # `marker` is the checkpoint's epoch: a test makes one rank fail at epoch 2.
        def __init__(self, body):
            super().__init__()
            self.body = body
            self.register_buffer("marker", torch.zeros(()))

        def forward(self, x):
            stop = os.environ.get("STOP_RANK")
            if int(self.marker) == 2 and stop is not None and os.environ.get("RANK") == stop:
                if os.environ.get("STOP_HOW") == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError("this rank cannot take the batch")
            return self.body(x)


    def make_model():
        body = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
        return Net(body).double()


    def make_image_model():
        return Net(nn.Sequential(nn.Flatten(), nn.Linear(192, 8), nn.Tanh(), nn.Linear(8, 3)))
    """
)


def _checkpoints(folder: Path, factory, seed: int) -> None:
    folder.mkdir()
    for epoch in EPOCHS:
        torch.manual_seed(seed + epoch)
        model = factory()
        model.marker.fill_(epoch)
        torch.save(model.state_dict(), folder / f"epoch_{epoch:02d}.pt")


def _write_data(root: Path) -> None:
    import datasets
    from PIL import Image

    (root / "user_models.py").write_text(MODELS)
    namespace = {}
    exec(MODELS, namespace)
    _checkpoints(root / "ckpt", namespace["make_model"], 0)
    _checkpoints(root / "ckpt_img", namespace["make_image_model"], 10)
    gen = np.random.default_rng(0)
    x = gen.random((N, 1, 4, 4))  # float64, the model's dtype
    y = gen.integers(0, 3, N)
    np.savez(root / "data.npz", x=x, y=y)
    # Parquet as pandas writes it: a list column of float64 (scored as the model's float64)
    import pandas

    frame = pandas.DataFrame({"x": list(x.reshape(N, 16)), "label": y})
    (root / "parquet").mkdir()
    frame.iloc[:20].to_parquet(root / "parquet" / "part-0.parquet")
    frame.iloc[20:].to_parquet(root / "parquet" / "part-1.parquet")
    # An image folder, and the same pictures as a `datasets` folder (Image and ClassLabel)
    pictures, labels = [], []
    for i in range(IMAGES):
        label = i % 3
        folder = root / "images" / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = gen.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        mode = "L" if i == 4 else "RGB"  # a grey picture: decoded to RGB as ImageFolder does
        image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
        image.save(folder / f"{i:02d}.png")
        pictures.append(str(folder / f"{i:02d}.png"))
        labels.append(label)
    order = np.argsort([Path(p).parent.name + Path(p).name for p in pictures], kind="stable")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=["class_0", "class_1", "class_2"]),
        }
    )
    table = datasets.Dataset.from_dict(
        {"image": [pictures[i] for i in order], "label": [labels[i] for i in order]},
        features=features,
    )
    table.save_to_disk(str(root / "hf_images"))


def _score_args(data, out, *extra, model="user_models:make_model", ckpt="ckpt"):
    return [
        "score",
        "--model",
        model,
        "--checkpoints",
        f"{ckpt}/epoch_*.pt",
        "--data",
        str(data),
        "--out",
        str(out),
        "--n-probes",
        "3",
        "--batch-size",
        str(BATCH),
        "--device",
        "cpu",
        *extra,
    ]


DATA = {  # name: (DATA, model, checkpoints)
    "npz": ("data.npz", "user_models:make_model", "ckpt"),
    "parquet": ("parquet", "user_models:make_model", "ckpt"),
    "images": ("images", "user_models:make_image_model", "ckpt_img"),
    "hf_images": ("hf_images", "user_models:make_image_model", "ckpt_img"),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The user's folder, and the single-process scores of every DATA (one thread, as each
    torchrun process has)."""
    root = tmp_path_factory.mktemp("scale_out")
    old_cwd, old_path, threads = os.getcwd(), list(sys.path), torch.get_num_threads()
    os.chdir(root)
    sys.modules.pop("user_models", None)
    torch.set_num_threads(1)
    try:
        _write_data(root)
        for name, (data, model, ckpt) in DATA.items():
            assert main(_score_args(data, f"single_{name}.npz", model=model, ckpt=ckpt)) == 0
    finally:
        os.chdir(old_cwd)
        sys.path[:] = old_path
        sys.modules.pop("user_models", None)
        torch.set_num_threads(threads)
    return root


def _torchrun(root, *args, env=None, timeout=120):
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(root)]),
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    return subprocess.run(
        [*command, *args],
        cwd=root,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# A DistributedSampler's batches hold other ids than a single process's: a float64 gradient's
# summation order changes it by a few eps relative, and the finite difference amplifies that
# by |grad| / (h |Hv|), about 1/h here (h = 1e-3); 1000 eps / h leaves room for "a few" and for
# that ratio. (Measured: 1.3e-13.)
REORDERED = {"rtol": 1e3 * torch.finfo(torch.float64).eps / 1e-3, "atol": 0.0}


def _assert_same_scores(path, reference):
    """Same batches in one pass as the single process, one thread each: the same arithmetic,
    so the same numbers, bit for bit."""
    got, want = CurvatureTracker.load(path), CurvatureTracker.load(reference)
    assert got.epochs == want.epochs == list(EPOCHS)
    for field in ("curvature", "trace", "frobenius_sq", "loss", "grad_norm"):
        torch.testing.assert_close(
            got.field_history(field), want.field_history(field), rtol=0, atol=0
        )


def test_torchrun_npz_resumes_after_a_rank_is_killed(setup):
    root = setup
    args = ["-m", "curvkern", *_score_args("data.npz", "dist.npz")]
    killed = _torchrun(root, *args, env={"STOP_RANK": "1", "STOP_HOW": "kill"})
    assert killed.returncode != 0, killed.stderr[-2000:]
    assert "SIGKILL" in killed.stderr
    # Only complete epochs were written: epoch 1, not the one the rank died in.
    assert CurvatureTracker.load(root / "dist.npz").epochs == [1]
    resumed = _torchrun(root, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 of 3 checkpoints already scored" in resumed.stdout
    assert resumed.stdout.count("scoring 2 checkpoints") == 1  # rank 0 speaks, once
    assert "2 processes" in resumed.stdout
    _assert_same_scores(root / "dist.npz", root / "single_npz.npz")


def test_torchrun_error_on_one_rank_ends_both_with_one_line(setup):
    root = setup
    args = ["-m", "curvkern", *_score_args("data.npz", "failed.npz")]
    run = _torchrun(root, *args, env={"STOP_RANK": "1", "STOP_HOW": "raise"}, timeout=120)
    lines = [line for line in run.stderr.splitlines() if line.startswith("curvkern: error:")]
    assert lines == ["curvkern: error: rank 1: RuntimeError: this rank cannot take the batch"], (
        run.stderr[-3000:]
    )
    assert "Traceback" not in run.stderr.split("curvkern: error:")[0]
    # Both ranks exit with status 2 (torchrun reports the failed ranks with their status).
    statuses = re.findall(r"exitcode\s*:\s*(-?\d+)", run.stderr)
    assert statuses and set(statuses) == {"2"}, run.stderr[-3000:]
    assert CurvatureTracker.load(root / "failed.npz").epochs == [1]


DRIVER = textwrap.dedent(
    """
    # Under torchrun: one process group for every run of this script, as a user's script has.
    import sys

    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler

    from curvkern import CurvatureScorer, IndexedDataset, score_dataset
    from curvkern.cli import main
    from curvkern.data import load_data

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for name, data, model, ckpt in [row.split(",") for row in sys.argv[1:]]:
        status = main([
            "score", "--model", model, "--checkpoints", f"{ckpt}/epoch_*.pt", "--data", data,
            "--out", f"dist_{name}.npz", "--n-probes", "3", "--batch-size", "4",
            "--device", "cpu",
        ])
        assert status == 0, (name, status)

    # score_dataset through a DistributedSampler (padded with a duplicate: 41 is odd)
    import user_models

    model = user_models.make_model()
    model.load_state_dict(torch.load("ckpt/epoch_03.pt"))
    data = IndexedDataset(load_data("data.npz").dataset)
    loader = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, shuffle=False))
    scores = score_dataset(CurvatureScorer(model, n_probes=3), loader, progress=False)
    if rank == 0:
        torch.save(scores.to_dict(), "dist_score_dataset.pt")

    # the Lightning callback, with Lightning's DDP strategy on the same process group
    import lightning
    from curvkern.integrations.lightning import CurvatureCallback

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = user_models.make_model()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, index):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    module = Module()
    train = load_data("data.npz").dataset
    callback = CurvatureCallback(train, batch_size=4, path="dist_lightning.npz", n_probes=3)
    trainer = lightning.Trainer(
        max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", callbacks=[callback],
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(train, batch_size=8))
    # every rank scores the whole set here (a collective): duplicates of one id are harmless
    final = score_dataset(
        CurvatureScorer(module.net, n_probes=3), DataLoader(IndexedDataset(train), batch_size=4),
        progress=False,
    )
    if rank == 0:
        torch.save({"tracked": callback.tracker.history[-1], "final": final.curvature,
                    "epochs": callback.tracker.epochs}, "dist_lightning.pt")

    # the Hugging Face callback in a Trainer, which takes torchrun's process group as it is
    import transformers
    from curvkern.integrations.huggingface import CurvatureCallback as HFCallback
    from curvkern.integrations.huggingface import collate
    from curvkern.text import TokenScorer

    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(config).double()
    g = torch.Generator().manual_seed(0)
    items = [
        {"input_ids": torch.randint(1, 40, (4 + i % 5,), generator=g).tolist(), "labels": i % 2}
        for i in range(13)
    ]

    def pad(batch):
        length = max(len(i["input_ids"]) for i in batch)
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        for b, item in enumerate(batch):
            ids[b, : len(item["input_ids"])] = torch.as_tensor(item["input_ids"])
            mask[b, : len(item["input_ids"])] = 1
        labels = torch.as_tensor([i["labels"] for i in batch])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    hf_callback = HFCallback(items, batch_size=5, n_probes=3, path="dist_hf.npz")
    arguments = transformers.TrainingArguments(
        output_dir="hf_out", num_train_epochs=2, per_device_train_batch_size=4,
        learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=0,
    )
    transformers.Trainer(
        model=bert, args=arguments, train_dataset=items, data_collator=pad,
        callbacks=[hf_callback],
    ).train()
    x, y, ids, inputs = collate([(item, 0, i) for i, item in enumerate(items)])
    direct = TokenScorer(bert, n_probes=3).score(x, y, ids, **inputs)
    if rank == 0:
        torch.save({"tracked": hf_callback.tracker.history[-1], "final": direct.curvature,
                    "epochs": hf_callback.tracker.epochs}, "dist_hf.pt")
    dist.destroy_process_group()
    """
)


def test_torchrun_every_data_format_score_dataset_and_callbacks(setup):
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    root = setup
    (root / "driver.py").write_text(DRIVER)
    runs = [",".join((name, *DATA[name])) for name in ("parquet", "images", "hf_images")]
    run = _torchrun(root, "driver.py", *runs, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    for name in ("parquet", "images", "hf_images"):
        _assert_same_scores(root / f"dist_{name}.npz", root / f"single_{name}.npz")
    # The single-process runs of the same inputs in other formats agree too.
    npz, parquet = (CurvatureTracker.load(root / f"single_{n}.npz") for n in ("npz", "parquet"))
    torch.testing.assert_close(parquet.history, npz.history, rtol=0, atol=0)
    images, hf = (CurvatureTracker.load(root / f"single_{n}.npz") for n in ("images", "hf_images"))
    torch.testing.assert_close(hf.history, images.history, rtol=0, atol=0)
    # score_dataset: every id once, as the last epoch of the single-process run
    scores = torch.load(root / "dist_score_dataset.pt")
    single = CurvatureTracker.load(root / "single_npz.npz")
    assert scores["curvature"].shape == (N,)
    torch.testing.assert_close(scores["curvature"], single.history[-1], **REORDERED)
    # Lightning: the last tracked epoch is the final model's scores
    tracked = torch.load(root / "dist_lightning.pt")
    assert tracked["epochs"] == [0, 1]
    torch.testing.assert_close(tracked["tracked"], tracked["final"], **REORDERED)
    # Hugging Face: the same
    tracked = torch.load(root / "dist_hf.pt")
    assert tracked["epochs"] == [0, 1]
    torch.testing.assert_close(tracked["tracked"], tracked["final"], **REORDERED)


# -- results out: to_pandas, `curvkern export` --------------------------------------------------


def _tracker_with_gaps(path):
    """Three epochs of a small tracker, one sample never scored, one scored in two epochs."""
    from curvkern import CurvatureScorer, IndexedDataset, score_dataset

    from .conftest import labelled_batch, smooth_classifier

    model = smooth_classifier()
    data = IndexedDataset(torch.utils.data.TensorDataset(*labelled_batch(7, seed=1)))
    tracker = CurvatureTracker(CurvatureScorer(model, n_probes=2), 7, path)
    for epoch, ids in ((0, range(6)), (1, range(6)), (2, range(5))):
        subset = torch.utils.data.Subset(data.dataset, list(ids))
        loader = torch.utils.data.DataLoader(IndexedDataset(subset), batch_size=4)
        with warnings.catch_warnings():  # the gaps are the point here
            warnings.filterwarnings("ignore", "epoch .* ids without a curvature", UserWarning)
            tracker.record(epoch, score_dataset(tracker.scorer, loader, 7, progress=False))
    return tracker


def test_to_pandas_one_row_per_id(tmp_path):
    from curvkern.scores import SCORE_FIELDS

    tracker = _tracker_with_gaps(tmp_path / "t.npz")
    frame = tracker.to_pandas()
    baselines = tracker.baselines()
    # el2n is a field and a baseline (its mean): one column
    columns = ["id", *dict.fromkeys([*SCORE_FIELDS, *baselines]), "epochs_scored"]
    assert list(frame.columns) == columns
    assert frame["id"].tolist() == list(range(7))
    assert frame["epochs_scored"].tolist() == [3, 3, 3, 3, 3, 2, 0]
    for field in SCORE_FIELDS:
        np.testing.assert_array_equal(frame[field].to_numpy(), tracker.field_mean(field).numpy())
    for name, value in baselines.items():
        np.testing.assert_array_equal(frame[name].to_numpy(), value.numpy())
    assert np.isnan(frame["curvature"].iloc[6])
    # the history's mean of a sample scored in two epochs
    assert frame["curvature"].iloc[5] == pytest.approx(
        float(tracker.history[:2, 5].double().mean()), rel=1e-6
    )


def test_export_parquet_and_csv(tmp_path, capsys):
    import pandas

    tracker = _tracker_with_gaps(tmp_path / "t.npz")
    want = tracker.to_pandas()
    assert main(["export", str(tmp_path / "t.npz"), "--out", str(tmp_path / "s.parquet")]) == 0
    assert "7 samples" in capsys.readouterr().out
    pandas.testing.assert_frame_equal(pandas.read_parquet(tmp_path / "s.parquet"), want)
    assert main(["export", str(tmp_path / "t.npz"), "--out", str(tmp_path / "s.csv")]) == 0
    pandas.testing.assert_frame_equal(
        pandas.read_csv(tmp_path / "s.csv"), want, check_dtype=False, rtol=1e-15
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["t.npz", "--out", "s.xlsx"], "--out: the format comes from the extension"),
        (["missing.npz", "--out", "s.csv"], "PATH: tracker file missing.npz does not exist"),
        (["data.txt", "--out", "s.csv"], "PATH: data.txt is not a curvkern tracker file"),
    ],
)
def test_export_errors_are_one_line(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    _tracker_with_gaps(tmp_path / "t.npz")
    (tmp_path / "data.txt").write_text("not a tracker")
    assert main(["export", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"curvkern: error: {expected}") and err.count("\n") == 1, err
