"""The base of every error attnctrl raises on bad input.

It lives on its own, importing nothing from attnctrl, so that every layer can raise it: the kernels (the ground
floor, which import nothing else from attnctrl), core and the methods. The surfaces catch it to print one line
instead of a traceback. The specific errors are in :mod:`attnctrl.core.errors`.
"""

from __future__ import annotations

__all__ = ["AttnCtrlError", "AttnCtrlWarning", "notice"]


class AttnCtrlError(ValueError):
    """Base class of every error attnctrl raises on bad input."""


class AttnCtrlWarning(UserWarning):
    """Something the user should know but that does not stop the work: a substitution (another seed was used), a
    truncation (a prompt longer than the model reads), a degenerate attention-derived mask. One sentence that says
    what happened and what to do. Every surface shows it once: the command line as ``Warning: ...`` on stderr, the
    web app as a toast; Python callers get a normal :mod:`warnings` warning."""


def notice(message: str, stacklevel: int = 2) -> None:
    """Warn the user once with :class:`AttnCtrlWarning` (see there)."""
    import warnings

    warnings.warn(message, AttnCtrlWarning, stacklevel=stacklevel + 1)
