"""DATA as the command line and the report read it (curvkern.data.load_data): its errors name
--data, say what was expected and what came, on one line."""

import pickle

import numpy as np
import pytest

from curvkern.data import DataError, load_data

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
