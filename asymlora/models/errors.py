"""Errors raised while loading models, weights and images.

Each carries a complete, user-facing message (what is wrong and what to do); the CLI should catch
``ModelLoadError`` and print ``str(err)`` instead of a traceback.
"""

from __future__ import annotations

__all__ = [
    "ModelLoadError",
    "MissingWeightsPackageError",
    "ChecksumMismatchError",
    "ShapeMismatchError",
    "ImageReadError",
]


class ModelLoadError(RuntimeError):
    """Base class: a model, its weights or an input image could not be loaded."""


class MissingWeightsPackageError(ModelLoadError, ImportError):
    """A pip package that ships pretrained weights is not installed."""


class ChecksumMismatchError(ModelLoadError):
    """A weight file's sha256 is not the expected one."""


class ShapeMismatchError(ModelLoadError):
    """A tensor's shape (or the number of tensors) is not the expected one."""


class ImageReadError(ModelLoadError, ValueError):
    """An image file or object could not be read as an RGB image."""
