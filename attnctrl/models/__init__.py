"""Model loading: tiny offline pipelines, local folders and files, cached hub ids, and the embedded default model."""

from .loading import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    OFFLOAD_MODES,
    check_attention_backend,
    check_model,
    check_offload,
    embedded_path,
    enable_offload,
    load_pipeline,
    makes_video,
    parse_dtype,
    recommended_settings,
    resolve_device,
    set_attention_backend,
    size_rule,
    toyworld_path,
)
from .tiny import TINY_FAMILIES, tiny_pipeline

__all__ = [
    "DEFAULT_MODEL", "EMBEDDED_MODELS", "OFFLOAD_MODES", "embedded_path", "check_attention_backend", "check_model", "check_offload", "enable_offload", "load_pipeline", "makes_video", "parse_dtype", "recommended_settings", "resolve_device", "set_attention_backend",
    "size_rule", "toyworld_path",
    "TINY_FAMILIES", "tiny_pipeline",
]
