"""Data: the shared AlignmentDataModule, sources, chat formatting and the keyword safety categoriser."""

from fteval.data.datamodule import AlignmentDataModule

__all__ = ["AlignmentDataModule"]
