"""One description of every attention layer of a denoiser, and readable layer selectors.

``describe(denoiser)`` returns a :class:`LayerMap`: for each attention layer its processor name, family, kind
(``self`` / ``cross`` / ``joint`` / ``single``), stage and level (``down.1``, ``mid``, ``up.2``, ``double``,
``single``, ``blocks``), block index and layer index in execution order, and its spatial downsampling factor, from
which the token grid at any input size follows (:meth:`LayerInfo.grid`).

Selectors (:meth:`LayerMap.select`) are strings such as ``"decoder"``, ``"up.2"``, ``"res>=32"``, ``"self"``,
``"cross"``, ``"blocks[25:30]"``:

* terms joined by ``&`` or spaces intersect, ``,`` (or a list of selectors) unites, ``!term`` negates;
* kinds: ``self``, ``cross``, ``joint``, ``single``, and ``text`` (every layer whose keys include text tokens);
* stages: ``encoder``/``down``, ``mid``, ``decoder``/``up``, ``double`` (FLUX double-stream; ``single`` is a kind),
  ``all`` or ``*``; ``decoder-high-res``: the decoder's two highest-resolution attention levels (SD 1.5: up.2 and
  up.3, the blocks 10-15 of FreeCustom/MagicFace; SDXL: up.0 and up.1);
* levels: ``down.0``, ``up.3``, ``mid`` (UNet resolution levels as diffusers numbers them);
* resolution: ``res>=32``, ``res<16``, ``res==64`` compare the grid side at the model's native size (SD 1.5: 64, 32,
  16, 8; SDXL: 64, 32); ``ds<=2`` compares the downsampling factor (1 = full latent resolution);
* positions: ``blocks[25:30]`` and ``layers[0:4]`` slice transformer blocks / attention layers in execution order
  (Python slice semantics, single indices allowed);
* names: a glob on processor names such as ``"up_blocks.3.*"`` or one full processor name.
A selector that matches nothing raises :class:`LayerSelectionError` listing the valid choices for this model.
"""

from __future__ import annotations

import fnmatch
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .errors import LayerSelectionError
from .families import Family, detect_family, find_denoiser

__all__ = ["LayerInfo", "LayerMap", "describe", "Selector"]

Selector = str | Sequence[str] | Callable[["LayerInfo"], bool] | None

_UNET = re.compile(
    r"^(?:(?P<stage>down_blocks|up_blocks)\.(?P<lvl>\d+)|mid_block)\.attentions\.(?P<att>\d+)"
    r"\.transformer_blocks\.(?P<tb>\d+)\.(?P<attn>attn1|attn2)\.processor$"
)
_FLUX = re.compile(r"^(?P<stage>transformer_blocks|single_transformer_blocks)\.(?P<blk>\d+)\.attn\.processor$")
_COG = re.compile(r"^transformer_blocks\.(?P<blk>\d+)\.attn1\.processor$")


