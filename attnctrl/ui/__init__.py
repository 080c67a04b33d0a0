"""The Gradio web app (``attnctrl ui``, extra ``[ui]``): :func:`launch` starts it, :func:`build_app` returns the
``gr.Blocks`` for embedding or testing; :class:`App` does the work behind it."""

from .app import App, Result, Settings, build_app, launch

__all__ = ["App", "Result", "Settings", "build_app", "launch"]
