"""Small CNNs for scikit-learn's 8x8 digits images."""

from __future__ import annotations

from torch import nn


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class TeacherCNN(nn.Module):
    """~160k parameters: three conv blocks and a two-layer classifier."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(1, 32), *_conv_bn_relu(32, 64), nn.MaxPool2d(2),  # 8x8 -> 4x4
            *_conv_bn_relu(64, 128), nn.MaxPool2d(2),  # -> 2x2
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(128 * 2 * 2, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class StudentCNN(nn.Module):
    """~14k parameters: two conv blocks and a small classifier."""

    def __init__(self, classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(1, width), nn.MaxPool2d(2),  # 8x8 -> 4x4
            *_conv_bn_relu(width, 2 * width), nn.MaxPool2d(2),  # -> 2x2
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 2 * 2, 64), nn.ReLU(), nn.Linear(64, classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))
