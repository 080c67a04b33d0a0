"""``attnctrl ui``: start the web app (the command line mounts this command without importing the app)."""

from __future__ import annotations

import click


@click.command("ui", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-m", "--model", default=None, help="Model selected when the page opens [default: the embedded default]")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(0, 65535), help="Port (0: a free one).")
@click.option("--share", is_flag=True, help="Also open a public gradio.live link (needs internet; off by default).")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Folder for the outputs [default: a new temporary folder].")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--dtype", default="auto", show_default=True, help="fp32, fp16, bf16 or auto.")
def ui(model, host, port, share, output, device, dtype) -> None:
    """Start the web app (needs the extra: pip install 'attnctrl[ui]')."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise click.ClickException("the web app needs gradio: pip install 'attnctrl[ui]'") from None
    from . import launch

    launch(model=model, host=host, port=port or None, share=share, output=output, device=device, dtype=dtype)
