"""The machinery every method shares: layer description, controller, masks, store, tokens, errors.

The attention primitives (SDPA with key biases, several key/value blocks in one softmax, log-sum-exp merging,
selected probabilities) are the ground floor below core: :mod:`attnctrl.kernels.attention`.
"""

from .controller import Controller, Handle, Method, MethodState, Plugin, applied, apply, bind, remove
from .errors import (
    AttnCtrlError,
    AttnCtrlWarning,
    LayerConflictError,
    LayerSelectionError,
    ModelNotAvailableError,
    NotAPluginError,
    TokenLookupError,
    UnsupportedModelError,
    notice,
)
from .families import FAMILIES, CallInfo, Family, detect_family, find_denoiser
from .layers import LayerInfo, LayerMap, describe
from .processor import AttnCtrlProcessor
from .store import AttentionStore
from .tokens import find_token_indices, token_indices

__all__ = [
    "Controller", "Handle", "Method", "MethodState", "Plugin", "applied", "apply", "bind", "remove",
    "AttnCtrlError", "LayerConflictError", "LayerSelectionError", "ModelNotAvailableError", "TokenLookupError",
    "UnsupportedModelError", "NotAPluginError", "AttnCtrlWarning", "notice", "FAMILIES", "CallInfo", "Family", "detect_family", "find_denoiser", "LayerInfo",
    "LayerMap", "describe", "AttnCtrlProcessor", "AttentionStore", "find_token_indices", "token_indices",
]
