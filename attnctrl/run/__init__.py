"""The run layer: a request (model, method, options, inputs, prompts, seeds) -> validated -> outputs + metadata.

Every surface stands on it: ``attnctrl generate`` builds a :class:`Request`, ``attnctrl batch`` reads job files into
requests (:mod:`.jobs`, :mod:`.batch`), the web app builds one per press of Generate. All checks are in
:func:`validate`; :func:`generate` loads the model, runs the method and writes the files (with copies of the input
files, :func:`keep_inputs`); a ``should_stop`` ends a generation between steps (:class:`Stopped`).
"""

from .generate import Output, Result, Session, Stopped, generate, keep_inputs, load, settings_record, slug
from .request import (
    Plan,
    Request,
    check_size,
    from_record,
    method_config,
    parse_option,
    read_record,
    read_stored,
    validate,
    writable_folder,
)

__all__ = ["Request", "Plan", "validate", "method_config", "parse_option", "writable_folder", "Output", "Result",
           "Session", "generate", "load", "settings_record", "slug", "read_record", "read_stored", "from_record",
           "Stopped", "keep_inputs", "check_size"]
