"""Dataset readers for disentanglement work: numpy + pillow + the standard library only.

(Skeleton: readers are being added.)
"""
import numpy as np


class DataError(ValueError):
    """A dataset file or name that cannot be read; the message names the file and the problem."""


class Dataset:
    """Images as stored (uint8, (N, H, W, C)) with optional integer factors (int64, (N, K))."""

    def __init__(self, images, factors=None, factor_names=(), factor_sizes=(), name=""):
        self.images = images
        self.factors = factors
        self.factor_names = list(factor_names)
        self.factor_sizes = [int(s) for s in factor_sizes]
        self.name = name

    def __len__(self):
        return len(self.images)

    def __repr__(self):
        shape = "x".join(str(s) for s in self.images.shape)
        return f"Dataset({self.name!r}, images {shape} {self.images.dtype}, factors {self.factor_names})"
