"""The base of every error attnctrl raises on bad input.

It lives on its own, importing nothing from attnctrl, so that every layer can raise it: the kernels (the ground
floor, which import nothing else from attnctrl), core and the methods. The surfaces catch it to print one line
instead of a traceback. The specific errors are in :mod:`attnctrl.core.errors`.
"""

from __future__ import annotations

import contextlib

__all__ = ["AttnCtrlError", "AttnCtrlWarning", "notice", "quiet_libraries"]


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


@contextlib.contextmanager
def quiet_libraries():
    """Silence diffusers', transformers' and peft's logs and progress bars for the block: attnctrl reports what went
    wrong itself, in one sentence (a LoRA of another model makes diffusers log every mismatched weight)."""
    import logging

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    peft = logging.getLogger("peft")
    old = (dlog.get_verbosity(), tlog.get_verbosity(), dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled(),
           peft.level)
    dlog.set_verbosity(logging.CRITICAL + 1)
    tlog.set_verbosity(logging.CRITICAL + 1)
    peft.setLevel(logging.CRITICAL + 1)
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(old[0])
        tlog.set_verbosity(old[1])
        peft.setLevel(old[4])
        if old[2]:
            dlog.enable_progress_bar()
        if old[3]:
            tlog.enable_progress_bar()
