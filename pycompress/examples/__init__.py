"""Worked examples on real data; ``digits`` is the pipeline behind ``pycompress demo``."""
