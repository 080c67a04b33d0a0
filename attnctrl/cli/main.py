"""The ``attnctrl`` command line: ``info``, ``generate``, ``batch``, ``ui``, ``train-toy`` and ``distill``.

It stands on the run layer (:mod:`attnctrl.run`); ``ui`` and the ``distill`` tools are mounted by module path, so
the command line imports neither the web app nor any method.

User errors (bad options, unknown model, word not in prompt, ...) print one line ``Error: ...`` and exit with
status 1; a traceback means a bug in attnctrl.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import signal
import sys
import threading
import warnings
from pathlib import Path

import click

from .options import MethodCommand, given_inputs, input_flags, method_inputs, method_options

OFFLOAD_HELP = ("model: keep the model on the CPU and move each module to the GPU while it runs (for checkpoints "
                "larger than the GPU's memory); sequential: layer by layer (least memory, slowest).")
BACKEND_HELP = ("diffusers' attention backend for plain attention (native, flash, sage, xformers, ...; the "
                "GPU ones need their package) [default: auto, native SDPA].")
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def user_errors(fn):
    """Turn attnctrl's user errors into one-line click errors."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..core.errors import AttnCtrlError

        try:
            return fn(*args, **kwargs)
        except AttnCtrlError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


class _Lazy(click.Group):
    """A group whose commands live elsewhere (``{name: "module:command"}``), imported when used: the web app's
    command, and the training tools a method's registry entry names (``MethodEntry.command``)."""

    def __init__(self, *args, lazy=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._lazy = lazy

    def _table(self) -> dict:
        return self._lazy() if callable(self._lazy) else dict(self._lazy or {})

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self._table()})

    def get_command(self, ctx, name):
        target = self._table().get(name)
        if target is None:
            return super().get_command(ctx, name)
        import importlib

        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx):
        from ..core.errors import AttnCtrlError

        _quiet_libraries()
        with _notices():
            try:
                return super().invoke(ctx)
            except AttnCtrlError as e:
                raise click.ClickException(str(e)) from None


