"""MagicFace: reference-aware self-attention, then region-grouped blend attention, with region-adaptive CFG.

Wang, Zhang, Jin, *MagicFace: Training-free Universal-Style Human Image Customized Synthesis* (arXiv 2408.07433);
official code ``CodeGoat24/MagicFace``; spec ``magicface.md``. One image per concept (person, hat, ...), each with
a mask and a prompt; each concept binds to a word of the target prompt (``ref_words``).

* **Stage 1, RSA** (steps ``<= inject_step``, or while no segmentation exists; spec §5.4): in the decoder's two
  highest-resolution self-attention levels the *conditional target* row attends to one softmax over
  ``[own keys; ref_i keys + b_i ...]`` with ``b_i = w_i`` inside concept i's mask and ``-inf`` outside.
* **Stage 2, RBA** (spec §5.5): every target pixel starts from plain self-attention; the pixels of group ``G_i``
  (where the segmentation of the previous step assigns the concept's word) attend over ``[own keys; ref_i keys +
  b_i]``, later concepts overwriting earlier ones. Computed with query groups: no ``queries x keys`` bias.
* **Segmentation** (spec §6, after every UNet call): at the latent/2, /4 and /8 layers the target's self-attention
  ``A`` and cross-attention ``C`` give token maps ``T = (A C + 3 A (A C)) / 4`` (as coded), computed as two SDPA
  calls with ``C`` as values (no ``N x N`` map), upsampled to latent/2, smoothed with the official 3x3 kernel
  ``[0.2119, 0.5761, 0.2119]``, divided by their spatial mean and averaged over layers. Non-concept tokens are scaled
  by ``ca_scale``; a concept's mask is where its token is the arg-max; the foreground pair ``[SOT, rest]`` comes
  from the unconditional row, as coded.
* **Region-adaptive CFG** (``use_rate``, spec §7): ``eps = eps_u + g r (eps_c - eps_u)`` with a per-pixel rate
  ``r`` that equalises the guidance strength of each token region with the foreground's, clamped to
  ``[0.8, min(3, 15 / g)]`` and smoothed; applied by rewriting the conditional prediction so the base pipeline's
  own CFG produces it.

Decisions on official quirks (spec §8): no hard-coded GPU or CUDA-only tensors; N = 0 is the plain pipeline;
words instead of token indices (a word of several tokens uses all of them); masks > 127; the ``(A + 3 A A) / 4``
propagation and the unconditional foreground pair are kept as coded (they define the method's behaviour).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core.controller import Controller, Method
from ..core.errors import AttnCtrlError, LayerSelectionError
from ..core.layers import LayerInfo, LayerMap
from ..core.masks import degenerate_warning
from ..core.processor import AttnCtrlProcessor
from ..kernels.attention import KVBlock, grouped_attention, multi_block_attention
from .freecustom import per_reference
from .reference import ReferenceState

__all__ = ["MagicFace", "MagicFaceAttnProcessor", "MagicFaceState", "GAUSSIAN_3", "smooth3", "segment", "region_rate"]

#: the official 3x3 smoothing: exp(-((x - mu) / (2 sigma))^2) with sigma 0.5, normalised ([0.2119, 0.5761, 0.2119])
GAUSSIAN_3 = torch.exp(-torch.tensor([-1.0, 0.0, 1.0]) ** 2)
GAUSSIAN_3 = GAUSSIAN_3 / GAUSSIAN_3.sum()
STORE_DOWNSAMPLES = (2, 4, 8)


def smooth3(x: torch.Tensor) -> torch.Tensor:
    """The official separable 3x3 smoothing of ``(..., H, W)`` maps with reflect padding."""
    shape = x.shape
    k = GAUSSIAN_3.to(x)
    y = x.reshape(-1, 1, *shape[-2:])
    mode = "reflect" if min(shape[-2:]) > 1 else "replicate"
    y = F.conv2d(F.pad(y, (1, 1, 0, 0), mode=mode), k.view(1, 1, 1, 3))
    y = F.conv2d(F.pad(y, (0, 0, 1, 1), mode=mode), k.view(1, 1, 3, 1))
    return y.reshape(shape)


def segment(token_sum: torch.Tensor, fg_sum: torch.Tensor, layers: int, ref_tokens: list[list[int]],
            ca_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Concept masks ``(T, H, W)`` and foreground ``(H, W)`` (booleans) from the summed normalised maps (spec §6)."""
    maps = token_sum / layers
    pair = fg_sum / layers
    keep = torch.zeros(maps.shape[0], dtype=torch.bool, device=maps.device)
    for tokens in ref_tokens:
        keep[tokens] = True
    maps = torch.where(keep[:, None, None], maps, maps * ca_scale)
    concept = maps == maps.max(dim=0, keepdim=True).values
    fg = ~(pair[0] == pair.max(dim=0).values)  # foreground unless the SOT map is the max of the pair
    if ca_scale < 0.9:
        concept = concept & fg
    return concept, fg


