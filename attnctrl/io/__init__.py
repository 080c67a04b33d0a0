"""Output files: PNG metadata (A1111 ``parameters`` + JSON), sidecars, videos, atomic writes."""

from .metadata import (
    JSON_KEY,
    atomic_path,
    infotext,
    keep_file,
    parse_infotext,
    read_png_metadata,
    save_gif,
    save_json,
    save_png,
    save_video,
    sha256_file,
    temp_target,
)

__all__ = [
    "JSON_KEY", "atomic_path", "infotext", "parse_infotext", "read_png_metadata", "save_gif", "save_json",
    "save_png", "save_video", "temp_target", "keep_file", "sha256_file",
]
