"""Pipelines for the methods that need extra inputs or passes; each wraps a base pipeline with ``from_pipe``."""

from .freecustom import FreeCustomPipeline, ReferencePipeline
from .irdiffusion import IRDiffusionPipeline, Subject
from .magicface import MagicFacePipeline
from .reference import Reference, ReferenceError, ReferenceRun

__all__ = ["FreeCustomPipeline", "IRDiffusionPipeline", "MagicFacePipeline", "ReferencePipeline", "Reference",
           "ReferenceError", "ReferenceRun", "Subject"]
