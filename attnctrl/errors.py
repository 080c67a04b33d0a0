"""The base of every error attnctrl raises on bad input.

It lives on its own, importing nothing from attnctrl, so that every layer can raise it: the kernels (the ground
floor, which import nothing else from attnctrl), core and the methods. The surfaces catch it to print one line
instead of a traceback. The specific errors are in :mod:`attnctrl.core.errors`.
"""

from __future__ import annotations

__all__ = ["AttnCtrlError"]


class AttnCtrlError(ValueError):
    """Base class of every error attnctrl raises on bad input."""
