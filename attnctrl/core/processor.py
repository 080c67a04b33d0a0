"""The base class of every attnctrl attention processor.

:class:`AttnCtrlProcessor` reproduces, op for op, the stock diffusers processor of its layer's family
(``AttnProcessor2_0`` for the SD/SDXL UNets, ``FluxAttnProcessor`` for FLUX, ``CogVideoXAttnProcessor2_0`` for
CogVideoX) and routes the attention core through one overridable method, :meth:`AttnCtrlProcessor.attend`, which sees
4-D ``(batch, heads, tokens, head_dim)`` query/key/value after projections, q/k norms and RoPE. A subclass that does
not override anything is therefore bit-for-bit identical to the stock processor (tested for every family).

One class serves every family (the call path is chosen from the layer's family), so a method writes its attention
logic once. It keeps the keyword signature diffusers filters on (``image_rotary_emb`` is named, FLUX passes it
positionally) and the ``_attention_backend`` / ``_parallel_config`` attributes that ``ModelMixin.set_attention_backend``
sets. The plain attention of every family goes through ``dispatch_attention_fn`` (:meth:`stock_attention`), so a
backend chosen with ``set_attention_backend`` or the ``attention_backend`` context manager (native, flash, sage,
xformers, ...) applies wherever a method has not replaced the math. A method's own math (additive biases, partial
log-sum-exps, agent tokens, local windows) calls PyTorch's SDPA (or flex attention) directly, which picks its fused
kernel itself; each method's docstring says so.
"""

from __future__ import annotations

import torch

from .layers import LayerInfo

__all__ = ["AttnCtrlProcessor"]


class AttnCtrlProcessor:
    """Stock-equivalent processor with an overridable attention core. See the module docstring."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer: LayerInfo, controller=None):
        self.layer = layer
        self.ctl = controller
        self._forward = {
            "sd": self._unet_forward,
            "sdxl": self._unet_forward,
            "flux": self._flux_forward,
            "cogvideox": self._cogvideox_forward,
        }[layer.family]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.layer.name!r})"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb=None,
        temb: torch.Tensor | None = None,
    ):
        return self._forward(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, temb)

    # -- the hooks ------------------------------------------------------------------------------------------------
    def on_step(self, ctl) -> None:
        """A new step (``ctl.step``) begins: store here what the forward needs to know of the step (whether the
        method acts now, its phase). Called before the denoiser's forward, outside ``torch.compile`` graphs."""

    def attend(
        self,
        attn,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        text_len: int = 0,
    ) -> torch.Tensor:
        """Attention core on ``(B, H, S, D)`` tensors; returns ``(B, H, S_q, D)``.

        ``text_len`` is the number of leading text tokens in a joint sequence (FLUX [text, image], CogVideoX
        [text, video]); 0 for UNet layers, whose cross-attention keys come from ``encoder_hidden_states``.
        """
        return self.stock_attention(query, key, value, attention_mask)

    def stock_attention(self, query, key, value, attention_mask=None) -> torch.Tensor:
        """The stock kernel call, through diffusers' attention dispatcher: the backend ``set_attention_backend`` /
        ``attention_backend(...)`` chose (``native`` SDPA by default, bit for bit the stock processors' own call)."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn  # 1.5 s to import: not at start-up

        out = dispatch_attention_fn(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attention_mask,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )
        return out.transpose(1, 2)

    @property
    def text_len(self) -> int:
        """Text tokens at the front of a FLUX single-stream sequence (from the controller's call info)."""
        return self.ctl.call.text_len if self.ctl is not None else 0

    # -- family call paths (mirrors of the stock processors) ----------------------------------------------------
    def _unet_forward(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, temb):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query, key, value = _heads(attn, hidden_states, encoder_hidden_states, batch_size)
        hidden_states = self.attend(attn, query, key, value, attention_mask, 0)
        hidden_states = _merge_heads(attn, hidden_states.to(query.dtype), batch_size)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _flux_forward(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, temb):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.text_len
        hidden_states = self.attend(
            attn, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask, text_len
        ).transpose(1, 2)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states

    def _cogvideox_forward(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, temb):
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        query, key, value = _heads(attn, hidden_states, hidden_states, batch_size)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)

        hidden_states = self.attend(attn, query, key, value, attention_mask, text_seq_length)
        hidden_states = _merge_heads(attn, hidden_states, batch_size)
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


def _heads(attn, hidden_states, context, batch_size):
    """``to_q/to_k/to_v`` split into heads, then the optional q/k norms: the stock legacy-``Attention`` sequence."""
    query = attn.to_q(hidden_states)
    key = attn.to_k(context)
    value = attn.to_v(context)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def _merge_heads(attn, hidden_states, batch_size):
    """Heads back into channels, then ``to_out`` (linear + dropout)."""
    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, hidden_states.shape[1] * hidden_states.shape[3])
    hidden_states = attn.to_out[0](hidden_states)
    return attn.to_out[1](hidden_states)
