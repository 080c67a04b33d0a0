"""``CLoRAPipeline``: several LoRAs composed by contrastive attention steering and masked fusion.

    clora = attnctrl.pipelines.CLoRAPipeline.from_pipe(pipe)
    image = clora(
        prompts=["a cat and a dog", "a sks dog and a cat", "a zwx cat and a dog"],
        loras=[None, "dog.safetensors", "cat.safetensors"],      # a file path, or a name loaded with load_lora()
        concepts=[["cat", "cat", "zwx cat"], ["dog", "sks dog", "dog"]],   # per concept, its words in each prompt
        mask_words=[[], ["sks dog"], ["zwx cat"]],                          # per prompt, the words of its mask
    ).images[0]

LoRAs are loaded through diffusers' PEFT path (``load_lora_weights(path, adapter_name=...)``) and switched per
branch with ``set_adapters``; weights are never merged. Words are resolved to token indices by the core lookup (the
official notebook's hand-written indices are off by one, spec §10). The denoising loop is this module's own (it runs
N UNet passes per step on one latent, updates the latent by autograd while ``step < max_iter_to_alter`` and runs
without autograd afterwards; the official code keeps graphs on every pass). As in the official code, the noise
predictions fused at a step are those of the last forward pass, i.e. before the last latent update of that step.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.controller import bind
from ..core.errors import AttnCtrlError, notice
from ..core.tokens import token_indices
from ..errors import quiet_libraries
from ..processors.clora import CLoRA, CLoRAState, CrossAttnRecorder, fusion_mask_warning, lora_masks, min_max, nt_xent
from .base import MethodPipeline, call_config, check_callback, decode, run_callback

__all__ = ["CLoRAPipeline", "CLoRAState"]


class CLoRAPipeline(MethodPipeline):
    """See the module docstring; built with ``CLoRAPipeline.from_pipe(pipe)`` from an SD 1.x/2.x or SDXL pipeline.

    The loop is this pipeline's own, with the base pipeline's contract: ``output_type`` (``"pil"``, ``"np"``,
    ``"pt"``, ``"latent"``), ``return_dict`` (``False``: ``(images, None)``), ``callback_on_step_end`` called once
    per step after the scheduler step with ``callback_on_step_end_tensor_inputs`` from ``["latents"]`` (the
    returned ``latents`` replace the latent); ``num_images_per_prompt`` must be 1 (one fused image per call).
    """

    _loop_tensor_inputs = ("latents",)

    config_class = CLoRA

    def shown_masks(self):
        """The fusion masks of the LoRA branches (branch 0, the base prompt, holds the background)."""
        masks = getattr(self, "last_masks", None)
        return None if masks is None else masks[1:]

    # -- LoRAs -------------------------------------------------------------------------------------------------------
    def load_lora(self, path, adapter_name: str | None = None) -> str:
        """Load a LoRA file through diffusers' PEFT path; returns its adapter name (the file stem by default)."""
        path = Path(path)
        if not path.is_file():
            raise AttnCtrlError(f"LoRA file {path} does not exist")
        name = adapter_name or path.stem.replace(".", "_")
        loaded = {n for names in self.get_list_adapters().values() for n in names}
        if name in loaded:
            return name
        try:
            with quiet_libraries():  # diffusers logs every mismatched weight before it raises
                self.load_lora_weights(str(path), adapter_name=name)
        except Exception as e:  # diffusers/peft raise many types for files of another model
            raise AttnCtrlError(f"LoRA {path.name} does not fit this model: {_lora_mismatch(e)}") from None
        return name

    def _activate(self, lora: str | None, style: str | None, style_weight: float) -> None:
        names, weights = ([lora], [1.0]) if lora else ([], [])
        if style:
            names.append(style)
            weights.append(style_weight)
        if names:
            self.enable_lora()
            self.set_adapters(names, adapter_weights=weights)
        elif self.get_list_adapters():
            self.disable_lora()

    # -- prompts -----------------------------------------------------------------------------------------------------
    def _resolve(self, prompts, concepts, mask_words):
        tok = self.tokenizer
        samples = []  # (prompt index, token index, class)
        counts = []
        for c, per_prompt in enumerate(concepts):
            if len(per_prompt) != len(prompts):
                raise AttnCtrlError(f"concept {c + 1} names {len(per_prompt)} words for {len(prompts)} prompts; use "
                                    f"None where a prompt lacks it")
            found = 0
            for p, word in enumerate(per_prompt):
                if word:
                    try:
                        idx = token_indices(tok, prompts[p], word)
                    except AttnCtrlError as e:
                        raise type(e)(f"prompt {p + 1}: {e}") from None
                    samples += [(p, k, c) for k in idx]
                    found += len(idx)
            if not found:
                raise AttnCtrlError(f"concept {c + 1} is named in no prompt")
            counts.append(found)  # a concept found once is only a negative (official)
        if counts and max(counts) < 2:
            raise AttnCtrlError("no positive pair: name some concept in at least two prompts")
        masks = []
        for p, words in enumerate(mask_words):
            ids = []
            for word in words or ():
                try:
                    ids += token_indices(tok, prompts[p], word)
                except AttnCtrlError as e:
                    raise type(e)(f"prompt {p + 1} mask: {e}") from None
            masks.append(ids)
        return samples, masks

    @staticmethod
    def loss(maps: torch.Tensor, samples, temperature: float) -> torch.Tensor:
        """NT-Xent over the min-max normalised maps of the concept tokens (spec §3.4)."""
        vectors = torch.stack([min_max(maps[p, :, :, k].flatten()) for p, k, _ in samples])
        labels = torch.tensor([c for _, _, c in samples], device=maps.device)
        return nt_xent(vectors, labels, temperature)

    # -- the call ----------------------------------------------------------------------------------------------------
    def __call__(self, prompts, loras, concepts, mask_words, negative_prompt=None, style_lora=None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, height=None, width=None, generator=None,
                 latents=None, output_type: str = "pil", return_dict: bool = True, num_images_per_prompt: int = 1,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",), **options):
        config = call_config(CLoRA, options.pop("config", None), options)
        if num_images_per_prompt != 1:
            raise AttnCtrlError("CLoRA makes one fused image per call; loop over seeds for more")
        callback_inputs = check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs,
                                         self._loop_tensor_inputs)
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise AttnCtrlError("prompts must be a list of strings, one per LoRA branch")
        loras = list(loras)
        mask_words = list(mask_words)
        if not (len(loras) == len(mask_words) == len(prompts)):
            raise AttnCtrlError(f"give one LoRA (or None) and one mask-word list per prompt: {len(prompts)} prompts, "
                                f"{len(loras)} LoRAs, {len(mask_words)} mask lists")
        steering = config.step_size > 0 and config.max_iter_to_alter > 0 and bool(concepts)
        samples, mask_tokens = self._resolve(prompts, concepts or [], mask_words) if concepts else ([], None)
        if mask_tokens is None:
            _, mask_tokens = self._resolve(prompts, [], mask_words)
        names = [self.load_lora(x) if x and (Path(str(x)).suffix or "/" in str(x)) else (x or None) for x in loras]
        style = self.load_lora(style_lora) if style_lora and Path(str(style_lora)).suffix else style_lora
        loaded = {n for ns in self.get_list_adapters().values() for n in ns}
        for n in [*names, style]:
            if n and n not in loaded:
                raise AttnCtrlError(f"LoRA {n!r} is not loaded: pass a .safetensors path or call load_lora() first")
        device = self._execution_device
        default = (getattr(self, "default_sample_size", None) or self.unet.config.sample_size) * self.vae_scale_factor
        height, width = int(height or default), int(width or default)
        negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt] * len(prompts)

        embeds, pooled = [], []
        for j, prompt in enumerate(prompts):
            self._activate(names[j] if config.text_encoder_lora else None, style, config.style_lora_weight)
            e, p = self.encode_cfg(prompt, device, negatives[j])
            embeds.append(e)
            pooled.append(p)
        dtype = embeds[0].dtype
        scheduler = self.scheduler
        scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        shape = (1, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            from diffusers.utils.torch_utils import randn_tensor

            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        z = latents.to(device, dtype) * scheduler.init_noise_sigma
        added = None
        if self._sdxl:
            time_ids = self._get_add_time_ids((height, width), (0, 0), (height, width), dtype=dtype,
                                              text_encoder_projection_dim=self.text_encoder_2.config.projection_dim)
            added = [{"text_embeds": p, "time_ids": time_ids.to(device).repeat(2, 1)} for p in pooled]

        state = CLoRAState(config.record_uncond)
        handle = bind(self, config, state, CrossAttnRecorder)
        self.unet_calls = 0

        def branches(z_in, t):
            eps, maps = [], []
            x = scheduler.scale_model_input(torch.cat([z_in, z_in]), t)
            for j in range(len(prompts)):
                self._activate(names[j], style, config.style_lora_weight)
                state.recording = True
                out = self.unet(x, t, encoder_hidden_states=embeds[j],
                                added_cond_kwargs=added[j] if added else None, return_dict=False)[0]
                state.recording = False
                self.unet_calls += 1
                eps.append(out)
                maps.append(state.take())
            return torch.stack(eps), torch.stack(maps)

        fused_masks = None
        coverage, masked_steps = 0.0, 0  # mean fraction of the latent each fusion mask covers (degenerate masks)
        try:
            with self.progress_bar(total=len(timesteps)) as bar:
                for i, t in enumerate(timesteps):
                    update = steering and i < config.max_iter_to_alter
                    with torch.set_grad_enabled(update):
                        if update:
                            z = z.detach().requires_grad_(True)
                        eps, maps = branches(z, t)
                        if update:
                            rounds = 1 + (config.iterative_steps_steps if i in config.iterative_steps else 0)
                            for r in range(rounds):
                                loss = self.loss(maps, samples, config.temperature)
                                (grad,) = torch.autograd.grad(loss, z)
                                z = (z - config.step_size * grad).detach().requires_grad_(r < rounds - 1)
                                if r < rounds - 1:
                                    eps, maps = branches(z, t)
                    z = z.detach()
                    eps, maps = eps.detach(), maps.detach()
                    if i >= config.apply_mask_after:
                        masks = lora_masks(maps, mask_tokens, config.mask_threshold, **config.morphology())
                    else:
                        masks = torch.ones(len(prompts), *maps.shape[1:3], device=maps.device, dtype=maps.dtype)
                    fused_masks = masks
                    m = F.interpolate(masks[:, None], size=z.shape[-2:], mode="nearest").to(eps.dtype)  # (N,1,h,w)
                    if i >= config.apply_mask_after:
                        coverage, masked_steps = coverage + m.float().flatten(1).mean(1), masked_steps + 1
                    m = m[:, None]  # (N, 1, 1, h, w) against eps (N, 2, C, h, w)
                    eps_u = (m * eps[:, 0:1]).sum(0) / m.sum(0)
                    eps_c = (m * eps[:, 1:2]).sum(0) / m.sum(0)
                    noise = eps_u + guidance_scale * (eps_c - eps_u)
                    z = scheduler.step(noise, t, z, return_dict=False)[0]
                    z = run_callback(self, callback_on_step_end, callback_inputs, i, t, {"latents": z})["latents"]
                    bar.update()
        finally:
            handle.remove()  # the LoRAs this call loaded and the adapters' state: restored by keeping_shared_state
        self.last_masks = fused_masks
        message = fusion_mask_warning(coverage / max(masked_steps, 1), masked_steps, mask_words)
        if message:
            notice(message)
        images = decode(self, z, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, None)
        from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)


