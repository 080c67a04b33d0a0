"""Pipelines for the methods that need extra inputs or passes. ``XPipeline.from_pipe(pipe)`` is a diffusers pipeline
of the method sharing ``pipe``'s components (see :mod:`attnctrl.pipelines.base`)."""

from .clora import CLoRAPipeline
from .ditctrl import DiTCtrlPipeline
from .freecustom import FreeCustomPipeline, ReferencePipeline
from .irdiffusion import IRDiffusionPipeline, Subject
from .magicface import MagicFacePipeline
from .primecomposer import PrimeComposerPipeline
from .reference import Reference, ReferenceError, ReferenceRun

__all__ = ["CLoRAPipeline", "DiTCtrlPipeline", "FreeCustomPipeline", "IRDiffusionPipeline", "MagicFacePipeline", "PrimeComposerPipeline", "ReferencePipeline", "Reference",
           "ReferenceError", "ReferenceRun", "Subject"]
