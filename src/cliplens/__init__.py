"""cliplens: a CLIP image-embedding service whose every stage is traced and measured."""

__version__ = "0.1.0"
