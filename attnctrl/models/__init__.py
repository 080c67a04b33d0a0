"""Model loading: tiny offline pipelines, local folders and files, cached hub ids, and the embedded default model."""

from .loading import DEFAULT_MODEL, load_pipeline, parse_dtype, resolve_device
from .tiny import TINY_FAMILIES, tiny_pipeline

__all__ = ["DEFAULT_MODEL", "load_pipeline", "parse_dtype", "resolve_device", "TINY_FAMILIES", "tiny_pipeline"]