def _lora_mismatch(error: Exception) -> str:
    """One sentence for a LoRA load failure (PyTorch lists every mismatched weight on its own line)."""
    import re

    text = str(error).strip()
    sizes = re.findall(r"size mismatch for (\S+): copying a param with shape torch.Size\((\[[^\]]*\])\) from "
                       r"checkpoint, the shape in current model is torch.Size\((\[[^\]]*\])\)", text)
    if sizes:
        key, theirs, ours = sizes[0]
        return (f"{len(sizes)} of its weights have other shapes than the model's (e.g. {key}: {theirs} in the file, "
                f"{ours} in the model); it was trained for another base model")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:2])[:300] if lines else type(error).__name__


def branches(prompt: str, loras) -> tuple[list, list, list, list]:
    """``(prompts, loras, concepts, mask_words)`` of :meth:`CLoRAPipeline.__call__` from a base prompt and
    :class:`~attnctrl.inputs.LoraBranch` records.

    Branch 0 is the base prompt without a LoRA. LoRA k's concept is its trigger words (e.g. "sks dog") in its own
    prompt and their last word (the class noun, "dog") in every other prompt that contains it; its mask is named by
    its trigger words.
    """
    import re

    prompts = [prompt] + [b.prompt for b in loras]
    paths = [None] + [b.path for b in loras]
    words = [b.words for b in loras]
    concepts = []
    for k, word in enumerate(words):
        noun = word.split()[-1]
        concepts.append([word if j == k + 1 else (noun if re.search(rf"\b{re.escape(noun)}\b", p, flags=re.IGNORECASE)
                                                  else None) for j, p in enumerate(prompts)])
    return prompts, paths, concepts, [[]] + [[w] for w in words]
