"""Agent attention for Stable Diffusion (AgentSD): token merging + agent tokens, training-free and faster.

Han, Ye, Han, Pan, Song, Huang, *Agent Attention: On the Integration of Softmax and Linear Attention* (ECCV 2024),
official code ``LeapLabTHU/Agent-Attention/agentsd`` (CompVis only; its diffusers path never worked, issue #18).
Spec: ``agentsd.md``. This is a working diffusers version.

For the self-attention (``attn1``) of every transformer block at full latent resolution (``max_downsample``):

1. partition the block's token grid into ``sy x sx`` cells and match src tokens to dst tokens by the cosine
   similarity of the block's *pre-norm* input (captured by a pre-hook on the block, as the official code does);
2. merge ``r = int(N * ratio)`` tokens of the normed input (ToMe), and ``agent_r = min(N_src, int(N *
   agent_ratio))`` tokens for the agents; agents exist only if ``2 n < N'`` (spec §2.4);
3. ``Q, K, V`` of the merged tokens, ``A = W_q a`` (agents are query-projected), then agent attention as two SDPA
   calls with their own scales::

       V_A = softmax(d^-0.5 * A K^T) V,   O = softmax(d^(-0.5 * k_scale2) * Q A^T) V_A + k_shortcut * V

   (without agents: plain softmax attention over the merged tokens, through diffusers' attention dispatcher so
   the chosen backend applies), ``to_out``, and unmerge to ``N`` tokens. The two agent calls have their own scales
   and stay on PyTorch's SDPA.

The schedule: steps before ``switch_step`` use ``sx, sy, agent_ratio`` (agent phase), later steps ``late_sx,
late_sy, late_agent_ratio`` (with 0.5 there are no agents: pure ToMe), as in the official README.

Decisions on official quirks: merge randomness comes from a private generator seeded by ``merge_seed`` and re-seeded at every generation,
drawn at the start of each step for the layers that merge, in call order (the official forks the global RNG, so
images depend on everything drawn before; drawing before the forward keeps ``torch.compile`` graphs whole);
``ratio = 0`` or a layer where ``r`` rounds to 0 runs the stock attention (the official code crashes); ``remove``
restores everything (the official leaves attention classes swapped); merged tokens are listed in row-major
grid order with a stable ranking (ties break by position, on every device), where tomesd's non-stable ``argsort``
orders them by implementation (``merge_order="official"`` reproduces it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core.controller import Controller, MethodState, Plugin
from ..core.errors import AttnCtrlError
from ..core.layers import LayerInfo
from ..core.processor import AttnCtrlProcessor
from ..kernels.token_merge import bipartite_plan, random_picks

__all__ = ["AgentAttention", "AgentAttnProcessor", "agent_attention"]


def agent_attention(q, k, v, agents, k_scale2: float = 0.3, k_shortcut: float = 0.075, fp32: bool = False):
    """AgentSD's attention on ``(B, h, N, d)`` tensors with agents ``(B, h, n, d)`` (spec §2.5)."""
    d = q.shape[-1]
    dtype = q.dtype
    if fp32:
        q, k, v, agents = q.float(), k.float(), v.float(), agents.float()
    agent_v = F.scaled_dot_product_attention(agents, k, v, scale=d**-0.5)
    out = F.scaled_dot_product_attention(q, agents, agent_v, scale=d ** (-0.5 * k_scale2))
    return (out + k_shortcut * v).to(dtype)


