"""Errors users see. Each message is one sentence that says what was wrong and what would be right.

The base class, :class:`AttnCtrlError`, is defined in :mod:`attnctrl.errors` (so that the kernels can raise it) and
re-exported here; ``attnctrl.core.errors.AttnCtrlError is attnctrl.errors.AttnCtrlError``.
"""

from __future__ import annotations

from ..errors import AttnCtrlError, AttnCtrlWarning, notice

__all__ = [
    "AttnCtrlError",
    "AttnCtrlWarning",
    "notice",
    "UnsupportedModelError",
    "LayerSelectionError",
    "LayerConflictError",
    "ModelNotAvailableError",
    "TokenLookupError",
    "NotAPluginError",
    "InputError",
    "Stopped",
]


class UnsupportedModelError(AttnCtrlError):
    """The model (or its family) is not supported by attnctrl or by the method being applied."""


class LayerSelectionError(AttnCtrlError):
    """A layer selector matched no attention layer, or could not be parsed."""


class LayerConflictError(AttnCtrlError):
    """Two methods were asked to control the same attention layer."""


class ModelNotAvailableError(AttnCtrlError):
    """A model could not be found offline (not a tiny model, local folder, file or cached hub id)."""


class TokenLookupError(AttnCtrlError):
    """A word is not in the tokenised prompt, or lies beyond the tokenizer's maximum length."""


class NotAPluginError(AttnCtrlError, TypeError):
    """A config that ``attnctrl.apply`` cannot install: the method runs in its own pipeline (the message names it)."""


class InputError(AttnCtrlError):
    """An input a method needs is missing, or one it does not take was given. ``input`` is the input kind's key
    (``"references"``, ...): the message names the input in words, and a surface may add its own control for it
    (the command line its flag)."""

    def __init__(self, message: str, input: str):
        super().__init__(message)
        self.input = input


class Stopped(AttnCtrlError):
    """A generation stopped on request (the run layer's ``should_stop``) between two denoising steps: ``step`` of
    ``total`` were done; nothing of it was saved."""

    def __init__(self, step: int, total: int):
        where = f"after step {step}" if step else "before the first step"
        super().__init__(f"Stopped {where} of {total}; nothing of it was saved")
        self.step, self.total = step, total
