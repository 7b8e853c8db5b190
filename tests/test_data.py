"""DATA as the command line and the report read it (curvkern.data.load_data): its errors name
--data, say what was expected and what came, on one line."""

import numpy as np
import pytest

from curvkern.data import DataError, load_data

DATA_ERRORS = {
    "npz without y": ("no_y.npz", "missing 'y'"),
    "integer x": ("uint8.npz", "has dtype uint8"),
}


@pytest.mark.parametrize("case", list(DATA_ERRORS))
def test_data_errors_are_one_line(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    np.savez("no_y.npz", x=np.zeros((4, 16), np.float32))
    np.savez("uint8.npz", x=np.zeros((4, 16), np.uint8), y=np.zeros(4, np.int64))
    source, expected = DATA_ERRORS[case]
    with pytest.raises(DataError) as error:
        load_data(source)
    message = str(error.value)
    assert message.startswith("--data: ") and "\n" not in message
    assert expected in message
