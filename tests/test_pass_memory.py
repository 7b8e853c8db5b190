"""The pool that keeps the CPU memory of the scorer's passes (csrc/cpu/pass_memory.cpp)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from torch import nn

import curvkern
from curvkern import CurvatureScorer, empty_cpu_cache
from curvkern._pass_memory import CPU_KEEP_BYTES, cpu_cache_stats

pytestmark = pytest.mark.skipif(not curvkern.has_kernels(), reason="needs curvkern._C")

MIB = 1 << 20
ops = torch.ops.curvkern


def _mlp_batch(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    return model, torch.randn(256, 64), torch.randint(0, 10, (256,))


def _delta(before: dict, after: dict, key: str) -> int:
    return after[key] - before[key]


def test_a_call_keeps_its_passes_memory_for_the_next():
    empty_cpu_cache()  # nothing kept from earlier tests' calls
    model, x, y = _mlp_batch()
    scorer = CurvatureScorer(model, n_probes=10)
    first = scorer.score(x, y)  # with the model check's passes
    scorer.score(x, y)
    kept = cpu_cache_stats()
    assert kept["installed"] == 1 and kept["open_calls"] == 0
    assert 0 < kept["kept_bytes"] <= CPU_KEEP_BYTES
    second = scorer.score(x, y)
    after = cpu_cache_stats()
    # The same passes again: every request of 64 KiB or more served from kept blocks.
    assert _delta(kept, after, "misses") == 0
    assert _delta(kept, after, "hits") > 0
    assert torch.equal(first.curvature, second.curvature)
    assert torch.equal(first.trace, second.trace)


def test_scores_are_the_same_from_fresh_and_kept_blocks():
    model, x, y = _mlp_batch(1)
    scorer = CurvatureScorer(model, n_probes=6, method="hvp")
    scorer.score(x, y)  # the model check, once
    empty_cpu_cache()
    cold = scorer.score(x, y)
    warm = scorer.score(x, y)
    for field in ("curvature", "trace", "grad_norm", "loss"):
        assert torch.equal(getattr(cold, field), getattr(warm, field)), field


def test_empty_cpu_cache_gives_everything_back():
    model, x, y = _mlp_batch(2)
    CurvatureScorer(model, n_probes=4).score(x, y)
    kept = cpu_cache_stats()["kept_bytes"]
    assert kept > 0
    assert empty_cpu_cache() == kept
    assert cpu_cache_stats()["kept_bytes"] == 0 and cpu_cache_stats()["kept_blocks"] == 0
    assert empty_cpu_cache() == 0


def test_other_threads_and_code_outside_a_call_allocate_as_before():
    def allocate_and_free():
        torch.empty(MIB)  # 4 MiB

    before = cpu_cache_stats()
    allocate_and_free()  # outside any call
    assert ops.pool_enter(CPU_KEEP_BYTES)
    try:
        thread = threading.Thread(target=allocate_and_free)
        thread.start()
        thread.join()
        during = cpu_cache_stats()
        assert during["open_calls"] == before["open_calls"] + 1
        assert _delta(before, during, "misses") == 0 and _delta(before, during, "hits") == 0
        assert during["kept_bytes"] == before["kept_bytes"]
        allocate_and_free()  # this thread, inside: pooled and kept
        inside = cpu_cache_stats()
        assert _delta(during, inside, "misses") + _delta(during, inside, "hits") == 1
        assert inside["kept_bytes"] >= 4 * MIB
    finally:
        ops.pool_exit()
    assert cpu_cache_stats()["open_calls"] == 0


def test_small_requests_are_not_pooled():
    before = cpu_cache_stats()
    assert ops.pool_enter(CPU_KEEP_BYTES)
    try:
        torch.empty(16 * 1024 - 1, dtype=torch.uint8)  # under 64 KiB
        torch.empty(64 * 1024 - 1, dtype=torch.uint8)
    finally:
        ops.pool_exit()
    after = cpu_cache_stats()
    assert _delta(before, after, "misses") == 0 and _delta(before, after, "hits") == 0


def test_a_block_is_whole_pages_at_least_as_large_as_asked():
    empty_cpu_cache()
    assert ops.pool_enter(CPU_KEEP_BYTES)
    try:
        a = torch.full((16 * 4096 + 1,), 7, dtype=torch.uint8)  # 16 pages and 1 byte
        b = torch.full((16 * 4096 + 1,), 9, dtype=torch.uint8)
        assert int(a[-1]) == 7 and int(b[-1]) == 9 and int(a[0]) == 7  # (no large temporaries)
        del a, b
        assert cpu_cache_stats()["kept_bytes"] == 2 * 17 * 4096
        c = torch.empty(16 * 4096 + 4096, dtype=torch.uint8)  # the same 17 pages: served again
        assert cpu_cache_stats()["kept_bytes"] == 17 * 4096
        del c
    finally:
        ops.pool_exit()
    empty_cpu_cache()


def test_a_shorter_request_takes_a_kept_block_of_up_to_twice_its_size():
    page = 4096
    empty_cpu_cache()
    assert ops.pool_enter(CPU_KEEP_BYTES)
    try:
        block = torch.empty(35 * page, dtype=torch.uint8)
        del block
        before = cpu_cache_stats()
        small = torch.empty(17 * page, dtype=torch.uint8)  # 35 pages > twice 17: a new block
        assert _delta(before, cpu_cache_stats(), "misses") == 1
        assert cpu_cache_stats()["kept_bytes"] == 35 * page
        shorter = torch.empty(18 * page, dtype=torch.uint8)  # 35 <= twice 18: the kept one
        assert _delta(before, cpu_cache_stats(), "hits") == 1
        assert cpu_cache_stats()["kept_bytes"] == 0
        shorter.fill_(3)  # the whole block is the tensor's
        del small, shorter
        assert cpu_cache_stats()["kept_bytes"] == (35 + 17) * page  # each at its own size
    finally:
        ops.pool_exit()
    empty_cpu_cache()


def test_a_block_kept_past_the_call_goes_back_to_the_system():
    empty_cpu_cache()
    assert ops.pool_enter(CPU_KEEP_BYTES)
    try:
        result = torch.ones(MIB)  # made inside a call, kept by the caller
    finally:
        ops.pool_exit()
    assert cpu_cache_stats()["kept_bytes"] == 0
    assert float(result.sum()) == MIB  # the caller's tensor is intact after the call
    del result  # freed when nobody scores: to the system, not to the pool
    assert cpu_cache_stats()["kept_bytes"] == 0


def test_the_pool_keeps_at_most_keep_bytes():
    empty_cpu_cache()
    keep = 3 * MIB
    assert ops.pool_enter(keep)
    try:
        blocks = [torch.empty(MIB // 4 + 1024 * k) for k in range(8)]  # 8 sizes, about 8 MiB
        while blocks:
            del blocks[0]  # freed in order: k = 7 last
        inside = cpu_cache_stats()
        assert 0 < inside["kept_bytes"] <= keep
        # the most recently freed are kept: the last block (k = 7) is served again
        before_hit = inside["hits"]
        torch.empty(MIB // 4 + 1024 * 7)
        assert cpu_cache_stats()["hits"] == before_hit + 1
    finally:
        ops.pool_exit()
    assert 0 < cpu_cache_stats()["kept_bytes"] <= keep
    assert ops.pool_enter(0)  # keep 0: the last call's end frees everything
    ops.pool_exit()
    assert cpu_cache_stats()["kept_bytes"] == 0


def test_a_failing_call_closes_its_scope():
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 10)

        def forward(self, x):
            if x.shape[0] > 256:  # the probe pass
                raise RuntimeError("boom")
            return self.lin(x)

    _, x, y = _mlp_batch(3)
    with pytest.raises(RuntimeError, match="boom"):
        CurvatureScorer(Fails(), n_probes=4, seed=0).score(x, y)
    assert cpu_cache_stats()["open_calls"] == 0
    with pytest.raises(RuntimeError, match="pool_exit without a pool_enter"):
        ops.pool_exit()


def test_pooled_tensors_are_plain_cpu_tensors():
    """Copy-on-write clones, numpy views, oneDNN convolutions and pickling on pooled memory."""
    assert ops.pool_enter(CPU_KEEP_BYTES)
    try:
        a = torch.arange(MIB, dtype=torch.float32)
        b = torch._lazy_clone(a)  # needs a simple data pointer, as the default allocator's
        b[0] = -1.0
        assert a[0] == 0.0 and b[0] == -1.0
        view = a.numpy()
        assert view[5] == 5.0
        conv = nn.Conv2d(3, 16, 3)
        out = conv(torch.randn(8, 3, 64, 64))  # oneDNN's raw_allocate/raw_deleter path
        ref = nn.functional.conv2d(torch.randn(8, 3, 64, 64), conv.weight)
        assert out.shape == ref.shape
    finally:
        ops.pool_exit()
    del a, b, view, out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_fresh_process_scores_without_faulting_its_passes_back_in():
    """What the pool is for: in a fresh process (glibc's default thresholds), plain passes of
    2,560 rows fault their activations in again each time; the scorer's same passes do not,
    and do without the pool."""
    script = textwrap.dedent(
        """
        import resource, torch
        from torch import nn
        from curvkern import CurvatureScorer
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
        big = torch.randn(2560, 64)
        def plain():
            xr = big.clone().requires_grad_(True)
            torch.autograd.grad(model(xr).logsumexp(1).sum(), xr)
        # max_batch: the passes of 2,560 rows the default takes with the pool, also without it
        scorer = CurvatureScorer(model, n_probes=10, max_batch=2560)
        calls = {"plain": plain, "scorer": lambda: scorer.score(x, y)}
        faults = dict.fromkeys(calls, 0)
        for fn in calls.values():
            fn()
        for _ in range(5):  # alternately, so that both see the same allocator state
            for name, fn in calls.items():
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                fn()
                faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        print(faults["plain"] / 5, faults["scorer"] / 5)
        """
    )

    def run(pool: str) -> tuple[float, float]:
        env = dict(os.environ, CURVKERN_CPU_POOL=pool)
        out = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
            env=env,
        ).stdout.split()
        return float(out[0]), float(out[1])

    plain, scored = run("1")
    if plain < 200:
        pytest.skip(f"this allocator keeps freed memory: plain passes fault {plain} times")
    # Each plain pass faults its activations' pages in again (about 600 to 2,000 4 KiB pages);
    # the scorer's calls, which make the same passes plus one of 256 rows, none (measured: 0).
    assert scored < plain / 50, (plain, scored)
    # CURVKERN_CPU_POOL=0: torch's allocator alone, and the scorer's passes fault as plain ones
    # do (measured over 9 fresh processes: 0.3 to 2.2 times as often; glibc's thresholds move
    # with each process's order of frees), where with the pool they fault none.
    plain, unpooled = run("0")
    assert unpooled > plain / 10, (plain, unpooled)
