"""``attnctrl distill clear``: the command line of :mod:`attnctrl.distill.clear` (CLEAR's registry entry names it)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("clear", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-m", "--model", required=True, help="A FLUX pipeline: toyworld-flux, tiny-flux, a local folder or a cached hub id.")
@click.option("--radius", type=click.FloatRange(1), required=True, help="Disc radius in image tokens.")
@click.option("--down-factor", type=click.IntRange(1), default=1, show_default=True)
@click.option("--data", type=click.Path(file_okay=False), help="Folder of images with same-name .txt captions.")
@click.option("--generate", type=click.IntRange(0), default=0, help="Teacher-generated images to train on.")
@click.option("--prompts", type=click.Path(dir_okay=False), help="Prompt file for --generate (one per line).")
@click.option("--steps", type=click.IntRange(1), required=True, help="Optimizer steps.")
@click.option("--lr", type=float, default=1e-5, show_default=True)
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True)
@click.option("--grad-accum", type=click.IntRange(1), default=1, show_default=True)
@click.option("--resolution", type=click.IntRange(16), default=None,
              help="Training resolution in px [default: the model's recommended size, else its default size].")
@click.option("--max-sequence-length", type=click.IntRange(1, 512), default=None,
              help="T5 tokens [default: the model's recommended value, else 512].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .safetensors file.")
def command(model, radius, down_factor, data, generate, prompts, steps, lr, batch, grad_accum, resolution,
                      max_sequence_length, seed, device, dtype, output) -> None:
    """Distil CLEAR window-attention weights (teacher: full attention) in the official key layout."""
    from .. import load_pipeline
    from .clear import distill_clear, read_caption_folder

    if not data and not generate:
        raise click.UsageError("give --data DIR or --generate N")
    pipe = load_pipeline(model, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    prompt_list = None
    if prompts:
        prompt_list = [line.strip() for line in Path(prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
    path = distill_clear(
        pipe, radius, output, down_factor=down_factor, data=read_caption_folder(data) if data else None,
        generate=generate, prompts=prompt_list, steps=steps, lr=lr, batch=batch, grad_accum=grad_accum,
        resolution=resolution, max_sequence_length=max_sequence_length, seed=seed,
        log=lambda m: click.echo(m, err=True),
    )
    click.echo(str(path))
