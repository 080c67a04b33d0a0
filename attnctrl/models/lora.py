"""Small LoRA utilities: random (untrained) LoRA files for tests and examples, saved in diffusers' format."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["random_lora", "save_unet_lora", "LORA_TARGETS"]

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

_MISSING = object()


def random_lora(pipe, path, rank: int = 4, seed: int = 0, scale: float = 0.5) -> Path:
    """Write a LoRA for ``pipe``'s UNet with random, non-zero A and B (so it changes the output) to ``path``.

    It goes through PEFT (``LoraConfig``) and ``save_lora_weights``, i.e. the layout ``load_lora_weights`` reads.
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = pipe.unet
    name = "attnctrl_random"
    had_peft = hasattr(unet, "peft_config")
    loaded_flag = vars(unet).get("_hf_peft_config_loaded", _MISSING)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS), init_lora_weights=False),
                     adapter_name=name)
    try:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in unet.named_parameters():
                if name in pname and "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
        state = get_peft_model_state_dict(unet, adapter_name=name)
    finally:
        unet.delete_adapters(name)
        if not had_peft:  # the UNet had no LoRA: its very modules back, no PEFT layers left (pipe as it was)
            unet.unload_lora()
            if loaded_flag is _MISSING:
                vars(unet).pop("_hf_peft_config_loaded", None)
            else:
                unet._hf_peft_config_loaded = loaded_flag
    return save_unet_lora(pipe, state, path)


def save_unet_lora(pipe, state: dict, path) -> Path:
    """Write a UNet LoRA state dict (PEFT's ``get_peft_model_state_dict``) to ``path`` with ``save_lora_weights``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(str(path.parent), unet_lora_layers=state, weight_name=path.name,
                                 safe_serialization=True)
    return path