@contextlib.contextmanager
def _notices():
    """Show each :class:`~attnctrl.errors.AttnCtrlWarning` once, as one ``Warning: ...`` line on stderr."""
    from ..errors import AttnCtrlWarning

    seen: set[str] = set()
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, AttnCtrlWarning):
            return previous(message, category, filename, lineno, file, line)
        text = str(message)
        if text not in seen:
            seen.add(text)
            click.echo(f"Warning: {text}", err=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always", AttnCtrlWarning)
        warnings.showwarning = show
        yield


@click.group(cls=_Lazy, lazy={"ui": "attnctrl.ui.command:ui"}, context_settings=CONTEXT)
@click.version_option(package_name="attnctrl")
def cli() -> None:
    """Training-free attention-control plugins for diffusers."""


@cli.command(context_settings=CONTEXT)
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.option("--layers", "layers_model", metavar="MODEL", help="Also print the attention-layer table of MODEL.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@user_errors
def info(file: str | None, layers_model: str | None, as_json: bool) -> None:
    """Versions, device, attention backends, families and methods; with FILE, the settings stored in an output
    (a PNG's metadata or a JSON record / sidecar)."""
    from ..run import read_stored
    from .info import collect_info, format_info

    if file:
        data = read_stored(file)
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    data = collect_info()
    click.echo(json.dumps(data, indent=2) if as_json else format_info(data))
    if layers_model:
        _quiet_libraries()
        from .. import describe, load_pipeline

        layers = describe(load_pipeline(layers_model, device="cpu"))
        click.echo(f"\nattention layers of {layers_model}:\n{layers.summary()}")


@cli.command(cls=MethodCommand, context_settings=CONTEXT)
@click.option("-m", "--model", default=None, help="tiny-<family>, a local folder/file or a cached hub id "
              "[default: the embedded default model]")
@click.option("-p", "--prompt", "prompts", multiple=True,
              help="What to generate (a method that takes several prompts: repeat it, one per segment).")
@click.option("--from", "from_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Make an output again from the settings stored in it (a PNG written by attnctrl, a video's or a "
              "batch output's JSON); options given as well replace the stored ones.")
@click.option("-n", "--negative-prompt", default=None, help="What to avoid.")
@click.option("--seed", type=int, default=None, help="Seed of the first image (next images use seed+1, ...) "
              "[default: random]")
@click.option("--steps", type=click.IntRange(1, 1000), default=None,
              help="Denoising steps [default: the method's or the model's]")
@click.option("--guidance", type=float, default=None, help="Guidance scale [default: the method's or the model's]")
@click.option("--width", type=click.IntRange(8, 8192), default=None, help="Width in pixels (a multiple of 8; 16 for FLUX and CogVideoX).")
@click.option("--height", type=click.IntRange(8, 8192), default=None, help="Height in pixels (a multiple of 8; 16 for FLUX and CogVideoX).")
@click.option("--num-images", type=click.IntRange(1, 10000), default=1, show_default=True, help="Images to make.")
@click.option("--num-frames", type=click.IntRange(1, 1000), default=None, help="Frames (video models).")
@click.option("-o", "--output", "output", type=click.Path(file_okay=False), default="outputs", show_default=True,
              help="Output folder.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... or auto.")
@click.option("--dtype", default="auto", show_default=True, help="fp32, fp16, bf16 or auto.")
@click.option("--offload", default=None, metavar="MODE", help=OFFLOAD_HELP)
@click.option("--attention-backend", default=None, metavar="NAME", help=BACKEND_HELP)
@click.option("--no-metadata", is_flag=True, help="Do not embed settings in the PNG files.")
@click.option("--gif", is_flag=True, help="Videos: also write an animated GIF next to the MP4.")
@click.option("--method", default=None, help="Attention method to apply; `--method NAME --help` lists its options "
              "and inputs.")
@click.option("--opt", "opts", multiple=True, metavar="KEY=VALUE",
              help="An option of the method (repeat for several), e.g. --opt mask_weights=3,2.")
@method_inputs
@user_errors
@input_flags
def generate(model, prompts, from_file, negative_prompt, seed, steps, guidance, width, height, num_images, num_frames,
             output, device, dtype, offload, attention_backend, no_metadata, gif, method, opts, **inputs) -> None:
    """Generate images (or videos) with an optional attention method; writes PNGs with metadata."""
    _quiet_libraries()
    from ..run import Request, from_record, generate, read_record, validate

    given = dict(
        model=model, prompts=tuple(prompts) or None, negative_prompt=negative_prompt, method=method,
        options=method_options(method, opts) or None, inputs=given_inputs(inputs) or None, seed=seed, steps=steps,
        guidance=guidance, width=width, height=height, num_frames=num_frames,
    )
    settings = dict(num_images=num_images, output=Path(output), device=device, metadata=not no_metadata, gif=gif,
                    offload=offload, attention_backend=attention_backend)
    if from_file:
        path = Path(from_file)
        request = from_record(read_record(path), base=path.resolve().parent, **given, **settings,
                              dtype=None if dtype == "auto" else dtype)
    else:
        if not prompts:
            raise click.UsageError("give a prompt (-p TEXT), or --from FILE to make an output again")
        given.update(seed=seed if seed is not None else random.randrange(2**32), options=given["options"] or {},
                     inputs=given["inputs"] or {})
        request = Request(**given, **settings, dtype=dtype)
    for out in generate(validate(request)):
        click.echo(str(out.path))


@cli.command(context_settings=CONTEXT)
@click.argument("jobs", type=click.Path(dir_okay=False))
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="RUN.yaml: defaults for every job.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--resume", is_flag=True, help="Skip outputs that are complete (sidecar + output of the recorded size "
              "and hash) and finish the rest, whatever point a crash stopped the run at.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option("--dry-run", is_flag=True, help="Only print the expanded tasks and their output names.")
@click.option("--seeds", help="Comma-separated seeds for every job (overrides the job files).")
@click.option("--device", default=None, help="cpu, cuda, ... (default: the config's, else auto).")
@click.option("--dtype", default=None, help="fp32, fp16, bf16 (default: the config's, else auto).")
@click.option("--offload", default=None, metavar="MODE", help=OFFLOAD_HELP)
@click.option("--attention-backend", default=None, metavar="NAME", help=BACKEND_HELP)
@click.option("--no-metadata", is_flag=True, help="Do not embed settings in the PNG files.")
@user_errors
def batch(jobs, config_path, output, resume, overwrite, dry_run, seeds, device, dtype, offload, attention_backend,
          no_metadata) -> None:
    """Run a job file (JSONL, or a YAML/JSON list) over every method; resumable and reproducible."""
    _quiet_libraries()
    from ..run.batch import run_batch
    from ..run.jobs import parse_seeds

    seed_list = None if seeds is None else parse_seeds(seeds)
    with _sigterm_as_interrupt():
        try:
            counts = run_batch(jobs, output, config_path, resume=resume, overwrite=overwrite, dry_run=dry_run,
                               seeds=seed_list, device=device, dtype=dtype, metadata=False if no_metadata else None,
                               echo=lambda m: click.echo(m), offload=offload,
                               attention_backend=attention_backend)
        except KeyboardInterrupt as e:
            click.echo("interrupted: finished outputs are complete, nothing partial was left; run again with --resume",
                       err=True)
            sys.exit(143 if isinstance(e, Terminated) else 130)
    if not dry_run:
        click.echo(", ".join(f"{v} {k}" for k, v in counts.items()))
        if counts.get("error"):
            sys.exit(1)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or launcher's stop) taken the path of Ctrl-C: exit status 143 instead of 130."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While the block runs, SIGTERM raises :class:`Terminated` (so writes in progress are undone like on Ctrl-C);
    the previous handler is restored afterwards. Off the main thread (signals cannot be caught there) a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@cli.command("train-toy", context_settings=CONTEXT)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Run folder (checkpoints, "
              "scene pool, and the final diffusers folder in OUTPUT/model).")
@click.option("--minutes", type=click.FloatRange(0.1), default=90.0, show_default=True,
              help="Training-time budget, across resumes.")
@click.option("--resume", is_flag=True,
              help="Continue the run in OUTPUT with its own settings (raise --minutes to train longer).")
@click.option("--arch", type=click.Choice(["sd", "flux", "video"]), default=None,
              help="sd: the UNet (Stable Diffusion-like) model, 64 px; flux: a FLUX.1-like transformer (FluxPipeline, "
              "128 px) starting from --init's VAE and CLIP text encoder (the shipped model's by default); video: "
              "toyworld-video, a CogVideoX-like model of moving shapes (CogVideoXPipeline, 17 frames of 64 px), from "
              "scratch.  [default: sd; a resumed run keeps its own]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--pool-size", type=click.IntRange(64), default=None,
              help="Procedural scenes (clips for --arch video) drawn once and reused (with flips).  [default: 32768 "
              "scenes, 8192 clips]")
@click.option("--vae-minutes", type=click.FloatRange(0.05), default=None,
              help="Training time of the autoencoder, part of --minutes.  [default: the recipe's, 20]")
@click.option("--init", "init", default=None, metavar="FOLDER",
              help="Fine-tune a saved toyworld model folder (or 'toyworld', the shipped one) instead of training from "
              "scratch; its VAE is kept. With --arch flux: a UNet model gives the VAE and CLIP text encoder (default "
              "'toyworld'), a flux model is fine-tuned whole.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peak learning rate.  [default: the recipe's, 4e-4]")
@click.option("--look-alike", "look_alike", type=click.FloatRange(0, 1), default=None, metavar="FRACTION",
              help="Fraction of look-alike scenes in the pool (objects whose caption leaves out their look copy it "
              "from the others).  [default: 0]")
@click.option("--grounding", type=click.FloatRange(0), default=None, metavar="WEIGHT",
              help="Weight of the token grounding loss (object words' cross-attention pulled inside their objects).  "
              "[default: 0]")
@click.option("--references", type=click.FloatRange(0, 1), default=None, metavar="FRACTION",
              help="Fraction of each batch trained with in-context references (objects named without their look "
              "copy it from a masked reference in the decoder self-attention).  [default: 0]")
def train_toy(output, minutes, resume, arch, seed, pool_size, vae_minutes, init, lr, look_alike, grounding,
              references) -> None:
    """Train the toyworld text-to-image model on CPU, from scratch or from a saved model (--init)."""
    _quiet_libraries()
    from ..models.toyworld.train import train

    ctx = click.get_current_context()
    given = [f"--{n.replace('_', '-')}" for n in ("seed", "pool_size", "look_alike")
             if ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT]
    if resume and given:
        raise click.ClickException(f"a resumed run keeps its own {' and '.join(given)}; leave them out with --resume")
    overrides = {} if resume else {"seed": seed}
    given_values = {"arch": arch, "pool_size": pool_size, "vae_minutes": vae_minutes, "init": init, "lr": lr,
                    "look_alike_fraction": look_alike, "grounding_weight": grounding, "reference_fraction": references}
    overrides.update({k: v for k, v in given_values.items() if v is not None})
    try:
        path = train(output, minutes=minutes, resume=resume, log=lambda m: click.echo(m, err=True), **overrides)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(str(path))


def _method_commands() -> dict:
    from ..methods import entries

    return {e.name: e.command for e in entries() if e.command}


cli.add_command(_Lazy("distill", lazy=_method_commands, context_settings=CONTEXT,
                      help="Train the weights a method needs (its registry entry names the command)."))


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    try:
        cli.main(args=argv, prog_name="attnctrl", standalone_mode=True)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
