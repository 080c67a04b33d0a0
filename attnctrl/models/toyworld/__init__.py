"""Toyworld: procedural coloured shapes with captions, a pixel-rule checker, and the trainer of the embedded model."""

from .score import CaptionError, Detected, detect, parse_caption, score
from .world import (
    COLOURS,
    HELD_OUT,
    IMAGE_SIZE,
    PATTERNS,
    PLACEHOLDERS,
    SHAPES,
    SIDES,
    VOCABULARY,
    Obj,
    Scene,
    caption_of,
    make_scene,
    render,
    sample_scene,
)

__all__ = [
    "CaptionError", "Detected", "detect", "parse_caption", "score", "COLOURS", "HELD_OUT", "IMAGE_SIZE", "PATTERNS",
    "PLACEHOLDERS", "SHAPES", "SIDES", "VOCABULARY", "Obj", "Scene", "caption_of", "make_scene", "render",
    "sample_scene",
]
