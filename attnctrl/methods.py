"""Method configs, applied with ``attnctrl.apply(pipe, config)``, and the name -> config registry used by the CLI.

Each config is a frozen dataclass with the defaults of its paper's spec, validated on construction.
"""

from __future__ import annotations

from .core.controller import Method
from .core.errors import AttnCtrlError
from .processors.agent import AgentAttention
from .processors.attention_maps import AttentionMaps
from .processors.clear import CLEAR
from .processors.clora import CLoRA
from .processors.ditctrl import DiTCtrl
from .processors.freecustom import FreeCustom
from .processors.irdiffusion import IRDiffusion
from .processors.magicface import MagicFace
from .processors.primecomposer import PrimeComposer

__all__ = ["AgentAttention", "AttentionMaps", "CLEAR", "CLoRA", "DiTCtrl", "FreeCustom", "IRDiffusion", "MagicFace", "PrimeComposer", "REGISTRY", "get",
           "Method"]

#: CLI / job-file name -> method config class
REGISTRY: dict[str, type[Method]] = {
    cls.name: cls for cls in (AgentAttention, AttentionMaps, CLEAR, CLoRA, DiTCtrl, FreeCustom, IRDiffusion, MagicFace, PrimeComposer)
}


def get(name: str) -> type[Method]:
    """The method config class registered under ``name`` (e.g. ``"attention-maps"``)."""
    key = name.strip().lower().replace("_", "-")
    if key not in REGISTRY:
        raise AttnCtrlError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[key]
