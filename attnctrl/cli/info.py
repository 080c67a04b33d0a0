"""``attnctrl info``: what this installation can do."""

from __future__ import annotations

import importlib.metadata as md
import platform

import torch

__all__ = ["collect_info", "format_info"]

_PACKAGES = ("attnctrl", "torch", "diffusers", "transformers", "accelerate", "peft", "gradio", "xformers", "triton")


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def collect_info() -> dict:
    from ..core.families import FAMILIES
    from ..methods import entries
    from ..models import DEFAULT_MODEL, TINY_FAMILIES

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else None,
        "cpu_threads": torch.get_num_threads(),
        "attention_backends": _backends(torch.device("cuda" if cuda else "cpu")),
        "families": {f.name: f.title for f in FAMILIES.values()},
        "tiny_models": ["tiny-" + f for f in TINY_FAMILIES],
        "default_model": DEFAULT_MODEL,
        "methods": {e.name: {"title": e.title, "summary": e.summary, "families": list(e.families),
                             "inputs": list(e.inputs), "video": e.video, "pipeline": e.pipeline}
                    for e in sorted(entries(), key=lambda e: e.name)},
    }


def _backends(device: torch.device) -> list[str]:
    """The public backends of diffusers' attention dispatcher that can run here (``--attention-backend``)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    from ..core.errors import AttnCtrlError
    from ..models import check_attention_backend

    usable = []
    for name in (b.value for b in AttentionBackendName if not b.value.startswith("_")):
        try:
            usable.append(check_attention_backend(name, device))
        except AttnCtrlError:
            pass
    return usable


def format_info(data: dict) -> str:
    pk = data["packages"]
    lines = [
        f"attnctrl {pk['attnctrl']}  (python {data['python']}, {data['platform']})",
        "packages: " + ", ".join(f"{k} {v}" for k, v in pk.items() if v and k != "attnctrl"),
        "not installed: " + (", ".join(k for k, v in pk.items() if not v) or "-"),
        f"device: {data['device']}" + (f" (CUDA {data['cuda']})" if data["cuda"] else f", {data['cpu_threads']} threads"),
        "attention backends: " + ", ".join(data["attention_backends"]),
        "model families: " + "; ".join(f"{k} = {v}" for k, v in data["families"].items()),
        "tiny models: " + ", ".join(data["tiny_models"]),
        f"default model: {data['default_model']}",
        "methods (attnctrl generate --method NAME --help):",
        *(f"  {name:15s} {m['summary']} [{', '.join(m['families'])}]" for name, m in data["methods"].items()),
    ]
    return "\n".join(lines)
