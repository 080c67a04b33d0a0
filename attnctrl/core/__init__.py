"""The machinery every method shares: layer description, controller, attention primitives, masks, store, tokens."""

from .attention import (
    KVBlock,
    attention_probs,
    attention_with_lse,
    concat_kv_blocks,
    grouped_attention,
    merge_attention,
    multi_block_attention,
    sdpa,
)
from .controller import Controller, Handle, Method, MethodState, Plugin, applied, apply, bind, remove
from .errors import (
    AttnCtrlError,
    LayerConflictError,
    LayerSelectionError,
    ModelNotAvailableError,
    NotAPluginError,
    TokenLookupError,
    UnsupportedModelError,
)
from .families import FAMILIES, CallInfo, Family, detect_family, find_denoiser
from .layers import LayerInfo, LayerMap, describe
from .processor import AttnCtrlProcessor
from .store import AttentionStore
from .tokens import find_token_indices, token_indices

__all__ = [
    "KVBlock", "attention_probs", "attention_with_lse", "concat_kv_blocks", "grouped_attention", "merge_attention",
    "multi_block_attention", "sdpa", "Controller", "Handle", "Method", "MethodState", "Plugin", "applied", "apply", "bind", "remove",
    "AttnCtrlError", "LayerConflictError", "LayerSelectionError", "ModelNotAvailableError", "NotAPluginError", "TokenLookupError",
    "UnsupportedModelError", "FAMILIES", "CallInfo", "Family", "detect_family", "find_denoiser", "LayerInfo",
    "LayerMap", "describe", "AttnCtrlProcessor", "AttentionStore", "find_token_indices", "token_indices",
]
