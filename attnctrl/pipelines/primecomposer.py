"""``PrimeComposerPipeline``: put a reference object into a background at a location (SD 2.1 / 1.5 / SDXL).

    pc = attnctrl.pipelines.PrimeComposerPipeline.from_pipe(pipe)
    image = pc(background="bg.png", reference="obj.png", reference_mask="obj_mask.png", location=(96, 64, 224, 192),
               prompt="a photo of a dog on the grass", domain="same").images[0]

Steps (spec §3-6): the object (the reference masked and cropped) is scaled to fit the location box and centred in it
on a black canvas (same domain: also pasted into the background); background and canvas are inverted with
DPM-Solver++(2M) in continuous time (:mod:`.dpm_solver`) under the "exceptional prompt" (token 7788 everywhere,
no position embeddings, through the pipeline's own text encoder); the generator starts from the inverted
background outside the box and the inverted object (cross) or background (same) inside, noise elsewhere in the
box. At each of the 20 steps: while ``step < A`` the correlation diffuser runs on the canvas whose object pixels
carry the latent before the update and its logits steer the generator's self-attention; the generator pass runs with CFG
(and RCA); after each update the latent is blended with the inverted background outside the box while
``step < B``, and the object pixels are taken from the canvas while ``step < C`` (spec §6 step 3). Finally the background outside
the location is pasted back exactly (``paste_back``).

Decisions (spec §8), each a documented difference from the official code: the canvas places the object at the
location itself (the official centres it and reuses flat indices across the two layouts), so CD queries and
generator keys share coordinates; the CD pass runs two items (the official runs 4, two of which cannot affect the
stored logits); inversion runs one item (conditional = unconditional there); the box is clipped at the image edges
(the official slicing drops the last row/column); ``tau_c`` keeps the official blending (object pixels from the
reference's inverted latent, overwritten by the pre-update object while the CD runs, so frozen while ``step < A``;
the box ring reset to background) unless ``freeze_object=False`` (object pixels follow the reference's inversion
at every ``step < C``); RCA is on when ``rca_words`` are given. Kept as in the official code: the CD canvas carries
the object of the latent *before* the update (the warm-up NFEs 0 and 1 use ``L_ref[0]`` as is) and no blending
after the two warm-up updates. Not kept: the warm-up's x0-predictions outside the box replaced by noisy latents
(spec §8.5, a type mismatch), and the inversion lists ending in two x0-predictions (§4; never reached for
``tau < 0.95``).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..core.controller import bind
from ..core.errors import AttnCtrlError
from ..core.masks import box_mask, is_box, is_fraction_box, load_mask, mask_box
from ..core.tokens import token_indices
from ..processors.primecomposer import PrimeComposer, PrimeComposerAttnProcessor, PrimeState
from .base import MethodPipeline, call_config, check_callback, decode, encode, run_callback
from .dpm_solver import DPMSolverPP
from .reference import _load_image

__all__ = ["PrimeComposerPipeline", "exceptional_embedding", "composition_geometry"]


def composition_geometry(background, reference, reference_mask, location, height: int, width: int):
    """Background, reference canvas, object mask and location mask at ``height x width`` (pixels, aligned).

    A location box in pixels is in the background's pixels (it is scaled with the background); fractions and masks
    are relative to the image."""
    bg = _load_image(background, "background")
    if is_box(location):
        if not is_fraction_box(location):
            sx, sy = width / bg.width, height / bg.height
            location = (location[0] * sx, location[1] * sy, location[2] * sx, location[3] * sy)
    bg = bg.resize((width, height), Image.LANCZOS)
    ref = _load_image(reference, "reference")
    if reference_mask is None:
        obj_mask = torch.ones(ref.height, ref.width)
    else:
        obj_mask = load_mask(reference_mask)
        if tuple(obj_mask.shape) != (ref.height, ref.width):
            raise AttnCtrlError(f"the reference mask is {obj_mask.shape[1]}x{obj_mask.shape[0]} but the reference "
                                f"is {ref.width}x{ref.height}")
    obj_box = mask_box(obj_mask)
    if obj_box is None:
        raise AttnCtrlError("the reference mask is empty")
    if isinstance(location, (tuple, list)) and len(location) == 4:
        try:
            loc = box_mask(location, (height, width))
        except AttnCtrlError as e:
            raise AttnCtrlError(f"location: {e}") from None
    else:
        loc = load_mask(location)
        loc = (F.interpolate(loc[None, None], size=(height, width), mode="nearest")[0, 0] > 0.5).float()
    box = mask_box(loc)
    if box is None:
        raise AttnCtrlError("the location is empty or lies outside the image")
    x0, y0, x1, y1 = box
    # the object: cropped to its mask, scaled to fit inside the box (aspect kept), centred in the box
    ox0, oy0, ox1, oy1 = obj_box
    crop = ref.crop((ox0, oy0, ox1, oy1))
    crop_mask = obj_mask[oy0:oy1, ox0:ox1]
    scale = min((x1 - x0) / crop.width, (y1 - y0) / crop.height)
    w, h = max(1, round(crop.width * scale)), max(1, round(crop.height * scale))
    px, py = x0 + (x1 - x0 - w) // 2, y0 + (y1 - y0 - h) // 2
    canvas = Image.new("RGB", (width, height))
    canvas.paste(crop.resize((w, h), Image.LANCZOS), (px, py))
    object_mask = torch.zeros(height, width)
    object_mask[py : py + h, px : px + w] = F.interpolate(crop_mask[None, None], size=(h, w), mode="nearest")[0, 0]
    return bg, canvas, object_mask, loc, box


def exceptional_embedding(pipe, token_id: int = 7788):
    """TF-ICON's "exceptional prompt": one token repeated over the whole context, WITHOUT position embeddings,
    through the text encoder(s) as the pipeline encodes prompts (spec §4). Returns ``(embeds, pooled_or_None)``.

    A tokenizer without that id (a small vocabulary) uses its end-of-text token instead."""

    def run(encoder, tokenizer, penultimate: bool):
        tid = token_id if token_id < encoder.config.vocab_size else tokenizer.eos_token_id
        ids = torch.full((1, tokenizer.model_max_length), tid, device=encoder.device)
        embeddings = getattr(encoder, "text_model", encoder).embeddings
        positions = torch.arange(ids.shape[1], device=encoder.device)[None]

        def drop_positions(module, args, output):  # the exceptional prompt has no position embeddings
            return output - module.position_embedding(positions)

        hook = embeddings.register_forward_hook(drop_positions)
        try:
            out = encoder(ids, output_hidden_states=True)
        finally:
            hook.remove()
        pooled = getattr(out, "text_embeds", None)
        return (out.hidden_states[-2] if penultimate else out.last_hidden_state), pooled

    with torch.no_grad():
        if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: both encoders' penultimate layers
            e1, _ = run(pipe.text_encoder, pipe.tokenizer, True)
            e2, pooled = run(pipe.text_encoder_2, pipe.tokenizer_2, True)
            return torch.cat([e1, e2], -1), pooled
        embeds, _ = run(pipe.text_encoder, pipe.tokenizer, False)
        return embeds, None


class PrimeComposerPipeline(MethodPipeline):
    """See the module docstring; built with ``PrimeComposerPipeline.from_pipe(pipe)`` from an SD 1.x/2.x or SDXL
    pipeline.

    The loop is this pipeline's own (two inversions, then the composition), with the base pipeline's contract:
    ``output_type`` (``"pil"``, ``"np"``, ``"pt"``; ``"latent"`` returns the final latent, before the pixel-space
    ``paste_back``), ``return_dict`` (``False``: ``(images, None)``), ``callback_on_step_end`` called once per
    composition step (not during the inversions) after the step's blending, with ``callback_on_step_end_tensor_inputs``
    from ``["latents"]`` (the returned ``latents`` replace the latent); ``num_images_per_prompt`` must be 1.
    """

    config_class = PrimeComposer
    _loop_tensor_inputs = ("latents",)

    def _unet(self, x, t, embeds, pooled, size):
        added = None
        if self._sdxl:
            time_ids = self._get_add_time_ids(
                size, (0, 0), size, dtype=embeds.dtype,
                text_encoder_projection_dim=self.text_encoder_2.config.projection_dim,
            ).to(x.device).repeat(x.shape[0], 1)
            added = {"text_embeds": pooled.expand(x.shape[0], -1) if pooled.shape[0] == 1 else pooled,
                     "time_ids": time_ids}
        self.unet_samples += x.shape[0]
        t_in = torch.full((x.shape[0],), float(t), device=x.device)
        return self.unet(x, t_in, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]

    @torch.no_grad()
    def __call__(self, background, reference, reference_mask=None, location=None, prompt: str = "",
                 num_inference_steps: int = 20, guidance_scale: float | None = None, height=None, width=None,
                 generator=None, output_type: str = "pil", return_dict: bool = True, freeze_object: bool = True,
                 negative_prompt: str | None = None, num_images_per_prompt: int = 1, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), **options):
        from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

        config = call_config(PrimeComposer, options.pop("config", None), options)
        if num_images_per_prompt != 1:
            raise AttnCtrlError("PrimeComposer makes one composite per call; loop over seeds for more")
        callback_inputs = check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs,
                                         self._loop_tensor_inputs)
        if location is None:
            raise AttnCtrlError("give a location: a mask, or a box (x0, y0, x1, y1) in pixels or fractions")
        if num_inference_steps < 2:
            raise AttnCtrlError("PrimeComposer needs at least 2 steps")
        taus = config.resolved()
        guidance = taus["guidance_scale"] if guidance_scale is None else guidance_scale
        default = (getattr(self, "default_sample_size", None) or self.unet.config.sample_size) * self.vae_scale_factor
        height, width = int(height or default), int(width or default)
        rca = [i for w in config.rca_words for i in token_indices(self.tokenizer, prompt, w)]
        bg, canvas, object_px, loc_px, _ = composition_geometry(background, reference, reference_mask, location,
                                                                height, width)
        if config.domain == "same":  # spec §3: the object is pasted into the photo first
            m = object_px.numpy()[..., None]
            bg = Image.fromarray((np.asarray(bg) * (1 - m) + np.asarray(canvas) * m).round().astype(np.uint8))
        device = self._execution_device
        f = self.vae_scale_factor
        lh, lw = height // f, width // f
        obj = object_px[::f, ::f][:lh, :lw] > 0.5
        lbox = mask_box(loc_px[::f, ::f][:lh, :lw]) or (0, 0, lw, lh)
        box = (lbox[1], lbox[0], lbox[3], lbox[2])  # (y0, x0, y1, x1)
        in_box = torch.zeros(lh, lw, dtype=torch.bool)
        in_box[box[0] : box[2], box[1] : box[3]] = True
        obj = obj & in_box
        M = obj.to(device=device, dtype=self.unet.dtype)[None, None]
        B = in_box.to(device=device, dtype=self.unet.dtype)[None, None]

        self.unet_samples = 0
        started = time.perf_counter()
        ex_embeds, ex_pooled = exceptional_embedding(self, config.exceptional_token)
        ex_embeds = ex_embeds.to(device, self.unet.dtype)
        size = (height, width)
        solver = DPMSolverPP(self.scheduler.alphas_cumprod, steps=num_inference_steps,
                             prediction_type=self.scheduler.config.get("prediction_type", "epsilon"))

        def invert(z0):
            lat = solver.run(z0, lambda x, i, t: self._unet(x, t, ex_embeds, ex_pooled, size), invert=True)
            return lat[::-1]  # decode order: index k holds the latent at grid time tau_k

        L_bg = invert(encode(self, bg))
        L_ref = invert(encode(self, canvas))  # both domains invert the reference canvas (spec §4)

        embeds, pooled = self.encode_cfg(prompt, device, negative_prompt or "")  # official: "" for the uncond half
        S = num_inference_steps
        A = int(taus["tau_a"] * S + 1 - 2)
        C = int(taus["tau_c"] * S + 1 - 2)
        Bs = int(taus["tau_b"] * S + 1 - 2)
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(L_bg[0].shape, generator=generator, device=device, dtype=L_bg[0].dtype)
        start = L_bg[0] if config.domain == "same" else L_ref[0]  # same: the inverted composite (spec §5)
        z = L_bg[0] * (1 - B) + B * (M * start + (1 - M) * noise)
        state = PrimeState(obj, box, rca)
        latest = [z]  # the generator latent before the update now being evaluated

        def eps_fn(x, i, t):
            state.inject = i < A
            if state.inject:  # correlation diffuser on the canvas carrying the pre-update object pixels (§6.1)
                R = L_ref[0] if i < 2 else M * latest[0] + (1 - M) * L_ref[i]  # warm-up NFEs: L_ref[0] as is
                state.mode = "cd"
                self._unet(torch.cat([R, R]), t, embeds, pooled, size)
            state.mode = "gen"
            out = self._unet(torch.cat([x, x]), t, embeds, pooled, size)
            state.mode = "plain"
            state.logits.clear()
            eps_u, eps_c = out.chunk(2)
            return eps_u + guidance * (eps_c - eps_u)

        def blend(s, x, before):
            if 2 <= s < C:  # official: the object from L_ref[s] as the CD left it, i.e. the pre-update object while
                source = before if freeze_object and s < A else L_ref[s]  # the CD runs (frozen), else the inversion
                x = (M * source + (1 - M) * L_bg[s]) * B + L_bg[s] * (1 - B)
            elif 2 <= s < Bs:  # the box keeps the generator latent; the warm-up steps 0-1 are not blended
                x = x * B + L_bg[s] * (1 - B)
            if callback_on_step_end is not None:  # step s - 1 made this latent, predicting at grid time s - 1
                t = solver.schedule.model_time(solver.times[s - 1]).to(torch.float32)
                x = run_callback(self, callback_on_step_end, callback_inputs, s - 1, t, {"latents": x})["latents"]
            latest[0] = x
            return x

        with bind(self, config, state, PrimeComposerAttnProcessor):
            z = solver.run(z, eps_fn, on_step=blend)[-1]
        self.last_schedule = {"A": A, "B": Bs, "C": C, "steps": S, "guidance_scale": guidance}
        if output_type == "latent":
            images = z
        else:
            image = decode(self, z, output_type=None)
            if config.paste_back:  # exact background outside the location (spec §6: the last steps run free)
                bg_t = self.image_processor.preprocess(bg).to(image.device, image.dtype)
                loc = loc_px.to(image.device, image.dtype)[None, None]
                image = image * loc + bg_t * (1 - loc)
            images = self.image_processor.postprocess(image, output_type=output_type)
        self.last_seconds = time.perf_counter() - started
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, None)
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)
