"""Worked examples on real data; ``digits`` is the pipeline behind ``pycompress demo``.
``models`` holds the architectures the tests and benchmarks convert."""

from pycompress.examples.models import MobileNetV3Small, ResNet18, SmallCNN

__all__ = ["MobileNetV3Small", "ResNet18", "SmallCNN"]
