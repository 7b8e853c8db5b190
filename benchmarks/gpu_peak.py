"""The memory bandwidth a GPU's datasheet gives, looked up from its name.

A bandwidth measurement is reported as a fraction of the peak of the device it ran on, not of a
fixed figure: the H100 SXM's HBM3 gives 3.35 TB/s, the H200's HBM3e 4.8 TB/s, so the same
kernel reads as 45% of one and 31% of the other.

    python3 -m benchmarks.gpu_peak        # prints "NAME: PEAK TB/s (source)" for this GPU
"""

from __future__ import annotations

import sys

# (substring of torch.cuda.get_device_name(), TB/s): datasheet peaks, the first match wins, so
# the more specific names come first.
DATASHEET_TBPS = [
    ("H200", 4.8),
    ("H100 NVL", 3.9),
    ("H100 PCIe", 2.0),
    ("H100", 3.35),  # H100 SXM5 80GB HBM3 (the name reads "NVIDIA H100 80GB HBM3")
    ("A100-SXM4-80GB", 2.039),
    ("A100-PCIE-80GB", 1.935),
    ("A100", 1.555),  # 40 GB
    ("L40S", 0.864),
    ("L4", 0.3),
]


def peak_tbps(name: str) -> float | None:
    """Datasheet memory bandwidth in TB/s of the GPU called ``name``, or None if not listed."""
    for key, tbps in DATASHEET_TBPS:
        if key in name:
            return tbps
    return None


def current_device_peak() -> tuple[str, float | None]:
    """(name, datasheet TB/s or None) of the current CUDA device; needs a GPU."""
    import torch

    name = torch.cuda.get_device_name()
    return name, peak_tbps(name)


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("no GPU")
        return 1
    name, tbps = current_device_peak()
    print(f"{name}: {tbps} TB/s (datasheet)" if tbps else f"{name}: peak not in the table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
