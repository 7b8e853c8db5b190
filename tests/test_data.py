"""DATA as the command line and the report read it (curvkern.data.load_data): its errors name
--data, say what was expected and what came, on one line."""

import pickle

import numpy as np
import pytest
import torch

from curvkern.data import Data, DataError, load_data

DATA_ERRORS = {
    "npz without y": ("no_y.npz", "missing 'y'"),
    "integer x": ("uint8.npz", "has dtype uint8"),
    "empty file": ("empty.npz", "empty.npz is empty (0 bytes); write it with numpy.savez"),
    "truncated file": ("cut.npz", "cut.npz (100 bytes) is not a complete .npz archive"),
    "a pickle": ("pickled.npz", "is a pickle, which curvkern does not load (it can run code)"),
    "an .npy": ("single.npz", "is a single .npy array, not an .npz archive of x and y"),
    "an object array": ("objects.npz", "holds an array of Python objects"),
    "NaN in x": ("nan.npz", "x in nan.npz has non-finite values (NaN or inf) in 2 samples, the"),
}


@pytest.mark.parametrize("case", list(DATA_ERRORS))
def test_data_errors_are_one_line(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    np.savez("no_y.npz", x=np.zeros((4, 16), np.float32))
    np.savez("uint8.npz", x=np.zeros((4, 16), np.uint8), y=np.zeros(4, np.int64))
    np.savez("good.npz", x=np.zeros((4, 16), np.float32), y=np.zeros(4, np.int64))
    open("empty.npz", "wb").close()
    with open("good.npz", "rb") as f, open("cut.npz", "wb") as cut:
        cut.write(f.read(100))
    with open("pickled.npz", "wb") as f:
        pickle.dump({"x": [1.0], "y": [0]}, f)
    with open("single.npz", "wb") as f:
        np.save(f, np.zeros((4, 16), np.float32))
    objects = np.empty(4, dtype=object)
    np.savez("objects.npz", x=objects, y=np.zeros(4, np.int64))
    nan = np.zeros((4, 16), np.float32)
    nan[1, 3] = nan[3, 0] = np.nan
    np.savez("nan.npz", x=nan, y=np.zeros(4, np.int64))
    source, expected = DATA_ERRORS[case]
    with pytest.raises(DataError) as error:
        load_data(source)
    message = str(error.value)
    assert message.startswith("--data: ") and "\n" not in message
    assert expected in message, message
    assert "allow_pickle" not in message


# -- a `datasets` folder and Parquet files ------------------------------------------------------


def _table_files(root):
    """The same 6 samples as an .npz, Parquet (two files), a `datasets` folder of arrays, and
    one of images; returns (x, y)."""
    datasets = pytest.importorskip("datasets")
    pandas = pytest.importorskip("pandas")
    gen = np.random.default_rng(0)
    x = gen.random((6, 2, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 1, 0, 2])
    frame = pandas.DataFrame({"pixel_values": list(x.reshape(6, 6)), "labels": y, "z": 0.5})
    (root / "pq").mkdir()
    frame.iloc[:4].to_parquet(root / "pq" / "a.parquet")
    frame.iloc[4:].to_parquet(root / "pq" / "b.parquet")
    table = datasets.Dataset.from_dict(
        {"x": list(x), "y": y, "name": ["s"] * 6},
        features=datasets.Features(
            {
                "x": datasets.Array2D((2, 3), "float32"),
                "y": datasets.ClassLabel(names=["a", "b", "c"]),
                "name": datasets.Value("string"),
            }
        ),
    )
    table.save_to_disk(str(root / "hf"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(root / "hf_dict"))
    return x, y


def test_datasets_folder_and_parquet_read_as_the_arrays(tmp_path):
    x, y = _table_files(tmp_path)
    hf = load_data(tmp_path / "hf")
    assert hf.classes == ["a", "b", "c"] and hf.labels.tolist() == y.tolist()
    for i in range(6):
        item_x, item_y = hf.dataset[i]
        assert torch.equal(item_x, torch.from_numpy(x[i])) and int(item_y) == y[i]
    for source in (tmp_path / "pq", tmp_path / "pq" / "*.parquet"):
        pq = load_data(source)  # columns by default: pixel_values, labels
        assert pq.labels.tolist() == y.tolist() and pq.classes == ["0", "1", "2"]
        assert torch.equal(
            torch.stack([pq.dataset[i][0] for i in range(6)]), torch.from_numpy(x.reshape(6, 6))
        )
    one = load_data(tmp_path / "pq" / "b.parquet", x_column="pixel_values", y_column="labels")
    assert one.labels.tolist() == y[4:].tolist()


def test_image_column_decodes_as_image_folder_does(tmp_path):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("torchvision")
    from PIL import Image

    gen = np.random.default_rng(1)
    files = []
    for i, mode in enumerate(("RGB", "L", "RGBA")):  # ImageFolder converts each to RGB
        folder = tmp_path / "folder" / f"c{i}"
        folder.mkdir(parents=True)
        pixels = gen.integers(0, 256, (5, 7, 4), dtype=np.uint8)
        image = Image.fromarray({"RGB": pixels[..., :3], "L": pixels[..., 0], "RGBA": pixels}[mode])
        image.save(folder / "p.png")
        files.append(str(folder / "p.png"))
    datasets.Dataset.from_dict(
        {"image": files, "label": [0, 1, 2]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    ).save_to_disk(str(tmp_path / "hf"))
    folder, table = load_data(tmp_path / "folder"), load_data(tmp_path / "hf")
    for i in range(3):
        assert torch.equal(table.dataset[i][0], folder.dataset[i][0])
        assert table.dataset[i][0].shape == (3, 5, 7)


def test_table_errors_are_one_line(tmp_path):
    _table_files(tmp_path)
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3), np.float32), y=np.zeros(2, np.int64))
    cases = [
        (dict(source=tmp_path / "hf", x_column="pixels"), "--x-column: ", "no column 'pixels'"),
        (dict(source=tmp_path / "pq", y_column="z"), "--y-column: ", "must hold integer class"),
        (dict(source=tmp_path / "hf", y_column="name"), "--y-column: ", "must hold integer"),
        (dict(source=tmp_path / "hf_dict"), "--data: ", "give one split's folder"),
        (dict(source=tmp_path / "nothing*.parquet"), "--data: ", "matches no .parquet file"),
        (dict(source=tmp_path / "d.npz", x_column="x"), "--x-column/--y-column: ", "only for"),
    ]
    for kwargs, start, expected in cases:
        with pytest.raises(DataError) as error:
            load_data(**kwargs)
        message = str(error.value)
        assert message.startswith(start) and "\n" not in message, message
        assert expected in message, message
    # an integer array column needs floats or a transform
    pandas = pytest.importorskip("pandas")
    pandas.DataFrame({"x": [np.arange(4)] * 3, "y": [0, 1, 0]}).to_parquet(tmp_path / "i.parquet")
    with pytest.raises(DataError, match="holds torch.int64 arrays; store them as floats"):
        load_data(tmp_path / "i.parquet")
    scaled = load_data(tmp_path / "i.parquet", transform=lambda t: t.float() / 4)
    assert torch.equal(scaled.dataset[1][0], torch.arange(4.0) / 4)


