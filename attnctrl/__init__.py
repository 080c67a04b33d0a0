"""attnctrl: training-free attention-control plugins for Hugging Face diffusers.

    import attnctrl
    pipe = attnctrl.load_pipeline("tiny-sd15")
    with attnctrl.apply(pipe, attnctrl.methods.AttentionMaps(words=["cat"])) as maps:
        image = pipe("a photo of a cat").images[0]
        heat = maps.heat_maps()["cat"]
"""

from . import methods, pipelines
from .core import (
    AttnCtrlError,
    AttnCtrlWarning,
    LayerConflictError,
    LayerSelectionError,
    ModelNotAvailableError,
    TokenLookupError,
    UnsupportedModelError,
    applied,
    apply,
    describe,
    remove,
)
from .models import DEFAULT_MODEL, load_pipeline, tiny_pipeline
from .pipelines import Reference

__version__ = "0.1.0"

__all__ = [
    "apply", "remove", "applied", "describe", "methods", "pipelines", "Reference", "load_pipeline", "tiny_pipeline",
    "DEFAULT_MODEL",
    "AttnCtrlError", "AttnCtrlWarning", "LayerConflictError", "LayerSelectionError", "ModelNotAvailableError", "TokenLookupError",
    "UnsupportedModelError", "__version__",
]