class _AgentState(MethodState):
    def __init__(self, config: AgentAttention, ctl: Controller, layers: list[LayerInfo]):
        self.config = config
        self.ctl = ctl
        self.generator = torch.Generator("cpu")
        self.generator.manual_seed(config.merge_seed)
        self.layers = layers
        self.picks: dict[str, torch.Tensor] = {}
        self.now = (config.sx, config.sy, config.agent_ratio)  # this step's phase (set before each step)
        self.block_inputs: dict[str, torch.Tensor] = {}
        self.hooks = []
        for layer in layers:
            block_name = layer.module_name.rsplit(".", 1)[0]
            block = ctl.denoiser.get_submodule(block_name)
            self.hooks.append(block.register_forward_pre_hook(self._capture(layer.name), with_kwargs=True))

    def _capture(self, name: str):
        def hook(module, args, kwargs):
            self.block_inputs[name] = args[0] if args else kwargs["hidden_states"]
        return hook

    def on_run(self, ctl: Controller) -> None:
        self.generator.manual_seed(self.config.merge_seed)

    def on_step(self, ctl: Controller) -> None:
        """Draw this step's dst positions for every layer that merges, in call order, before the denoiser runs (a
        ``torch.Generator`` inside the forward would break a ``torch.compile`` graph at every layer). As tomesd /
        AgentSD: random only for even batches (an odd batch takes the top-left token of each cell)."""
        c = self.config
        self.picks = {}
        self.now = self.phase()
        if not c.use_rand or ctl.call.batch % 2 or not ctl.call.grid:
            return
        sx, sy, _ = self.now
        for layer in self.layers:
            h, w = layer.grid(ctl.call.grid)
            if int(h * w * c.ratio) > 0 and h >= sy and w >= sx:
                self.picks[layer.name] = random_picks(h, w, sx, sy, self.generator)

    def phase(self) -> tuple[int, int, float]:
        """``(sx, sy, agent_ratio)`` of the current step."""
        c = self.config
        switch = c.switch_step
        if isinstance(switch, float):
            total = self.ctl.num_steps
            if total is None:
                raise AttnCtrlError("a fractional switch_step needs the pipeline; apply AgentAttention to the pipeline")
            switch = round(switch * total)
        if self.ctl.step < switch:
            return c.sx, c.sy, c.agent_ratio
        return c.late_sx, c.late_sy, c.late_agent_ratio

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self.block_inputs.clear()


class AgentAttnProcessor(AttnCtrlProcessor):
    """AgentSD self-attention for one UNet ``attn1`` layer (see the module docstring)."""

    def __init__(self, layer: LayerInfo, controller: Controller, state: _AgentState):
        super().__init__(layer, controller)
        self.state = state

    def _unet_forward(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, temb):
        config = self.state.config
        x = self.state.block_inputs.pop(self.layer.name, None)
        n = hidden_states.shape[1]
        r = int(n * config.ratio)
        if (x is None or r <= 0 or hidden_states.ndim != 3 or encoder_hidden_states is not None
                or attention_mask is not None or attn.group_norm is not None or attn.spatial_norm is not None):
            return super()._unet_forward(attn, hidden_states, encoder_hidden_states, attention_mask,
                                         image_rotary_emb, temb)
        sx, sy, agent_ratio = self.state.now
        h, w = self.layer.grid(self.ctl.call.grid)
        if h * w != n or h < sy or w < sx:
            return super()._unet_forward(attn, hidden_states, encoder_hidden_states, attention_mask,
                                         image_rotary_emb, temb)
        b = hidden_states.shape[0]
        plan = bipartite_plan(x, h, w, sx, sy, self.state.picks.get(self.layer.name), config.merge_order)
        r = min(r, plan.n_src)
        merged = plan.merge(hidden_states, r)
        n_merged = merged.shape[1]
        agent_r = min(plan.n_src, int(n * agent_ratio))
        agents = plan.merge(hidden_states, agent_r) if 2 * (n - agent_r) < n_merged else None

        heads = attn.heads
        q = attn.to_q(merged)
        k = attn.to_k(merged)
        v = attn.to_v(merged)
        d = q.shape[-1] // heads

        def split(t):
            return t.view(b, -1, heads, d).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        fp32 = config.attn_precision == "fp32"
        if agents is not None:
            a = split(attn.to_q(agents))
            if attn.norm_q is not None:
                a = attn.norm_q(a)
            out = agent_attention(q, k, v, a, config.k_scale2, config.k_shortcut, fp32)
        elif fp32:
            out = self.stock_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            out = self.stock_attention(q, k, v)  # plain attention over the merged tokens: the chosen backend
        out = out.transpose(1, 2).reshape(b, n_merged, heads * d)
        out = attn.to_out[1](attn.to_out[0](out))
        out = plan.unmerge(out, r)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@dataclass(frozen=True)