@dataclass(frozen=True)
class LayerInfo:
    """One attention layer. ``name`` is the key of ``denoiser.attn_processors``."""

    name: str
    family: str
    kind: str  # "self" | "cross" | "joint" | "single"
    stage: str  # "down" | "mid" | "up" | "double" | "single" | "blocks"
    level: str  # "down.1", "mid", "up.2", "double", "single", "blocks"
    block: int  # transformer block index in execution order
    index: int  # attention layer index in execution order
    downsample: int  # spatial factor relative to the full-resolution token grid
    heads: int
    head_dim: int
    native_res: int = 0  # grid side at the model's native size (for ``res`` selectors)
    order: tuple = field(default=(), repr=False, compare=False)

    @property
    def module_name(self) -> str:
        return self.name[: -len(".processor")]

    @property
    def has_text_keys(self) -> bool:
        return self.kind in ("cross", "joint", "single")

    def grid(self, full: Sequence[int]) -> tuple[int, ...]:
        """Token grid of this layer for a full-resolution grid ``full`` ((H, W) latent, or (F, h, w) video)."""
        if self.downsample == 1:
            return tuple(full)
        *frames, h, w = full
        return (*frames, -(-h // self.downsample), -(-w // self.downsample))


def _unet_layers(unet, family: Family) -> list[LayerInfo]:
    n_down = len(unet.down_blocks)
    sample = unet.config.sample_size
    native = max(sample) if isinstance(sample, (list, tuple)) else int(sample)
    stage_rank = {"down": 0, "mid": 1, "up": 2}
    found = []
    for name in unet.attn_processors:
        m = _UNET.match(name)
        if m is None:
            continue
        stage = {"down_blocks": "down", "up_blocks": "up", None: "mid"}[m["stage"]]
        lvl = int(m["lvl"]) if m["lvl"] is not None else 0
        if stage == "down":
            ds, level = 2**lvl, f"down.{lvl}"
        elif stage == "mid":
            ds, level = 2 ** (n_down - 1), "mid"
        else:
            ds, level = 2 ** (len(unet.up_blocks) - 1 - lvl), f"up.{lvl}"
        attn = unet.get_submodule(name[: -len(".processor")])
        kind = "cross" if attn.is_cross_attention else "self"
        order = (stage_rank[stage], lvl, int(m["att"]), int(m["tb"]), m["attn"])
        found.append((order, name, stage, level, ds, kind, attn))
    found.sort(key=lambda x: x[0])
    layers, block_of = [], {}
    for index, (order, name, stage, level, ds, kind, attn) in enumerate(found):
        block = block_of.setdefault(order[:4], len(block_of))
        layers.append(LayerInfo(
            name=name, family=family.name, kind=kind, stage=stage, level=level, block=block, index=index,
            downsample=ds, heads=attn.heads, head_dim=attn.to_q.out_features // attn.heads,
            native_res=-(-native // ds), order=order,
        ))
    return layers


def _dit_layers(model, family: Family) -> list[LayerInfo]:
    found = []
    for name in model.attn_processors:
        if family.name == "flux":
            m = _FLUX.match(name)
            if m is None:
                continue
            single = m["stage"] == "single_transformer_blocks"
            order = (int(single), int(m["blk"]))
            stage, kind = ("single", "single") if single else ("double", "joint")
        else:
            m = _COG.match(name)
            if m is None:
                continue
            order, stage, kind = (0, int(m["blk"])), "blocks", "joint"
        attn = model.get_submodule(name[: -len(".processor")])
        head_dim = getattr(attn, "head_dim", None) or attn.to_q.out_features // attn.heads
        found.append((order, name, stage, kind, attn.heads, head_dim))
    found.sort(key=lambda x: x[0])
    if family.name == "flux":
        native = 64  # FLUX's native 1024 px -> 64 x 64 packed tokens
    else:
        native = model.config.sample_height // model.config.patch_size
    return [
        LayerInfo(name=name, family=family.name, kind=kind, stage=stage, level=stage, block=i, index=i, downsample=1,
                  heads=heads, head_dim=head_dim, native_res=native, order=order)
        for i, (order, name, stage, kind, heads, head_dim) in enumerate(found)
    ]


def describe(denoiser) -> LayerMap:
    """The :class:`LayerMap` of a denoiser or of a pipeline's (raises :class:`UnsupportedModelError` for unknown
    models)."""
    denoiser, _ = find_denoiser(denoiser)
    family = detect_family(denoiser)
    layers = _unet_layers(denoiser, family) if family.name in ("sd", "sdxl") else _dit_layers(denoiser, family)
    if not layers:
        raise LayerSelectionError(f"found no attention layers in this {family.title}")
    return LayerMap(family, tuple(layers))


_CMP = {">=": operator.ge, "<=": operator.le, "==": operator.eq, ">": operator.gt, "<": operator.lt, "=": operator.eq}
_CMP_RE = re.compile(r"^(res|ds)\s*(>=|<=|==|=|>|<)\s*(\d+)$")
_SLICE_RE = re.compile(r"^(blocks|layers)\[\s*(-?\d*)\s*(?::\s*(-?\d*)\s*)?\]$")
_STAGES = {"encoder": "down", "down": "down", "mid": "mid", "decoder": "up", "up": "up", "double": "double"}


@dataclass(frozen=True)
class LayerMap(Sequence[LayerInfo]):
    """All attention layers of one denoiser, in execution order."""

    family: Family
    layers: tuple[LayerInfo, ...]

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def by_name(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def num_blocks(self) -> int:
        return max(layer.block for layer in self.layers) + 1

    def choices(self) -> str:
        """Human-readable list of the selector terms valid for this model."""
        kinds = sorted({layer.kind for layer in self.layers})
        stages = [s for s in ("encoder", "mid", "decoder", "double")
                  if any(_stage_matches(layer, s) for layer in self.layers)]
        levels = list(dict.fromkeys(layer.level for layer in self.layers))
        res = sorted({layer.native_res for layer in self.layers}, reverse=True)
        return (
            f"kinds {', '.join(kinds)}{', text' if any(la.has_text_keys for la in self.layers) else ''}; "
            f"stages {', '.join(stages)}; levels {', '.join(levels)}; res {', '.join(map(str, res))}; "
            f"blocks[0:{self.num_blocks}]; layers[0:{len(self.layers)}]; or a glob on processor names "
            f"such as {self.layers[0].module_name.split('.')[0]}.*"
        )

    def select(self, selector: Selector = None) -> list[LayerInfo]:
        """Layers matching ``selector`` (None = all). Raises :class:`LayerSelectionError` if none match."""
        if selector is None:
            return list(self.layers)
        if callable(selector) and not isinstance(selector, str):
            chosen = [layer for layer in self.layers if selector(layer)]
            label = getattr(selector, "__name__", "callable")
        else:
            alternatives = [selector] if isinstance(selector, str) else list(selector)
            if not alternatives:
                raise LayerSelectionError(f"empty layer selector; valid terms for this {self.family.title}: "
                                          f"{self.choices()}")
            preds = [self._parse(alt) for s in alternatives for alt in s.split(",")]
            chosen = [layer for layer in self.layers if any(all(p(layer) for p in conj) for conj in preds)]
            label = selector if isinstance(selector, str) else ", ".join(alternatives)
        if not chosen:
            raise LayerSelectionError(
                f"layer selector {label!r} matched none of the {len(self.layers)} attention layers of this "
                f"{self.family.title}; valid terms: {self.choices()}"
            )
        return chosen

    def _parse(self, text: str) -> list[Callable[[LayerInfo], bool]]:
        terms = [t for t in re.split(r"[&\s]+", text.strip()) if t]
        if not terms:
            raise LayerSelectionError(f"empty term in layer selector {text!r}; valid terms: {self.choices()}")
        return [self._term(t) for t in terms]

    def _term(self, term: str) -> Callable[[LayerInfo], bool]:
        if term.startswith("!"):
            inner = self._term(term[1:])
            return lambda layer: not inner(layer)
        low = term.lower()
        if low in ("all", "*"):
            return lambda layer: True
        if low in ("self", "cross", "joint"):
            return lambda layer: layer.kind == low
        if low == "text":
            return lambda layer: layer.has_text_keys
        if low == "single":
            return lambda layer: layer.kind == "single"
        if low == "decoder-high-res":  # the decoder's two highest-resolution attention levels (FreeCustom, MagicFace)
            decoder = sorted({la.downsample for la in self.layers if la.stage == "up"})[:2]
            return lambda layer: layer.stage == "up" and layer.downsample in decoder
        if low in _STAGES:
            return lambda layer: _stage_matches(layer, low)
        if re.fullmatch(r"(down|up)\.\d+", low):
            return lambda layer: layer.level == low
        if m := _CMP_RE.match(low):
            attr, op, value = m[1], _CMP[m[2]], int(m[3])
            key = (lambda la: la.native_res) if attr == "res" else (lambda la: la.downsample)
            return lambda layer: op(key(layer), value)
        if m := _SLICE_RE.match(low):
            what, a, b = m[1], m[2], m[3]
            size = self.num_blocks if what == "blocks" else len(self.layers)
            if b is None and ":" not in low:
                if a in ("", "-"):
                    raise LayerSelectionError(f"bad index in layer selector term {term!r}")
                i = int(a) % size if -size <= int(a) < size else None
                picked = {i} if i is not None else set()
            else:
                picked = set(range(size)[slice(int(a) if a not in ("", "-") else None,
                                               int(b) if b not in (None, "", "-") else None)])
            attr = "block" if what == "blocks" else "index"
            return lambda layer: getattr(layer, attr) in picked
        if any(ch in term for ch in "*?[") or "." in term:
            pattern = term if term.endswith(".processor") or term.endswith("*") else term + "*"
            if not any(fnmatch.fnmatchcase(layer.name, pattern) for layer in self.layers) and not any(
                ch in term for ch in "*?["
            ):
                raise LayerSelectionError(
                    f"{term!r} is not a processor name of this {self.family.title}; valid terms: {self.choices()}"
                )
            return lambda layer: fnmatch.fnmatchcase(layer.name, pattern)
        raise LayerSelectionError(f"unknown layer selector term {term!r}; valid terms: {self.choices()}")

    def summary(self) -> str:
        """A table of every layer (for ``attnctrl info --layers`` and debugging)."""
        rows = [f"{'#':>3} {'block':>5} {'kind':<6} {'level':<7} {'ds':>2} {'res':>4}  name"]
        for la in self.layers:
            rows.append(f"{la.index:>3} {la.block:>5} {la.kind:<6} {la.level:<7} {la.downsample:>2} "
                        f"{la.native_res:>4}  {la.name}")
        return "\n".join(rows)


def _stage_matches(layer: LayerInfo, term: str) -> bool:
    return layer.stage == _STAGES[term]

