"""The networks the end-to-end benchmarks score: a small CNN and a CIFAR ResNet-18, which take
(B, 3, 32, 32) inputs and return (B, 10) logits, and torchvision's ImageNet ResNet-18, (B, 3, 224,
224) -> (B, 1000). Inputs are in the model's input space (after normalization).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["SmallCNN", "CifarResNet18", "imagenet_resnet18", "calibrate_batchnorm"]


class SmallCNN(nn.Sequential):
    """conv32 - pool - conv64 - pool - fc128 - fc10 with ReLU: about 0.55 M parameters.

    (B, 3, 32, 32) -> (B, 32, 32, 32) -> (B, 32, 16, 16) -> (B, 64, 16, 16) -> (B, 64, 8, 8)
    -> (B, 4096) -> (B, 128) -> (B, 10).
    """

    def __init__(self, classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 8 * 8, 128),
            nn.ReLU(),
            nn.Linear(128, classes),
        )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut (1x1 conv-BN when the shape changes).

    (B, c_in, H, W) -> (B, c_out, H / stride, W / stride).
    """

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (He et al. 2016, CIFAR variant): about 11.2 M parameters.

    Unlike torchvision's ImageNet ResNet-18 (7x7 stride-2 stem and a max-pool, which shrink a
    32x32 input to 8x8 before the first block), the stem is one 3x3 stride-1 conv, so the four
    stages run at 32x32, 16x16, 8x8 and 4x4 with 64, 128, 256 and 512 channels:
    (B, 3, 32, 32) -> (B, 64, 32, 32) -> ... -> (B, 512, 4, 4) -> (B, 512) -> (B, classes).
    """

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        stages, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)))


def imagenet_resnet18(classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-18 (7x7 stride-2 stem, max-pool, four stages), random weights:
    about 11.7 M parameters; (B, 3, 224, 224) -> (B, 64, 56, 56) -> ... -> (B, 512, 7, 7) ->
    (B, classes). torchvision is imported here, only by the workload that needs it."""
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=classes)


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, x: Tensor) -> None:
    """Sets every BatchNorm's running statistics to those of the batch x, and leaves eval mode.

    With the default running statistics (mean 0, variance 1), an untrained residual network in
    eval mode amplifies its activations stage after stage and saturates the softmax, so the
    loss is flat in x and the curvature is not representative. One forward pass in training mode
    with a cumulative average (momentum None) gives each layer the statistics of real
    activations, as after training.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    model(x)
    for m in norms:
        m.momentum = 0.1
    model.eval()
