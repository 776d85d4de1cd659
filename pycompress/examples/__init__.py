"""Model definitions used by the tests, the benchmarks and the demo (random weights).

torchvision does not import beside the CPU torch build this project targets, so the
standard architectures are written out here.
"""

from pycompress.examples.models import MobileNetV3Small, ResNet18, SmallCNN

__all__ = ["MobileNetV3Small", "ResNet18", "SmallCNN"]