def test_report_pictures_of_table_columns_as_of_arrays_and_files(tmp_path):
    # The report draws a `datasets`/Parquet source's samples as it draws the same samples from
    # an .npz (array column: the same intensity scale, the same pixels) or an image folder
    # (image column: the same thumbnails).
    datasets = pytest.importorskip("datasets")
    pandas = pytest.importorskip("pandas")
    from PIL import Image

    from curvkern.report.pictures import thumbnails

    gen = np.random.default_rng(2)
    x = gen.random((9, 64)).astype(np.float32)
    y = np.arange(9) % 3
    pandas.DataFrame({"x": list(x), "y": y}).to_parquet(tmp_path / "t.parquet")
    arrays = Data(None, y, ["0", "1", "2"], "t.npz", images=x)
    ids = [0, 4, 8]
    table_uris, small, note = thumbnails(load_data(tmp_path / "t.parquet"), ids)
    assert (table_uris, small, note) == thumbnails(arrays, ids)
    assert len(table_uris) == 3 and note == "8x8 grey, from 64 values"

    files = []
    for i in range(3):
        folder = tmp_path / "folder" / f"c{i}"
        folder.mkdir(parents=True)
        pixels = gen.integers(0, 256, (120, 90, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "p.png")
        files.append(str(folder / "p.png"))
    datasets.Dataset.from_dict(
        {"image": files, "label": [0, 1, 2]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    ).save_to_disk(str(tmp_path / "hf"))
    table_uris, _, _ = thumbnails(load_data(tmp_path / "hf"), [0, 2])
    folder_uris, _, _ = thumbnails(load_data(tmp_path / "folder"), [0, 2])
    assert table_uris == folder_uris and len(table_uris) == 2
