"""`curvkern score` on one process against `torchrun --nproc_per_node 2` on the CPU.

Two workloads, each scored three ways (one process with one thread, one process with two
threads, two torchrun processes with one thread each), timed end to end as a user runs them
(start-up, data loading and the tracker's writes included):

- digits: scikit-learn's 1,797 handwritten digits (8x8, as 64 floats), the MLP of the command
  line's guide (64-256-256-10), 3 checkpoints of a short training, 10 probes;
- resnet18: an image folder of 224x224 colour JPEGs (torchvision's ResNet-18, 10 classes), one
  checkpoint, one probe, as the guide's image-folder measurement; ``--images`` of them.

For each run: wall-clock seconds, CPU seconds of all its processes, the machine's load average
when it started, and the wall-clock ratio to one process with one thread. The ResNet-18 workload
also times one plain forward and backward pass of a batch, the unit of its per-sample cost.

    python -m benchmarks.scale_out [--images 192] [--workdir DIR] [--only digits|resnet18]

Prints a markdown table and writes benchmarks/results/scale_out.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent

MODELS = """
import torchvision
from torch import nn


def make_mlp():
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def make_resnet18():
    return torchvision.models.resnet18(num_classes=10)
"""

RUNS = (  # label, processes, threads per process
    ("1 process, 1 thread", 1, 1),
    ("1 process, 2 threads", 1, 2),
    ("torchrun, 2 processes x 1 thread", 2, 1),
)


def _digits(workdir: Path) -> list[str]:
    from sklearn.datasets import load_digits

    sys.path.insert(0, str(workdir))
    import scale_out_models

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    np.savez(workdir / "digits.npz", x=x, y=y)
    torch.manual_seed(0)
    model = scale_out_models.make_mlp()
    data = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    (workdir / "ckpt_digits").mkdir(exist_ok=True)
    for epoch in range(3):
        for xb, yb in torch.utils.data.DataLoader(data, batch_size=64, shuffle=True):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        torch.save(model.state_dict(), workdir / "ckpt_digits" / f"epoch_{epoch:03d}.pt")
    return [
        "--model",
        "scale_out_models:make_mlp",
        "--checkpoints",
        "ckpt_digits/epoch_*.pt",
        "--data",
        "digits.npz",
        "--n-probes",
        "10",
        "--batch-size",
        "256",
    ]


def _resnet18(workdir: Path, images: int) -> list[str]:
    from PIL import Image, ImageDraw

    sys.path.insert(0, str(workdir))
    import scale_out_models

    gen = np.random.default_rng(0)
    for i in range(images):
        label = i % 10
        folder = workdir / "images" / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = gen.integers(0, 256, (224, 224, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        box = gen.integers(20, 200, 4)
        ImageDraw.Draw(image).ellipse(
            [min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])],
            fill=tuple(int(c) for c in gen.integers(0, 256, 3)),
        )
        image.save(folder / f"{i:04d}.jpg", quality=90)
    (workdir / "ckpt_resnet18").mkdir(exist_ok=True)
    torch.manual_seed(0)
    torch.save(scale_out_models.make_resnet18().state_dict(), workdir / "ckpt_resnet18/epoch_0.pt")
    return [
        "--model",
        "scale_out_models:make_resnet18",
        "--checkpoints",
        "ckpt_resnet18/epoch_*.pt",
        "--data",
        "images",
        "--n-probes",
        "1",
        "--batch-size",
        "16",
    ]


def _pass_seconds(workdir: Path, batch: int = 16, repeats: int = 3) -> float:
    """CPU seconds per sample of one forward and backward pass (input gradient) of a ResNet-18
    batch, on one thread: the unit the scorer's n + 1 passes per sample are made of."""
    import scale_out_models

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = scale_out_models.make_resnet18().eval()
        x = torch.rand(batch, 3, 224, 224, requires_grad=True)
        y = torch.randint(0, 10, (batch,))
        times = []
        for _ in range(repeats + 1):
            # CPU time of this process: on a shared machine, wall-clock time measures the others
            start = time.process_time()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            torch.autograd.grad(loss, x)
            times.append(time.process_time() - start)
        return min(times[1:]) / batch
    finally:
        torch.set_num_threads(threads)


def _run(workdir: Path, score_args: list[str], processes: int, threads: int, out: str) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(workdir)]),
        "OMP_NUM_THREADS": str(threads),
    }
    if processes == 1:
        command = [sys.executable, "-m", "curvkern"]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(processes),
            "-m",
            "curvkern",
        ]
    command += ["score", *score_args, "--out", out, "--device", "cpu"]
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "load_at_start": load, "command": " ".join(command)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--only", choices=("digits", "resnet18"), default=None)
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="curvkern_scale_out_"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "scale_out_models.py").write_text(MODELS)
    workloads = {}
    if args.only in (None, "digits"):
        workloads["digits"] = (_digits(workdir), 1797, 3)
    if args.only in (None, "resnet18"):
        workloads["resnet18"] = (_resnet18(workdir, args.images), args.images, 1)
    results = {"cores": os.cpu_count(), "torch": torch.__version__, "workloads": {}}
    for name, (score_args, samples, checkpoints) in workloads.items():
        rows = []
        for label, processes, threads in RUNS:
            out = f"{name}_{processes}x{threads}.npz"
            row = _run(workdir, score_args, processes, threads, out)
            row.update(label=label, processes=processes, threads=threads)
            row["cpu_ms_per_sample"] = 1e3 * row["cpu_s"] / (samples * checkpoints)
            rows.append(row)
            print(
                f"{name}: {label}: {row['wall_s']:.1f} s wall, {row['cpu_s']:.1f} s CPU", flush=True
            )
        # The runs' scores agree (the batches are the same ones, whatever the processes).
        from curvkern import CurvatureTracker

        base = CurvatureTracker.load(workdir / f"{name}_1x1.npz").history
        for row in rows[1:]:
            other = CurvatureTracker.load(
                workdir / f"{name}_{row['processes']}x{row['threads']}.npz"
            )
            row["max_rel_diff"] = float(((other.history - base).abs() / base.abs()).max())
        entry = {"samples": samples, "checkpoints": checkpoints, "runs": rows}
        if name == "resnet18":
            entry["pass_s_per_sample_1_thread"] = _pass_seconds(workdir)
        results["workloads"][name] = entry
    out = ROOT / "benchmarks" / "results" / "scale_out.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(
        "| workload | run | wall s | CPU s | CPU ms / sample / checkpoint | load at start | "
        "wall vs 1x1 |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, entry in results["workloads"].items():
        first = entry["runs"][0]["wall_s"]
        for row in entry["runs"]:
            print(
                f"| {name} | {row['label']} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | "
                f"{row['cpu_ms_per_sample']:.2f} | {row['load_at_start']:.1f} | "
                f"{first / row['wall_s']:.2f}x |"
            )
        if "pass_s_per_sample_1_thread" in entry:
            print(
                f"\nResNet-18 forward+backward, 1 thread: "
                f"{1e3 * entry['pass_s_per_sample_1_thread']:.1f} ms per sample"
            )
    print(f"\nwrote {out}; work folder {workdir}")


if __name__ == "__main__":
    main()
