import csv
import importlib
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import curvkern

CUDA = torch.cuda.is_available() and curvkern.has_cuda_kernels()
DEVICES = ["cpu", "cuda"] if CUDA else ["cpu"]

requires_kernels = pytest.mark.skipif(
    not curvkern.has_kernels(), reason="curvkern's compiled ops are not built"
)


def pytest_sessionstart(session):
    # CI sets this, so that a failed build fails the run instead of skipping the kernel tests.
    if os.environ.get("CURVKERN_REQUIRE_KERNELS") == "1" and not curvkern.has_kernels():
        raise RuntimeError("CURVKERN_REQUIRE_KERNELS=1 but curvkern._C did not load")


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request) -> torch.dtype:
    return request.param


def counting_passes(model):
    """``model`` wrapped to record the rows of every pass: (wrapper, list of row counts)."""
    rows: list[int] = []

    def counted(x):
        rows.append(x.shape[0])
        return model(x)

    return counted, rows


def smooth_classifier(
    sample_shape=(6,),
    classes: int = 4,
    hidden: int = 16,
    activation: type[nn.Module] = nn.Tanh,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> nn.Module:
    """A small MLP with a smooth activation: its input Hessian exists everywhere."""
    gen = torch.Generator().manual_seed(seed)
    d_in = 1
    for s in sample_shape:
        d_in *= s
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(d_in, hidden),
        activation(),
        nn.Linear(hidden, hidden),
        activation(),
        nn.Linear(hidden, classes),
    ).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            # Weights large enough that the Hessian is far from zero and far from diagonal.
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 1.5 / p.shape[-1] ** 0.5)
    return model


class PoisonedRows(nn.Module):
    """Returns NaN logits for inputs with x[:, 0] > 10, the model's output elsewhere."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return torch.where((x[:, 0] > 10).unsqueeze(1), math.nan, out)


def labelled_batch(
    batch: int, sample_shape=(6,), classes: int = 4, seed: int = 1, dtype=torch.float64
):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *sample_shape, generator=gen, dtype=dtype)
    y = torch.randint(0, classes, (batch,), generator=gen)
    return x, y


# The samples of the dataset and tracker tests: N labelled rows as IndexedDataset items, and
# the tolerance of "the same computation, batched otherwise" in float64.
N = 23
EXACT = dict(rtol=1e-8, atol=1e-12, equal_nan=True)


@pytest.fixture
def data():
    from torch.utils.data import TensorDataset

    x, y = labelled_batch(N)
    return curvkern.IndexedDataset(TensorDataset(x, y))


def indexed_loader(dataset, **kw):
    """A DataLoader of the dataset/tracker tests (batches of 5 unless told)."""
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=kw.pop("batch_size", 5), **kw)


# The examples' tests import example modules by name (examples/ is not a package).
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def examples():
    """Imports an example module by name, with examples/ on sys.path."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(EXAMPLES))


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Conditioned(nn.Module):
    """A smooth classifier of x (B, 6) conditioned on a per-sample vector and a shared scale."""

    def __init__(self, output="tensor"):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.w1 = nn.Parameter(torch.randn(6, 12, generator=gen, dtype=torch.float64) / 2)
        self.wc = nn.Parameter(torch.randn(3, 12, generator=gen, dtype=torch.float64) / 2)
        self.w2 = nn.Parameter(torch.randn(12, 4, generator=gen, dtype=torch.float64) / 2)
        self.out = output

    def logits(self, x, cond, scale):
        return torch.tanh(x @ self.w1 + cond @ self.wc) @ self.w2 * scale

    def forward(self, x=None, cond=None, scale=1.0, inputs_embeds=None):
        z = self.logits(x if inputs_embeds is None else inputs_embeds, cond, scale)
        if self.out == "tuple":
            return z, cond.sum()
        if self.out == "dict":
            return {"logits": z, "aux": None}
        if self.out == "object":
            return SimpleNamespace(logits=z, hidden_states=None)
        return z


def small_cnn(seed=0, dtype=torch.float32):
    """A smooth small CNN (tanh, average pooling): (B, 3, s, s) images -> (B, 4) logits."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 4),
    ).to(dtype)


def tiny_bert(dtype=torch.float64):
    """A one-layer BERT sequence classifier from a small random config, in eval mode: (B, T)
    ids below 30, 3 classes."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=3,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval().to(dtype)
