"""Exceptions that the CLI turns into one clear line and a non-zero exit.

Every error a user can cause (bad file, bad option, bad config) is a ``SparseSRError``;
anything else reaching the CLI is a bug and is reported as such.
"""
from __future__ import annotations


class SparseSRError(Exception):
    """Base class: a problem with the user's input, explained in one line."""


class ImageReadError(SparseSRError):
    """An image file could not be read or decoded."""


class ImageWriteError(SparseSRError):
    """An image file could not be written."""


class CheckpointError(SparseSRError):
    """A checkpoint could not be read, or does not match the architecture."""


class ConfigError(SparseSRError):
    """A training or evaluation configuration is invalid."""


class SparseFormatError(SparseSRError):
    """An exported sparse model file violates the format (docs/format.md)."""


class BackendError(SparseSRError):
    """A compute backend or device was requested that cannot run here."""


class TrainingError(SparseSRError):
    """Training cannot go on: the loss or the weights became non-finite, or a run's log is damaged."""


class ModelNotFoundError(SparseSRError):
    """A model was named that is neither an existing file nor an embedded model."""


class OutputPathError(SparseSRError):
    """An output path names a folder (or ends in a separator) where a file is expected."""


class NotEnoughMemoryError(SparseSRError):
    """An image needs more memory than there is, even with the smallest tiles."""


class UsageError(SparseSRError):
    """Options that conflict or are out of range, or an output location that cannot be used:
    found before any work is done."""