class AgentAttention(Plugin):
    """AgentSD: ToMe token merging + agent attention in the full-resolution self-attention layers.

    Args that matter:
        ratio: fraction of tokens merged (ToMe), in [0, 1); 0 = off.
        agent_ratio: fraction merged into agents in the agent phase (0.95: one agent per 4x4 cell at 512 px).
        switch_step: steps before it run agent attention, later ones ToMe only; an int, or a float in (0, 1) as a
            fraction of the steps.
        max_downsample: deepest UNet level patched (1 = full latent resolution); None = 1 for SD 1.x/2.x and 2 for
            SDXL, whose full-resolution level has no attention.
    Args to tinker with:
        sx, sy / late_sx, late_sy: cell size of the partition in each phase; late_agent_ratio: 0.5 means no agents.
        k_scale2 (0.3), k_shortcut (0.075): the broadcast softmax's logit exponent and the value shortcut.
        attn_precision: "fp32" computes both agent softmaxes in float32 (needed for SD 2.1 in fp16).
        use_rand, merge_seed: random dst positions from a private generator (re-seeded every generation).
        merge_order: ``"row-major"`` (stable: ties break by grid position, the same on every device) or
            ``"official"`` (tomesd's non-stable argsorts: the official token order and tie-breaking on the same
            device); see :mod:`attnctrl.kernels.token_merge`.
    """

    ratio: float = field(default=0.4, metadata={"help": "agent: fraction of tokens merged, [0, 1)"})
    agent_ratio: float = field(default=0.95, metadata={"help": "agent: fraction merged into agents (agent phase)"})
    sx: int = field(default=4, metadata={"help": "agent: partition cell width (agent phase)"})
    sy: int = field(default=4, metadata={"help": "agent: partition cell height (agent phase)"})
    late_sx: int = field(default=2, metadata={"help": "agent: cell width after switch_step"})
    late_sy: int = field(default=2, metadata={"help": "agent: cell height after switch_step"})
    late_agent_ratio: float = field(default=0.5, metadata={"help": "agent: agent ratio after switch_step"})
    switch_step: int | float = field(default=20, metadata={"help": "agent: first step of the ToMe-only phase (int, "
                                                           "or a fraction of the steps)"})
    k_scale2: float = field(default=0.3, metadata={"help": "agent: exponent of the broadcast softmax scale"})
    k_shortcut: float = field(default=0.075, metadata={"help": "agent: value shortcut weight"})
    max_downsample: int | None = field(default=None, metadata={"help": "agent: deepest level patched (default: 1 "
                                                               "for SD, 2 for SDXL)"})
    attn_precision: str | None = field(default=None, metadata={"help": "agent: 'fp32' for float32 softmaxes"})
    use_rand: bool = field(default=True, metadata={"help": "agent: random dst token per cell"})
    merge_seed: int = field(default=0, metadata={"help": "agent: seed of the merge randomness"})
    merge_order: str = field(default="row-major", metadata={"help": "agent: token order of the merge, 'row-major' "
                                                            "or 'official' (tomesd's argsort order and ties)"})

    name = "agent"
    families = ("sd", "sdxl")
    kinds = ("self",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.ratio < 1:
            raise AttnCtrlError(f"agent ratio must lie in [0, 1), got {self.ratio}")
        for name in ("agent_ratio", "late_agent_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise AttnCtrlError(f"agent {name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("sx", "sy", "late_sx", "late_sy"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise AttnCtrlError(f"agent {name} must be an integer >= 1, got {value!r}")
        s = self.switch_step
        if isinstance(s, bool) or not isinstance(s, (int, float)) or s < 0 or (isinstance(s, float) and s > 1):
            raise AttnCtrlError(f"switch_step must be a step index >= 0 or a fraction in [0, 1], got {s!r}")
        if self.max_downsample is not None and self.max_downsample < 1:
            raise AttnCtrlError(f"max_downsample must be >= 1, got {self.max_downsample}")
        if self.merge_order not in ("row-major", "official"):
            raise AttnCtrlError(f"merge_order must be 'row-major' or 'official', got {self.merge_order!r}")
        if self.attn_precision not in (None, "fp32"):
            raise AttnCtrlError(f"attn_precision must be None or 'fp32', got {self.attn_precision!r}")

    def select_layers(self, ctl: Controller) -> list[LayerInfo]:
        if self.layers is None:
            max_ds = self.max_downsample or (2 if ctl.family.name == "sdxl" else 1)
            return ctl.layers.select(f"self & ds<={max_ds}")
        return super().select_layers(ctl)

    def create_state(self, ctl: Controller, layers: list[LayerInfo]) -> _AgentState:
        return _AgentState(self, ctl, layers)

    def make_processor(self, layer: LayerInfo, ctl: Controller, state: _AgentState) -> AgentAttnProcessor:
        return AgentAttnProcessor(layer, ctl, state)
