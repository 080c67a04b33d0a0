"""``DiTCtrlPipeline``: multi-prompt long video on CogVideoX (2B sincos and 5B RoPE families).

    dc = attnctrl.pipelines.DiTCtrlPipeline.from_pipe(cogvideox_pipe)
    video = dc(["a knight walks in a forest", "a knight rides a horse in a forest"], num_frames=49).frames[0]

The long latent is covered by overlapping segments of ``num_frames`` frames (spec §3): each prompt gets one segment
(``1 + longer_mid_segment`` for middle prompts) and ``num_transition_blocks`` segments with linearly interpolated
text embeddings lie between two prompts. Every step (spec §4): each adjacent pair of segments is denoised jointly,
the later one reading the earlier one's keys and values in the sharing window (``kv_steps`` x ``kv_layers``); the
model outputs are blended over the overlaps with triangular per-frame weights ``min((2i+1)/F, 2-(2i+1)/F)``; one
scheduler step runs on the whole long latent. Because CogVideoX predicts ``v`` and ``x0 = a_t x_t - b_t v`` is affine
with a shared ``t``, blending the CFG-guided ``v`` equals the official blending of ``x0``. A single prompt is
exactly ``CogVideoXPipeline`` (the official repeats it over a long video: pass ``[p] * L`` for that).

As the official sampler (spec §2, §9): several prompts sample with ``CogVideoXDPMScheduler`` (DPM++ 2M SDE) built
from the pipeline's scheduler config, whatever scheduler the pipeline carries; the long latent stays float32 (the
model runs in its own dtype); the unconditional text embeddings are zeros unless a ``negative_prompt`` is given
(official ``force_uc_zero_embeddings``). Decision: mask-guided attention finds its tokens by ``subject_words`` (one
word for all prompts or one per prompt; every occurrence; a transition segment uses its nearer prompt's) instead of
the official fixed raw ``ref_token_idx`` / ``cur_token_idx`` positions.

De-duplication (spec §12, the default): outside the sharing window every segment is computed once per step instead
of once per pair it belongs to (a middle segment twice); its output enters the blend with the same multiplicity, in
the same order, so the result equals the naive pair loop (up to float rounding of different batch sizes).
"""

from __future__ import annotations

import math

import torch

from ..core.controller import bind
from ..core.errors import AttnCtrlError, UnsupportedModelError
from ..core.tokens import token_indices
from ..processors.ditctrl import DiTCtrl, DiTCtrlAttnProcessor, DiTCtrlState
from .base import MethodPipeline, call_config, check_callback, decode, run_callback

__all__ = ["DiTCtrlPipeline", "plan_segments", "triangular_weights"]


def plan_segments(n_prompts: int, transitions: int, longer_mid: int) -> list[tuple[int, int, float]]:
    """Segments as ``(prompt_a, prompt_b, w)``: the embedding is ``(1 - w) c_a + w c_b`` (spec §3)."""
    segments = []
    for i in range(n_prompts):
        reps = 1 + (longer_mid if 0 < i < n_prompts - 1 else 0)
        segments += [(i, i, 0.0)] * reps
        if i < n_prompts - 1:
            segments += [(i, i + 1, (j + 1) / (transitions + 1)) for j in range(transitions)]
    return segments


def triangular_weights(frames: int) -> torch.Tensor:
    """``w_i = min((2i+1)/F, 2 - (2i+1)/F)`` for ``i = 0..F-1`` (spec §4)."""
    i = torch.arange(frames, dtype=torch.float64)
    return torch.minimum((2 * i + 1) / frames, 2 - (2 * i + 1) / frames)


