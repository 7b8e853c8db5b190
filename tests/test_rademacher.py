"""curvkern::rademacher and the probe generator it shares with every kernel."""

import math

import pytest
import torch

from curvkern import ops, torch_ops

from .conftest import requires_kernels

# Random123's known-answer vectors for Philox-4x32-10: (counter, key, output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    out = torch_ops.philox4x32_10(counter, key)
    assert tuple(int(w) for w in out) == expected


IDS = torch.tensor([0, 1, 7, 2**31 + 5, 2**40 + 3, 2**56 - 1])
SHAPES = [(1,), (5,), (128,), (129,), (3, 7, 11), (2, 300)]


@requires_kernels
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("stream", [0, 1, 255])
def test_kernel_matches_twin(device, dtype, shape, stream):
    ids = IDS.to(device)
    seed = 123456789012345
    got = ops.rademacher(seed, ids, 3, shape, probe_offset=11, stream=stream, dtype=dtype)
    want = torch_ops.rademacher(seed, ids, 3, shape, 11, stream, dtype)
    assert got.shape == (3, len(IDS), *shape) and got.dtype == dtype and got.device == device
    assert torch.equal(got, want)


@requires_kernels
def test_values_are_signs(device):
    r = ops.rademacher(3, torch.arange(64, device=device), 4, (1000,))
    assert set(r.unique().tolist()) == {-1.0, 1.0}


@requires_kernels
def test_moments_and_correlations(device):
    # 512 samples x 8 probes x 1000 elements: the mean of N = 4.1e6 signs has standard error
    # 1/sqrt(N); the correlation of two elements over 4096 (sample, probe) draws has standard
    # error 1/sqrt(4096). Bounds are 5 standard errors.
    r = ops.rademacher(7, torch.arange(512, device=device), 8, (1000,), dtype=torch.float64)
    n = r.numel()
    assert abs(r.mean().item()) < 5 / math.sqrt(n)
    flat = r.reshape(-1, 1000)  # (4096, 1000)
    corr = (flat.T @ flat) / flat.shape[0]  # (1000, 1000), off-diagonal ~ N(0, 1/4096)
    off = corr[~torch.eye(1000, dtype=torch.bool, device=device)]
    assert off.abs().max().item() < 6 / math.sqrt(flat.shape[0])  # 1e6 pairs: 6 sigma
    assert abs(off.std().item() * math.sqrt(flat.shape[0]) - 1) < 0.05
    # Probes of the same sample are uncorrelated with each other, and so are samples.
    per_probe = r.mean(dim=(1, 2))
    assert per_probe.abs().max().item() < 5 / math.sqrt(512 * 1000)


@requires_kernels
def test_pure_function_of_seed_id_probe_element(device):
    ids = torch.tensor([5, 9, 2, 5], device=device)
    full = ops.rademacher(1, ids, 6, (40,))
    # the same id gives the same probes, wherever it stands in the batch
    assert torch.equal(full[:, 0], full[:, 3])
    # a batch of one, or the reversed batch, sees the same values
    alone = ops.rademacher(1, ids[1:2], 6, (40,))
    assert torch.equal(alone[:, 0], full[:, 1])
    assert torch.equal(ops.rademacher(1, ids.flip(0), 6, (40,)), full.flip(1))
    # probe_offset continues the sequence
    assert torch.equal(ops.rademacher(1, ids, 2, (40,), probe_offset=4), full[4:6])
    # the sample shape does not matter, only the flat element index
    assert torch.equal(ops.rademacher(1, ids, 6, (4, 10)).reshape(6, 4, 40), full)
    # element j of a longer sample is element j of a shorter one
    assert torch.equal(ops.rademacher(1, ids, 6, (300,))[..., :40], full)


@requires_kernels
def test_seeds_ids_streams_differ(device):
    ids = torch.arange(4, device=device)
    base = ops.rademacher(0, ids, 2, (256,))
    for other in (
        ops.rademacher(1, ids, 2, (256,)),
        ops.rademacher(0, ids + 4, 2, (256,)),
        ops.rademacher(0, ids, 2, (256,), stream=1),
        ops.rademacher(0, ids, 2, (256,), probe_offset=2),
    ):
        agreement = (base == other).double().mean().item()
        # 2048 signs agree with probability 1/2 each: 6 standard errors of 1/sqrt(4 * 2048)
        assert abs(agreement - 0.5) < 6 / math.sqrt(4 * 2048)


@requires_kernels
def test_empty(device):
    ids = torch.arange(3, device=device)
    assert ops.rademacher(0, ids, 0, (5,)).shape == (0, 3, 5)
    assert ops.rademacher(0, ids[:0], 2, (5,)).shape == (2, 0, 5)
    assert ops.rademacher(0, ids, 2, (0,)).shape == (2, 3, 0)


@requires_kernels
def test_bad_arguments():
    ids = torch.arange(3)
    with pytest.raises(RuntimeError, match="ids must lie in"):
        ops.rademacher(0, torch.tensor([1, -1]), 1, (4,))
    with pytest.raises(RuntimeError, match="ids must lie in"):
        ops.rademacher(0, torch.tensor([2**56]), 1, (4,))
    with pytest.raises(RuntimeError, match="stream must lie in"):
        ops.rademacher(0, ids, 1, (4,), stream=256)
    with pytest.raises(RuntimeError, match="seed must be >= 0"):
        ops.rademacher(-1, ids, 1, (4,))
    with pytest.raises(RuntimeError, match="probe indices"):
        ops.rademacher(0, ids, 2, (4,), probe_offset=2**32 - 1)
    with pytest.raises(RuntimeError, match="dtype must be float32 or float64"):
        ops.rademacher(0, ids, 1, (4,), dtype=torch.float16)
    with pytest.raises(TypeError, match="ids must be an integer tensor"):
        ops.rademacher(0, torch.zeros(3), 1, (4,))


@requires_kernels
def test_opcheck(device):
    ids = torch.tensor([3, 1, 4], device=device)
    torch.library.opcheck(torch.ops.curvkern.rademacher.default, (5, ids, 2, [3, 4], 1, 1, None))
    torch.library.opcheck(
        torch.ops.curvkern.rademacher.default, (5, ids, 2, [7], 0, 0, torch.float64)
    )


@requires_kernels
def test_cuda_version():
    version = ops.cuda_version()
    assert version == -1 or version >= 11000
