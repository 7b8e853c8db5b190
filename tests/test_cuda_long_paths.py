"""The kernels' long paths: many probes, many probe blocks and chunks, D not a multiple
of 128, huge outputs, huge batches, bad ids, side streams and CUDA graphs.

Cases that fit in a few hundred MB run on every device (the CPU versions run everywhere); the ones
that need more memory than a shared CI machine has, or a GPU feature, run on CUDA only.
"""

import subprocess
import sys

import pytest
import torch

from curvkern import ops, torch_ops

from .conftest import CUDA, requires_kernels
from .probe_stats import assert_stats_close

pytestmark = requires_kernels
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a GPU and curvkern's CUDA kernels")


def _gradients(n, batch, dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g0 = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    g = g0 + 1e-3 * torch.randn(n, batch, dim, generator=gen, dtype=torch.float64)
    return g0.to(device, dtype), g.to(device, dtype)


# More than 32 probes (several probe groups per warp on CUDA) and D = 4200 (33 probe blocks, the
# last one partial).


@pytest.mark.parametrize("op", ["perturb", "perturb_zo"])
def test_perturb_many_probes(device, dtype, op):
    x = torch.randn(3, 4200, dtype=dtype, device=device)
    ids = torch.tensor([5, 2**45 + 1, 0], device=device)
    got = getattr(ops, op)(x, ids, 17, 40, 1e-3, 6)
    assert torch.equal(got, getattr(torch_ops, op)(x, ids, 17, 40, 1e-3, 6))


def test_perturb_one_sample_many_probes(device):
    # B = 1 and n = 300: on CUDA the probes are split over warps to fill the device.
    x = torch.randn(1, 3, 40, 40, device=device)
    ids = torch.tensor([123], device=device)
    got = ops.perturb(x, ids, 2, 300, 1e-2)
    assert torch.equal(got, torch_ops.perturb(x, ids, 2, 300, 1e-2))


@pytest.mark.parametrize("dim", [4097, 128 * 70 + 5])
def test_rademacher_several_segments(device, dim):
    ids = torch.tensor([3, 2**50 + 7], device=device)
    got = ops.rademacher(8, ids, 3, (dim,), 5, 1)
    assert torch.equal(got, torch_ops.rademacher(8, ids, 3, (dim,), 5, 1))


@pytest.mark.parametrize("n,batch,dim", [(37, 3, 9000), (10, 1, 150_528), (3, 2, 150_528)])
def test_probe_reduce_long_rows(device, dtype, n, batch, dim):
    g0, g = _gradients(n, batch, dim, dtype, device)
    ids = torch.arange(7, 7 + batch, device=device)
    got = ops.probe_reduce(g0, g, ids, 4, 1e-3, 2)
    assert_stats_close(got, torch_ops.probe_reduce(g0, g, ids, 4, 1e-3, 2), dtype, dim)


def test_probe_reduce_does_not_depend_on_batch_or_launch(device):
    # ImageNet-sized rows: on CUDA, B = 8 and B = 1 launch different grids over the same chunks.
    g0, g = _gradients(4, 8, 150_528, torch.float32, device)
    ids = torch.arange(8, device=device)
    full = ops.probe_reduce(g0, g, ids, 1, 1e-3)
    for b in (0, 5):
        alone = ops.probe_reduce(g0[b : b + 1], g[:, b : b + 1], ids[b : b + 1], 1, 1e-3)
        assert torch.equal(alone[0], full[b])


def test_batch_over_65535(device):
    # More samples than a grid's y or z dimension (65,535) may hold.
    batch = 70_000
    x = torch.randn(batch, 5, device=device)
    ids = torch.arange(batch, device=device) * 3
    assert torch.equal(ops.perturb(x, ids, 1, 2, 1e-3), torch_ops.perturb(x, ids, 1, 2, 1e-3))
    assert torch.equal(ops.perturb_zo(x, ids, 1, 1, 1e-3), torch_ops.perturb_zo(x, ids, 1, 1, 1e-3))
    assert torch.equal(ops.rademacher(1, ids, 2, (5,)), torch_ops.rademacher(1, ids, 2, (5,)))
    g0, g = _gradients(3, batch, 5, torch.float64, device)
    assert_stats_close(
        ops.probe_reduce(g0, g, ids, 1, 1e-3),
        torch_ops.probe_reduce(g0, g, ids, 1, 1e-3),
        torch.float64,
        5,
    )


def test_masked_long_rows(device):
    # A mask over 3 channels of 224 x 224 (runs of 50,176 elements) and over 37 rows (runs of
    # 4,068: runs and probe blocks straddle each other).
    x = torch.randn(2, 3, 224, 224, device=device)
    ids = torch.tensor([9, 4], device=device)
    for prefix in ((2, 3), (2, 3, 224)):
        mask = torch_ops.as_mask(torch.rand(prefix, device=device) < 0.5, x)
        got = ops.perturb(x, ids, 3, 3, 1e-3, mask=mask)
        assert torch.equal(got, torch_ops.perturb(x, ids, 3, 3, 1e-3, 0, mask))
        g0, g = _gradients(5, 2, x[0].numel(), torch.float32, device)
        assert_stats_close(
            ops.probe_reduce(g0, g, ids, 3, 1e-3, mask=mask),
            torch_ops.probe_reduce(g0, g, ids, 3, 1e-3, 0, mask),
            torch.float32,
            g0.shape[1],
        )


# Outputs of more than 2^31 elements (8.6 GB in float32): CUDA only. The last rows are checked
# against the twin computing those rows alone (probe_offset), where 32-bit indexing would wrap.

BIG_DIM = 2**21 + 3  # 1025 rows of it exceed 2^31 elements


@requires_cuda
def test_perturb_output_over_2_31_elements():
    x = torch.randn(1, BIG_DIM, device="cuda")
    ids = torch.tensor([77], device="cuda")
    out = ops.perturb(x, ids, 5, 1025, 1e-3)
    assert out.numel() > 2**31
    assert torch.equal(out[-2:], torch_ops.perturb(x, ids, 5, 2, 1e-3, 1023))
    del out
    out = ops.perturb_zo(x, ids, 5, 257, 1e-3)  # (4 * 257, D)
    assert out.numel() > 2**31
    last = torch_ops.perturb_zo(x, ids, 5, 1, 1e-3, 256)  # copies c = 0..3 of probe 256
    assert torch.equal(out[256::257], last)
    del out
    torch.cuda.empty_cache()


@requires_cuda
def test_rademacher_output_over_2_31_elements():
    ids = torch.tensor([3], device="cuda")
    out = ops.rademacher(6, ids, 1025, (BIG_DIM,))
    assert out.numel() > 2**31
    assert torch.equal(out[-2:], torch_ops.rademacher(6, ids, 2, (BIG_DIM,), 1023))
    del out
    torch.cuda.empty_cache()


@requires_cuda
def test_probe_reduce_input_over_2_31_elements():
    # Every probe row equals g0 except the last: the statistics are the last row's alone.
    g0 = torch.randn(1, BIG_DIM, device="cuda")
    g = g0.expand(1025, 1, BIG_DIM).contiguous()
    g[-1] += 1e-3 * torch.randn(1, BIG_DIM, device="cuda")
    ids = torch.tensor([11], device="cuda")
    got = ops.probe_reduce(g0, g, ids, 2, 1e-3)
    want = torch_ops.probe_reduce(g0, g[-1:], ids, 2, 1e-3, 1024)
    assert_stats_close(got, want, torch.float32, BIG_DIM)
    del g
    torch.cuda.empty_cache()


# Ids out of range


def test_bad_ids_raise_on_cpu():
    x = torch.randn(3, 5)
    bad = torch.tensor([0, -2, 1])
    for call in (
        lambda: ops.perturb(x, bad, 0, 1, 1e-3),
        lambda: ops.perturb_zo(x, bad, 0, 1, 1e-3),
        lambda: ops.probe_reduce(x, x[None], bad, 0, 1e-3),
        lambda: ops.rademacher(0, bad, 1, (5,)),
        lambda: ops.perturb(x, torch.tensor([0, 2**56, 1]), 0, 1, 1e-3),
    ):
        with pytest.raises(RuntimeError, match=r"ids must lie in \[0, 2\^56\)"):
            call()


BAD_ID_CALLS = {
    "perturb": "ops.perturb(x, bad, 0, 1, 1e-3)",
    "perturb_zo": "ops.perturb_zo(x, bad, 0, 1, 1e-3)",
    "probe_reduce": "ops.probe_reduce(x, x[None], bad, 0, 1e-3)",
    "rademacher": "ops.rademacher(0, bad, 1, (5,))",
    "perturb_2^56": "ops.perturb(x, bad.fill_(2**56), 0, 1, 1e-3)",
}


@requires_cuda
@pytest.mark.parametrize("call", list(BAD_ID_CALLS))
def test_bad_ids_assert_on_cuda(call):
    # A device-side assertion leaves the CUDA context unusable: each case runs in its own process.
    code = (
        "import torch\nfrom curvkern import ops\n"
        "x = torch.randn(3, 5, device='cuda')\n"
        "bad = torch.tensor([0, -2, 1], device='cuda')\n"
        f"{BAD_ID_CALLS[call]}\n"
        "torch.cuda.synchronize()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "device-side assert" in output, output


# Streams and graphs


@requires_cuda
def test_side_stream():
    x = torch.randn(6, 3, 50, device="cuda")
    ids = torch.arange(6, device="cuda")
    g0, g = _gradients(4, 6, 150, torch.float32, "cuda")
    want = (ops.perturb(x, ids, 1, 4, 1e-3), ops.probe_reduce(g0, g, ids, 1, 1e-3))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = (ops.perturb(x, ids, 1, 4, 1e-3), ops.probe_reduce(g0, g, ids, 1, 1e-3))
    side.synchronize()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@requires_cuda
def test_cuda_graph_capture_and_replay():
    # The ops never synchronize with the host (ids are checked on the device), so they capture.
    x = torch.randn(4, 300, device="cuda")
    ids = torch.tensor([3, 1, 4, 1], device="cuda")
    mask = torch.ones(4, 3, device="cuda")
    mask[1, 2] = 0

    def step():
        xp = ops.perturb(x, ids, 9, 5, 1e-3, mask=mask)
        return ops.probe_reduce(x, (2 * xp).reshape(5, 4, 300), ids, 9, 1e-3, mask=mask)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    want = step()
    x.add_(1.0)  # replays read the captured buffers
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, step())
    assert not torch.equal(captured, want)