class DiTCtrlPipeline(MethodPipeline):
    """See the module docstring; built with ``DiTCtrlPipeline.from_pipe(pipe)`` from a ``CogVideoXPipeline``.

    One prompt is the base pipeline's own call (every argument passed through). Several prompts run this pipeline's
    loop, with the base pipeline's contract: ``output_type`` (``"pil"``, ``"np"``, ``"pt"``, ``"latent"``: the long
    latent), ``return_dict`` (``False``: ``(frames,)``), ``callback_on_step_end`` called once per step after the
    scheduler step with ``callback_on_step_end_tensor_inputs`` from ``["latents"]`` (the long latent, float32; the
    returned ``latents`` replace it); ``num_videos_per_prompt`` must be 1 (one long video per call).
    """

    config_class = DiTCtrl
    _loop_tensor_inputs = ("latents",)

    @torch.no_grad()
    def __call__(self, prompts, negative_prompt: str = "", num_frames: int | None = None, height=None, width=None,
                 num_inference_steps: int = 50, guidance_scale: float = 6.0, use_dynamic_cfg: bool = True,
                 eta: float = 0.0, generator=None, output_type: str = "pil", return_dict: bool = True,
                 max_sequence_length: int = 226, num_videos_per_prompt: int = 1, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), **options):
        from diffusers.pipelines.cogvideo.pipeline_output import CogVideoXPipelineOutput
        from diffusers.schedulers import CogVideoXDPMScheduler
        from diffusers.utils.torch_utils import randn_tensor

        config = call_config(DiTCtrl, options.pop("config", None), options)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise AttnCtrlError("prompts must be a non-empty list of non-empty strings")
        tcfg = self.transformer.config
        height = int(height or tcfg.sample_height * self.vae_scale_factor_spatial)
        width = int(width or tcfg.sample_width * self.vae_scale_factor_spatial)
        num_frames = int(num_frames or tcfg.sample_frames)
        kw = dict(negative_prompt=negative_prompt, num_frames=num_frames, height=height, width=width,
                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                  use_dynamic_cfg=use_dynamic_cfg, eta=eta, generator=generator, output_type=output_type,
                  return_dict=return_dict, max_sequence_length=max_sequence_length,
                  num_videos_per_prompt=num_videos_per_prompt, callback_on_step_end=callback_on_step_end,
                  callback_on_step_end_tensor_inputs=list(callback_on_step_end_tensor_inputs))
        if len(prompts) == 1:  # exactly the base pipeline
            return self._base_call(prompts[0], **kw)
        if num_videos_per_prompt != 1:
            raise AttnCtrlError("DiTCtrl makes one long video per call; loop over seeds for more")
        callback_inputs = check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs,
                                         self._loop_tensor_inputs)
        vt = self.vae_scale_factor_temporal
        if num_frames < 1 or (num_frames - 1) % vt:
            raise AttnCtrlError(f"num_frames per segment must be {vt}k + 1, got {num_frames}")
        if tcfg.patch_size_t is not None:
            raise UnsupportedModelError("DiTCtrl supports CogVideoX 1.0 (2B / 5B), not the 1.5 temporal patching")
        seg = (num_frames - 1) // vt + 1
        overlap = config.overlap_for(seg)
        if overlap >= seg:
            raise AttnCtrlError(f"overlap ({overlap} latent frames) must be smaller than a segment ({seg})")
        segments = plan_segments(len(prompts), config.num_transition_blocks, config.longer_mid_segment)
        n_seg = len(segments)
        stride = seg - overlap
        total = seg + (n_seg - 1) * stride
        tokens = self._subject_tokens(prompts, config)
        device = self._execution_device

        cond, uncond = [], []
        for p in prompts:
            pe, ne = self.encode_prompt(p, negative_prompt, True, num_videos_per_prompt=1,
                                        max_sequence_length=max_sequence_length, device=device)
            cond.append(pe)
            uncond.append(ne if negative_prompt else torch.zeros_like(pe))  # official: zero uncond embeddings
        seg_cond = [(1 - w) * cond[a] + w * cond[b] for a, b, w in segments]
        seg_uncond = [uncond[a] if w < 0.5 else uncond[b] for a, b, w in segments]
        seg_tokens = [tokens[a] if w < 0.5 else tokens[b] for a, b, w in segments] if tokens else None

        # the official sampler (DPM++ 2M SDE, spec §9), whatever scheduler the pipeline carries
        scheduler = CogVideoXDPMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        shape = (1, total, tcfg.in_channels, height // self.vae_scale_factor_spatial,
                 width // self.vae_scale_factor_spatial)
        # float32 latents throughout, as the official sampler (the model runs in its own dtype)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents * scheduler.init_noise_sigma
        rope = (self._prepare_rotary_positional_embeddings(height, width, seg, device)
                if tcfg.use_rotary_positional_embeddings else None)
        extra = {"eta": eta, "generator": generator}
        weights = triangular_weights(seg).to(device=device, dtype=torch.float32).view(1, seg, 1, 1, 1)
        blocks = len(self.transformer.transformer_blocks)
        lo, hi = config.layer_range(blocks)
        layer_names = {f"transformer_blocks.{b}.attn1.processor" for b in range(lo, min(hi, blocks))}
        state = DiTCtrlState(config.step_range(num_inference_steps), layer_names, config.mask_guided, config.mask_threshold)
        tiles = [slice(k * stride, k * stride + seg) for k in range(n_seg)]
        self.passes_per_step = []
        old_x0 = None
        with bind(self, config, state, DiTCtrlAttnProcessor):
            with self.progress_bar(total=len(timesteps)) as bar:
                for i, t in enumerate(timesteps):
                    state.step = i
                    g = guidance_scale
                    if use_dynamic_cfg:  # as CogVideoXPipeline (spec §2: t is the scheduler timestep)
                        g = 1 + guidance_scale * ((1 - math.cos(math.pi * ((num_inference_steps - t.item())
                                                                            / num_inference_steps) ** 5.0)) / 2)
                    sharing = i in state.steps and bool(layer_names)
                    passes = 0
                    outputs = {}  # (pair k, member 0/1) -> guided v of that segment in that pair
                    if config.dedupe and not sharing:
                        single = {}
                        for k in range(n_seg):
                            state.begin_pass(False)
                            single[k] = self._run([latents[:, tiles[k]]], [seg_uncond[k]], [seg_cond[k]], t, g, rope)[0]
                            passes += 1
                        for k in range(n_seg - 1):
                            outputs[(k, 0)], outputs[(k, 1)] = single[k], single[k + 1]
                    else:
                        for k in range(n_seg - 1):
                            state.begin_pass(True, *((seg_tokens[k], seg_tokens[k + 1]) if seg_tokens else ((), ())))
                            v_s, v_t = self._run([latents[:, tiles[k]], latents[:, tiles[k + 1]]],
                                                 [seg_uncond[k], seg_uncond[k + 1]], [seg_cond[k], seg_cond[k + 1]],
                                                 t, g, rope)
                            outputs[(k, 0)], outputs[(k, 1)] = v_s, v_t
                            passes += 2
                    state.begin_pass(False)
                    self.passes_per_step.append(passes)
                    acc = torch.zeros(shape, device=device, dtype=torch.float32)
                    wsum = torch.zeros((1, total, 1, 1, 1), device=device, dtype=torch.float32)
                    for k in range(n_seg - 1):  # the naive pair order, whatever was computed
                        for member, tile in ((0, tiles[k]), (1, tiles[k + 1])):
                            acc[:, tile] += weights * outputs[(k, member)]
                            wsum[:, tile] += weights
                    v = acc / wsum
                    latents, old_x0 = scheduler.step(v, old_x0, t, timesteps[i - 1] if i > 0 else None, latents,
                                                     **extra, return_dict=False)
                    latents = run_callback(self, callback_on_step_end, callback_inputs, i, t,
                                           {"latents": latents})["latents"]
                    bar.update()
        # diffusers' CogVideoX decoder takes latent frames in twos after a first batch of three: an odd count gives
        # 1 + 4 frames per further latent frame; an even count is decoded in twos from the start, 4 frames each
        frames = (total - 1) * vt + 1 if total % 2 else total * vt
        self.last_plan = {"segments": n_seg, "segment_frames": seg, "overlap": overlap, "latent_frames": total,
                          "stride": stride, "pixel_frames": frames}
        video = decode(self, latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return CogVideoXPipelineOutput(frames=video)

    def _run(self, xs, uncond, cond, t, g, rope) -> list[torch.Tensor]:
        """One transformer call on segments ``xs`` with CFG; returns each segment's guided ``v`` (float32)."""
        x = torch.cat(xs + xs).to(self.transformer.dtype)  # [uc items..., c items...] (CogVideoX: no input scaling)
        embeds = torch.cat(uncond + cond)
        out = self.transformer(hidden_states=x, encoder_hidden_states=embeds, timestep=t.expand(x.shape[0]),
                               image_rotary_emb=rope, return_dict=False)[0].float()
        n = len(xs)
        return [out[j][None] + g * (out[n + j][None] - out[j][None]) for j in range(n)]

    def _subject_tokens(self, prompts, config: DiTCtrl):
        words = config.words_for(len(prompts))
        if not words:
            return None
        out = []
        for i, (p, w) in enumerate(zip(prompts, words)):
            try:
                out.append(token_indices(self.tokenizer, p, w))
            except AttnCtrlError as e:
                raise type(e)(f"prompt {i + 1}: {e}") from None
        return out