def region_rate(delta: torch.Tensor, concept: torch.Tensor, fg: torch.Tensor, guidance: float,
                upscale: int = 2) -> torch.Tensor:
    """Per-pixel CFG rate ``(H, W)`` from ``delta = eps_c - eps_u`` ``(C, H, W)`` (spec §7)."""
    norm = delta.float().norm(dim=0)
    u_k = F.interpolate(concept.float()[None], scale_factor=upscale, mode="nearest")[0]
    u_f = F.interpolate(fg.float()[None, None], scale_factor=upscale, mode="nearest")[0, 0]
    u_k, u_f = u_k[:, : norm.shape[0], : norm.shape[1]], u_f[: norm.shape[0], : norm.shape[1]]
    nu_k = (norm * u_k).sum((1, 2)) / (u_k.sum((1, 2)) + 1e-8)
    nu_f = (norm * u_f).sum() / (u_f.sum() + 1e-8)
    rate_k = torch.where(u_k.sum((1, 2)) > 0, nu_f / (nu_k + 1e-8), torch.zeros_like(nu_k))
    rate = (rate_k[:, None, None] * u_k).sum(0)
    rate = rate.clamp(0.8, 3.0).clamp(max=15.0 / max(guidance, 1e-8))
    return smooth3(rate)



class MagicFaceState(ReferenceState):
    """Reference state plus MagicFace's per-call token maps, segmentation and stage (what the processors read).

    Call :meth:`setup` once the processors are installed; the pipeline calls :meth:`end_call` after every UNet call.
    """

    def setup(self, config: MagicFace, layers, ref_tokens: list[list[int]], steps: int, guidance: float):
        """Bind the state to a config, the denoiser's layer map, the references' token indices and the schedule."""
        self.config = config
        self.ref_tokens = ref_tokens
        self.ca_scale = config.scale_for(self.n)
        inject = config.inject_step
        self.inject = round(inject * steps) if isinstance(inject, float) else int(inject)
        self.guidance = guidance
        self.seg_grid = (self.latent_hw[0] // 2, self.latent_hw[1] // 2)
        self.reference_layers = {la.name for la in layers.select(config.layers) if la.kind == "self"}
        self.store_layers = {la.name for la in config.segment_selection(layers)}
        self.recording = True
        self.qk: dict[str, tuple] = {}
        self.concept = None  # (T, H/2, W/2) bool, from the previous UNet call
        self.fg = None
        self.step = 0
        self.coverage: list[torch.Tensor] = []  # per UNet call: (N,) fraction of the image each concept mask covers
        self._reset_sums()

    def _reset_sums(self):
        self.token_sum = None
        self.fg_sum = None
        self.layers_recorded = 0

    def stage(self) -> int:
        return 2 if self.concept is not None and self.step > self.inject else 1

    @torch.no_grad()
    def record(self, grid, q_self, k_self, q_cross, k_cross) -> None:
        """Add one block's token maps ``(A C + 3 A (A C)) / 4`` (spec §6) to the running sums."""
        heads = q_self.shape[1]
        scale = q_cross.shape[-1] ** -0.5
        cross = torch.softmax(q_cross.float() @ k_cross.float().transpose(-1, -2) * scale, -1).mean(1)  # (B2, n, T)
        q, k = q_self.float(), k_self.float()

        def propagate(values):  # head-mean of softmax(q k^T / sqrt(d)) @ values, without the n x n map
            return F.scaled_dot_product_attention(q, k, values.unsqueeze(1).expand(-1, heads, -1, -1)).mean(1)

        ac = propagate(cross)
        maps = (ac + 3 * propagate(ac)) / 4  # (B2, n, T)
        b2, n, t = maps.shape
        maps = maps.transpose(1, 2).reshape(b2, t, *grid)
        if tuple(grid) != self.seg_grid:
            maps = F.interpolate(maps, size=self.seg_grid, mode="bilinear", align_corners=False)
        maps = smooth3(maps)
        cond = maps[-1]
        cond = cond / (cond.mean((-2, -1), keepdim=True) + 1e-8)
        uncond = maps[0]
        pair = torch.stack([uncond[0], uncond[1:].sum(0)])
        pair = pair / (pair.mean((-2, -1), keepdim=True) + 1e-8)
        self.token_sum = cond if self.token_sum is None else self.token_sum + cond
        self.fg_sum = pair if self.fg_sum is None else self.fg_sum + pair
        self.layers_recorded += 1

    def end_call(self) -> None:
        """After a UNet call: segment from its maps (kept for the next call), reset the sums, count the step."""
        if self.layers_recorded:
            self.concept, self.fg = segment(self.token_sum, self.fg_sum, self.layers_recorded, self.ref_tokens,
                                            self.ca_scale)
            if self.n:
                self.coverage.append(self.reference_masks().float().flatten(1).mean(1).cpu())
        self._reset_sums()
        self.qk.clear()
        self.step += 1

    def mask_warning(self, words=None) -> str | None:
        """The warning for degenerate concept masks of this call, or None.

        A reference's concept mask is degenerate when it covers less than 0.5 % of the image (empty: region blending
        never reaches the concept and the region rate skips it) or more than 95 % (the concept's word wins every
        pixel, so its reference is blended everywhere), averaged over the call's segmentations from the first one
        region blending reads (after step ``inject_step``) on, or over all of them when the call never blends;
        thresholds :data:`attnctrl.core.masks.MASK_EMPTY` / ``MASK_FULL``. ``words`` name the references.
        """
        if not self.coverage:
            return None
        used = self.coverage[self.inject:] or self.coverage
        mean = torch.stack(used).mean(0)
        items = [(f"reference {i + 1}" + (f" ({words[i]!r})" if words and i < len(words) else ""), fraction,
                  "nearly the whole image", "empty") for i, fraction in enumerate(mean.tolist())]
        return degenerate_warning(
            "MagicFace's concept masks", f"{len(used)} segmentation{'s' * (len(used) != 1)}", items,
            "this model's attention at the segmentation layers is not local: choose other layers with segment_layers "
            "(a layer selector such as 'up.1' or 'ds<=4') or another ca_scale")

    def reference_masks(self) -> torch.Tensor:
        """``(N, H/2, W/2)`` boolean segmentation of each reference's word (union of its tokens)."""
        if self.concept is None:
            raise AttnCtrlError("no segmentation yet")
        return torch.stack([self.concept[tokens].any(0) for tokens in self.ref_tokens])

    def groups(self, grid) -> torch.Tensor:
        """``(h * w,)`` group ids on a layer grid: 0 = no concept, i = concept i (the last one wins)."""
        masks = self.reference_masks().float()[:, None]
        masks = F.interpolate(masks, size=tuple(grid), mode="nearest")[:, 0].flatten(1) > 0.5
        ids = torch.zeros(masks.shape[1], dtype=torch.long, device=masks.device)
        for i in range(self.n):
            ids[masks[i]] = i + 1
        return ids


class MagicFaceAttnProcessor(AttnCtrlProcessor):
    """RSA / RBA in the reference layers; token-map recording in the latent/2, /4, /8 layers."""

    def __init__(self, layer: LayerInfo, controller: Controller, state: MagicFaceState, config: MagicFace):
        super().__init__(layer, controller)
        self.state = state
        self.config = config
        self.block = layer.name.rsplit(".", 2)[0]

    def attend(self, attn, query, key, value, attention_mask=None, text_len=0):
        out = self.stock_attention(query, key, value, attention_mask)
        run = self.state
        cfg = self.ctl.cfg
        targets, refs = run.rows(query.shape[0], cfg)
        store = self.layer.name in run.store_layers and run.recording
        if self.layer.kind == "self":
            if store:
                run.qk[self.block] = (query[targets], key[targets])
            if self.layer.name in run.reference_layers and self.active():
                out = self._reference(query, key, value, out, targets[-1], [r[-1] for r in refs])
        elif store and self.block in run.qk:
            q_self, k_self = run.qk.pop(self.block)
            run.record(self.layer.grid(self.ctl.call.grid), q_self, k_self, query[targets], key[targets])
        return out

    def active(self) -> bool:
        c, step = self.config, self.ctl.step
        return step >= c.start_step and (c.end_step is None or step < c.end_step)

    def _reference(self, query, key, value, out, t, refs):
        """RSA or RBA for the conditional target row ``t`` (spec §5.4-5.5)."""
        run, config = self.state, self.config
        grid = self.layer.grid(self.ctl.call.grid)
        masks = run.grid_masks(grid).to(query.device)
        weights = config.weights(run.n)
        biases = [torch.where(m, torch.tensor(float(w)), torch.tensor(float("-inf"))) for m, w in zip(masks, weights)]
        out = out.clone()
        if run.stage() == 1:
            blocks = [KVBlock(key[t : t + 1], value[t : t + 1])]
            blocks += [KVBlock(key[r : r + 1], value[r : r + 1], bias=b.view(1, 1, 1, -1)) for r, b in zip(refs, biases)]
            out[t : t + 1] = multi_block_attention(query[t : t + 1], blocks).to(out.dtype)
            return out
        groups = run.groups(grid).to(query.device)  # (n,) 0 = no concept, i = concept i (last wins)
        rows = torch.nonzero(groups > 0).flatten()
        if rows.numel() == 0:
            return out
        n = key.shape[2]
        keys = torch.cat([key[t : t + 1]] + [key[r : r + 1] for r in refs], dim=2)
        values = torch.cat([value[t : t + 1]] + [value[r : r + 1] for r in refs], dim=2)
        group_bias = torch.full((run.n, n * (run.n + 1)), float("-inf"), device=query.device)
        group_bias[:, :n] = 0.0
        for i, b in enumerate(biases):
            group_bias[i, n * (i + 1) : n * (i + 2)] = b
        q_rows = query[t : t + 1].index_select(2, rows)
        blended = grouped_attention(q_rows, keys, values, groups[rows] - 1, group_bias)
        out[t : t + 1, :, rows] = blended.to(out.dtype)
        return out


@dataclass(frozen=True)
class MagicFace(Method):
    """MagicFace settings (used by :class:`attnctrl.pipelines.MagicFacePipeline`, which supplies the references;
    not a plugin: ``attnctrl.apply`` refuses it).

    Args that matter:
        ref_words: the word of the target prompt each reference binds to (e.g. ["woman", "hat"]).
        mask_weights: bonus ``w_i`` of in-mask reference keys (one value, or one per reference).
        ca_scale: weight of the non-concept token maps in the segmentation (None: 0.9 for one reference, 0.6 for
            more, the official configs).
        inject_step: last RSA step: an int, or a float in [0, 1] as a fraction of the steps (0.4 = 20 of 50).
    Args to tinker with:
        use_rate: region-adaptive CFG (spec §7); layers, start_step, end_step: reference attention layers/steps;
        upscale: the factor R from the segmentation grid (latent/2) to the latent; use_null_ref_prompts.
        segment_layers: layer selector of the segmentation's layers (None: every transformer block at latent/2, /4
            and /8, spec §6; SD 2.1 at 512 px: 11 blocks). A selected layer brings its transformer block's self- and
            cross-attention, which the token maps need; a selection with no such block is an error.
    """

    ref_words: tuple[str, ...] = field(default=(), metadata={"help": "magicface: word of the prompt per reference"})
    mask_weights: float | tuple[float, ...] = field(default=3.0, metadata={
        "help": "freecustom/magicface: bonus of in-mask reference keys (one value or one per reference)"})
    ca_scale: float | None = field(default=None, metadata={"help": "magicface: non-concept token weight (0.9/0.6)"})
    inject_step: int | float = field(default=0.4, metadata={"help": "magicface: last RSA step (int or fraction)"})
    use_rate: bool = field(default=True, metadata={"help": "magicface: region-adaptive CFG"})
    layers: object = field(default="decoder-high-res", metadata={"help": "layer selector"})
    start_step: int = field(default=0, metadata={"help": "first step with reference attention"})
    end_step: int | None = field(default=None, metadata={"help": "reference attention before this step"})
    use_null_ref_prompts: bool = field(default=False, metadata={"help": "reference prompts replaced by ''"})
    upscale: int = field(default=2, metadata={"help": "magicface: segmentation-to-latent factor R"})
    segment_layers: object = field(default=None, metadata={
        "help": "magicface: layers whose attention gives the segmentation (selector; default latent/2, /4, /8)"})

    name = "magicface"
    families = ("sd", "sdxl")
    kinds = ("self",)
    pipeline = "MagicFacePipeline"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.ref_words, str):
            object.__setattr__(self, "ref_words", tuple(w.strip() for w in self.ref_words.split(",") if w.strip()))
        weights = self.mask_weights if isinstance(self.mask_weights, tuple) else (self.mask_weights,)
        if not weights or any(not isinstance(w, (int, float)) or w < 0 for w in weights):
            raise AttnCtrlError(f"mask_weights must be non-negative numbers, got {self.mask_weights!r}")
        if self.ca_scale is not None and not 0 <= self.ca_scale <= 1:
            raise AttnCtrlError(f"ca_scale must lie in [0, 1], got {self.ca_scale}")
        s = self.inject_step
        if isinstance(s, bool) or not isinstance(s, (int, float)) or s < 0 or (isinstance(s, float) and s > 1):
            raise AttnCtrlError(f"inject_step must be a step index >= 0 or a fraction in [0, 1], got {s!r}")
        if self.start_step < 0 or (self.end_step is not None and self.end_step <= self.start_step):
            raise AttnCtrlError(f"need 0 <= start_step < end_step, got {self.start_step}, {self.end_step}")
        if self.upscale < 1:
            raise AttnCtrlError(f"upscale must be >= 1, got {self.upscale}")
        seg = self.segment_layers
        if seg is not None and not callable(seg):
            parts = [seg] if isinstance(seg, str) else seg if isinstance(seg, tuple) else None
            if parts is None or not all(isinstance(p, str) for p in parts):
                raise AttnCtrlError(f"segment_layers must be a layer selector (a string such as 'up.1', a list of "
                                    f"them, or None for latent/2, /4, /8), not {seg!r}")
            if not any(p.strip(" ,&") for p in parts):
                raise AttnCtrlError("segment_layers is empty: it selects no layer; give a layer selector such as "
                                    "'up.1', or None for latent/2, /4, /8")

    def weights(self, n: int) -> tuple[float, ...]:
        return per_reference(self.mask_weights, n)

    def words_for(self, n: int) -> list[str]:
        """``ref_words``, one word of the prompt per reference; raises unless ``n`` are given."""
        if len(self.ref_words) != n:
            raise AttnCtrlError(f"ref_words must name one word of the prompt per reference: {len(self.ref_words)} "
                                f"word(s) for {n} reference(s)")
        return list(self.ref_words)

    def scale_for(self, n: int) -> float:
        return self.ca_scale if self.ca_scale is not None else (0.9 if n == 1 else 0.6)

    def segment_selection(self, layers: LayerMap) -> list[LayerInfo]:
        """The layers the segmentation records (see ``segment_layers``): the self- and cross-attention of every
        transformer block with a selected layer. Raises :class:`AttnCtrlError` when the selection matches no layer or
        no block with both."""
        seg = self.segment_layers
        if seg is None:
            chosen = [la for la in layers if la.downsample in STORE_DOWNSAMPLES]
        else:
            try:
                chosen = layers.select(seg)
            except LayerSelectionError as e:
                raise LayerSelectionError(f"MagicFace segment_layers: {e}") from None
        def block(la: LayerInfo) -> str:  # the processors' block key
            return la.name.rsplit(".", 2)[0]

        kinds: dict[str, set] = {}
        for la in layers:
            kinds.setdefault(block(la), set()).add(la.kind)
        blocks = {block(la) for la in chosen if {"self", "cross"} <= kinds[block(la)]}
        if not blocks:
            raise LayerSelectionError(
                f"MagicFace segment_layers {seg!r} selects no transformer block with both self- and cross-attention "
                f"(the segmentation needs both); valid terms: {layers.choices()}")
        return [la for la in layers if block(la) in blocks]

    def select_layers(self, ctl: Controller) -> list[LayerInfo]:
        reference = super().select_layers(ctl)
        store = self.segment_selection(ctl.layers)
        names = {la.name for la in reference} | {la.name for la in store}
        return [la for la in ctl.layers if la.name in names]
