"""The controller: installs a method's processors on a denoiser, tracks denoising steps, and undoes it all exactly.

There is one :class:`Controller` per denoiser while at least one method is applied (kept in a weak registry, never
as an attribute of the model). It

* holds the :class:`~attnctrl.core.layers.LayerMap` and the methods applied (:class:`Handle` objects), each owning
  a disjoint set of layers;
* snapshots the processor of every layer a method takes and, on removal, puts back the very same objects (an
  IP-Adapter or another plugin's processor survives), then removes every hook it added;
* registers one forward pre-hook on the denoiser that reads the call (timestep, batch, token grid, text length:
  :class:`~attnctrl.core.families.CallInfo`) and advances the step index: a timestep lower than the previous one
  is the next step, a higher one starts a new run (schedulers count down), and so does a new schedule (the
  pipeline's ``scheduler.timesteps``, which every call sets anew: two one-step runs have equal timesteps); equal
  timesteps (CFG in separate calls, several branches per step) stay in the same step;
* carries method state, so nothing travels through ``cross_attention_kwargs``.

Two kinds of config reach it. A :class:`Plugin` (AttentionMaps, AgentAttention, CLEAR) makes its own state and
processors and is installed with :func:`apply` for as long as the caller likes. A plain :class:`Method` config of a
pipeline method (FreeCustom, CLoRA, ...) cannot run on its own: its pipeline makes the per-call state and installs
the processors for one call with :func:`bind`; :func:`apply` refuses it and names the pipeline to use.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from .errors import AttnCtrlError, LayerConflictError, LayerSelectionError, NotAPluginError, UnsupportedModelError
from .families import FAMILIES, CallInfo, detect_family, find_denoiser, read_call
from .layers import LayerInfo, Selector, describe
from .processor import AttnCtrlProcessor

__all__ = ["Method", "Plugin", "MethodState", "Handle", "Controller", "apply", "bind", "remove", "applied"]

logger = logging.getLogger("attnctrl")


class MethodState:
    """Per-application state of a method; the controller calls these hooks."""

    def on_run(self, ctl: Controller) -> None:
        """A new denoising run starts (step 0)."""

    def on_step(self, ctl: Controller) -> None:
        """The step index changed (``ctl.step``). Decide here, not in a processor, what depends on the step: this
        runs before the denoiser's forward, outside any ``torch.compile`` graph, so a step number read inside the
        forward does not recompile the model at every step (see :meth:`AttnCtrlProcessor.on_step`)."""

    def close(self) -> None:
        """The method is being removed: drop hooks and references."""


@dataclass(frozen=True)
class Method:
    """Base of every method config: a frozen dataclass with the spec's defaults, validated on construction.

    Subclasses set ``name`` (the CLI/job name), ``families`` they support, ``kinds`` of layers they act on and
    ``default_layers``. A config of a method that needs its own pipeline names it in ``pipeline`` (e.g.
    ``"FreeCustomPipeline"``, an attribute of :mod:`attnctrl.pipelines`); the pipeline installs the method's
    processors for each call with :func:`bind`. Methods that are pure processor plugins subclass :class:`Plugin`.
    """

    layers: Selector = None

    name: ClassVar[str] = "method"
    families: ClassVar[tuple[str, ...]] = ("sd", "sdxl", "flux", "cogvideox")
    kinds: ClassVar[tuple[str, ...]] = ("self", "cross", "joint", "single")
    default_layers: ClassVar[Selector] = "all"
    pipeline: ClassVar[str | None] = None  # the attnctrl.pipelines class that runs this method (None: a Plugin)

    def __post_init__(self) -> None:
        # lists are accepted for convenience and frozen to tuples so configs stay hashable and comparable
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
            numbers = value if isinstance(value, (list, tuple)) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                raise AttnCtrlError(f"{type(self).__name__}: {f.name} must be a finite number, got {value!r}")

    def select_layers(self, ctl: Controller) -> list[LayerInfo]:
        selector = self.default_layers if self.layers is None else self.layers
        chosen = ctl.layers.select(selector)
        usable = [layer for layer in chosen if layer.kind in self.kinds]
        if not usable:
            raise LayerSelectionError(
                f"{type(self).__name__} acts on {'/'.join(self.kinds)} attention, but the layers selected by "
                f"{selector!r} are all {'/'.join(sorted({la.kind for la in chosen}))}"
            )
        return usable


@dataclass(frozen=True)
class Plugin(Method):
    """A method that works on any pipeline of its families by itself: :func:`apply` installs it.

    Subclasses implement :meth:`make_processor` (and :meth:`create_state` when they keep state); ``handle_class``
    may give the :class:`Handle` extra methods (e.g. heat maps).
    """

    handle_class: ClassVar[type | None] = None  # defaults to Handle

    def create_state(self, ctl: Controller, layers: list[LayerInfo]) -> MethodState:
        return MethodState()

    def make_processor(self, layer: LayerInfo, ctl: Controller, state: MethodState) -> AttnCtrlProcessor:
        raise NotImplementedError


def _check_plugin(config) -> None:
    """A clear error, decided by the config's type, for anything :func:`apply` cannot install."""
    if isinstance(config, Plugin):
        return
    if isinstance(config, Method):
        if config.pipeline:
            raise NotAPluginError(
                f"{type(config).__name__} is not a plugin: it runs in its own pipeline; use "
                f"attnctrl.pipelines.{config.pipeline}.from_pipe(pipe)"
            )
        raise NotAPluginError(f"{type(config).__name__} is a config without processors; attnctrl.apply takes a "
                              f"Plugin config such as attnctrl.methods.AttentionMaps(...)")
    raise TypeError(f"expected a method config such as attnctrl.methods.AttentionMaps(...), got {config!r}")


class Handle:
    """One method applied to one denoiser. ``remove()`` (or leaving the ``with`` block) undoes it exactly.

    A handle counts its uses: :func:`apply` of an equal config returns the installed handle with one more use, and
    ``remove()`` gives one back, uninstalling at the last, so nested ``with attnctrl.apply(pipe, cfg):`` blocks keep
    the outer one working. :func:`remove` (and a new config of the same method) uninstalls it whatever the count.
    """

    def __init__(self, controller: Controller, config: Method, layers: list[LayerInfo], state: MethodState):
        self.controller = controller
        self.config = config
        self.layers = layers
        self.state = state
        self.processors: dict[str, object] = {}
        self.previous: dict[str, object] = {}
        self.caller = None  # bind(): weak reference to the pipeline whose call this handle serves
        self.uses = 1  # apply() of an equal config adds one, remove() gives one back (see the class docstring)

    def __repr__(self) -> str:
        status = ("applied" + (f" x{self.uses}" if self.uses > 1 else "")) if self.active else "removed"
        return f"<{type(self).__name__} {self.config!r} on {len(self.layers)} layers, {status}>"

    @property
    def active(self) -> bool:
        return self in self.controller.handles

    def remove(self) -> None:
        """Give back one use of this handle; at the last one, restore the previous processors of this method's layers
        and drop its state. Once removed, it does nothing (idempotent)."""
        if not self.active:
            return
        self.uses -= 1
        if self.uses <= 0:
            self.controller.uninstall(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def check_prompt(self, prompt: str) -> None:
        """Raise a clear error now if the method cannot work with ``prompt`` (e.g. a named word is absent),
        instead of failing after a whole generation."""

    def artifacts(self, index: int = 0, image=None) -> dict:
        """Extra outputs of the method for batch item ``index`` of the last generation (e.g. attention heat maps
        over ``image``), as ``{name: PIL image}``."""
        return {}


_CONTROLLERS: weakref.WeakKeyDictionary[torch.nn.Module, Controller] = weakref.WeakKeyDictionary()


class Controller:
    """See the module docstring. Obtain one with :meth:`Controller.of`; :func:`apply` does it for you."""

    def __init__(self, denoiser: torch.nn.Module, pipe=None):
        self.denoiser = denoiser
        self.family = detect_family(denoiser)
        self.layers = describe(denoiser)
        self._pipe = weakref.ref(pipe) if pipe is not None else None
        self.handles: list[Handle] = []
        self.call = CallInfo()
        self.step = -1
        self.call_in_step = 0  # denoiser calls already made at this step (FLUX true CFG: 0 = cond, 1 = uncond)
        self.timestep: float | None = None
        self._schedule = None  # the scheduler's timesteps tensor of the current run
        self._hook = denoiser.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    @classmethod
    def of(cls, target, create: bool = True) -> Controller | None:
        denoiser, pipe = find_denoiser(target)
        ctl = _CONTROLLERS.get(denoiser)
        if ctl is None and create:
            ctl = _CONTROLLERS[denoiser] = cls(denoiser, pipe)
        elif ctl is not None and pipe is not None and ctl.pipe is None:
            ctl._pipe = weakref.ref(pipe)
        return ctl

    # -- run state ------------------------------------------------------------------------------------------------
    @property
    def pipe(self):
        """The pipeline whose call is running: the caller of the latest :func:`bind` still installed, else the
        pipeline the controller was created for (a method pipeline shares its denoiser with its base pipeline,
        but keeps its own guidance scale and step count)."""
        for h in reversed(self.handles):
            if h.caller is not None and h.caller() is not None:
                return h.caller()
        return self._pipe() if self._pipe is not None else None

    @property
    def num_steps(self) -> int | None:
        """Steps of the current run, when the controller knows the pipeline."""
        pipe = self.pipe
        if pipe is None:
            return None
        n = getattr(pipe, "_num_timesteps", None)
        if n is None:
            timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
            n = len(timesteps) if timesteps is not None else None
        return n

    @property
    def cfg(self) -> bool:
        """Whether the current call's batch is a CFG batch [uncond; cond] (read from the pipeline before the call)."""
        return self.call.cfg

    def _batch_cfg(self) -> bool:
        if self.family.cfg != "batch":
            return False
        pipe = self.pipe
        return bool(getattr(pipe, "do_classifier_free_guidance", False)) if pipe is not None else False

    @torch.compiler.disable  # Python bookkeeping (a timestep read as a float): outside any compiled graph
    def _pre_forward(self, module, args, kwargs):
        call = read_call(self.family, module, args, kwargs)
        call.cfg = self._batch_cfg()
        t = call.timestep
        self.call = call
        self.call_in_step += 1
        schedule = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        new_schedule = schedule is not None and schedule is not self._schedule
        self._schedule = schedule
        if t is not None:
            if self.step < 0 or self.timestep is None or t > self.timestep or new_schedule:
                self.begin_run()
            elif t < self.timestep:
                self.step += 1
                self.call_in_step = 0
                self._on_step()
            self.timestep = t
        return None

    def begin_run(self) -> None:
        """Start a new run at step 0 (called automatically; pipelines may call it explicitly)."""
        self.step = 0
        self.call_in_step = 0
        self.timestep = None
        for h in self.handles:
            h.state.on_run(self)
        self._on_step()

    def enter_step(self, step: int, **call) -> None:
        """Stand where the pre-forward hook stands before a denoiser call at ``step``: ``call`` sets
        :class:`CallInfo` fields (``cfg`` is read from the pipeline unless given), then the ``on_step`` hooks run.
        For calling processors directly (tests, notebooks)."""
        for key, value in call.items():
            setattr(self.call, key, value)
        if "cfg" not in call:
            self.call.cfg = self._batch_cfg()
        self.step = step
        self._on_step()

    def _on_step(self) -> None:
        for h in self.handles:
            h.state.on_step(self)
            for processor in h.processors.values():
                processor.on_step(self)

    # -- installing -----------------------------------------------------------------------------------------------
    def _set_processor(self, name: str, processor) -> None:
        self.denoiser.get_submodule(name[: -len(".processor")]).set_processor(processor)

    def install(self, config: Method, state: MethodState | None = None, processor_factory=None,
                caller=None, bound: bool = False) -> Handle:
        """Install ``config``: a plugin as :func:`apply` does, or (``bound``) for one call as :func:`bind` does.
        On any error nothing is left changed."""
        try:
            return self._install(config, state, processor_factory, caller, bound or processor_factory is not None)
        except BaseException:
            if not self.handles:
                self.detach()
            raise

    def _install(self, config: Method, state, processor_factory, caller, bound: bool) -> Handle:
        if processor_factory is None:
            _check_plugin(config)
        elif not isinstance(config, Method):
            raise TypeError(f"bind() expects a method config, got {config!r}")
        if self.family.name not in config.families:
            supported = ", ".join(FAMILIES[f].title for f in config.families)
            raise UnsupportedModelError(
                f"{type(config).__name__} does not support the {self.family.title}; it supports: {supported}"
            )
        if not bound:
            for h in self.handles:
                if h.config == config and h.caller is None:
                    h.uses += 1  # applying the same config twice does not stack: one more use of the handle
                    return h
        layers = config.select_layers(self)
        # a new plugin config of the same method replaces the old one (never one bound to a call); other methods
        # must not share a layer
        replaced = [] if bound else [h for h in self.handles if type(h.config) is type(config) and h.caller is None]
        owners = {name: h for h in self.handles if h not in replaced for name in h.processors}
        clashes = [layer.name for layer in layers if layer.name in owners]
        if clashes:
            other = owners[clashes[0]].config
            raise LayerConflictError(
                f"{type(config).__name__} and {type(other).__name__} both want {len(clashes)} layer(s), e.g. "
                f"{clashes[0]}; choose disjoint layers with layers=... or remove one first"
            )
        for h in replaced:
            self.uninstall(h, detach=False)
        if processor_factory is None:  # a plugin makes its own state and processors
            state = config.create_state(self, layers)
            handle = (config.handle_class or Handle)(self, config, layers, state)
            processor_factory = _plugin_factory
        else:
            state = MethodState() if state is None else state
            handle = Handle(self, config, layers, state)
        if caller is not None:
            handle.caller = weakref.ref(caller)
        current = self.denoiser.attn_processors
        try:
            for layer in layers:
                processor = processor_factory(layer, self, state, config)
                for attr in ("_attention_backend", "_parallel_config"):  # set_attention_backend's, kept per layer
                    if getattr(current[layer.name], attr, None) is not None and hasattr(processor, attr):
                        setattr(processor, attr, getattr(current[layer.name], attr))
                handle.previous[layer.name] = current[layer.name]
                handle.processors[layer.name] = processor
                self._set_processor(layer.name, processor)
        except BaseException:
            for name, previous in handle.previous.items():
                self._set_processor(name, previous)
            state.close()
            raise
        self.handles.append(handle)
        return handle

    def uninstall(self, handle: Handle, detach: bool = True) -> None:
        current = self.denoiser.attn_processors
        for name, processor in handle.processors.items():
            if current.get(name) is processor:
                self._set_processor(name, handle.previous[name])
            else:
                logger.warning(
                    "attnctrl: the processor of %s was replaced after %s installed it; leaving the new one in place",
                    name, type(handle.config).__name__,
                )
        handle.state.close()
        handle.uses = 0
        self.handles.remove(handle)
        if detach and not self.handles:
            self.detach()

    def detach(self) -> None:
        """Remove the hook and forget this denoiser (called when the last method is removed)."""
        self._hook.remove()
        if _CONTROLLERS.get(self.denoiser) is self:
            del _CONTROLLERS[self.denoiser]


def _plugin_factory(layer: LayerInfo, ctl: Controller, state: MethodState, config: Plugin) -> AttnCtrlProcessor:
    return config.make_processor(layer, ctl, state)


def apply(target, config: Plugin) -> Handle:
    """Apply a plugin method to a pipeline or denoiser; returns a :class:`Handle` (also a context manager).

    Applying an equal config again returns the existing handle with one more use: handles are reference-counted, so
    ``handle.remove()`` (or leaving its ``with`` block) gives one use back and uninstalls only at the last one. Nested
    blocks therefore work::

        with attnctrl.apply(pipe, AttentionMaps()) as outer:
            with attnctrl.apply(pipe, AttentionMaps()):  # the same handle, now used twice
                pipe(prompt)
            outer.heat_maps()  # still applied; uninstalled when the outer block ends

    :func:`remove` uninstalls at once, whatever the count. A different config of the same method replaces the old
    one (its handle is uninstalled, whatever its count); methods on disjoint layers compose; two methods on the same
    layer raise :class:`LayerConflictError`.
    Unsupported models and selections with no layer raise. The config of a method that runs in its own pipeline
    (FreeCustom, CLoRA, ...) raises :class:`~attnctrl.core.errors.NotAPluginError` naming that pipeline, before
    anything is installed.
    """
    _check_plugin(config)
    return Controller.of(target).install(config)


def bind(target, config: Method, state: MethodState | None = None, processor_factory=None) -> Handle:
    """Install ``config``'s processors on ``target``'s denoiser for one call, with per-call ``state``.

    This is how a method pipeline runs its method: it builds the state of the call (references, masks, the
    segment plan, ...), then ``with bind(self, config, state, MRSAAttnProcessor): ...`` installs, on the layers
    ``config.select_layers`` chooses, one ``processor_factory(layer, controller, state, config)`` per layer (a
    processor class with that constructor will do) and puts the previous processors back when the block ends,
    errors included. The returned :class:`Handle` is the context manager; ``handle.config`` is ``config`` and
    ``handle.state`` is ``state``.

    Unlike :func:`apply` it never returns or replaces an existing handle (each call has its own state), a clash with
    a method already on those layers raises :class:`LayerConflictError`, and while the handle is installed the
    controller reads ``target`` as the running pipeline (``controller.pipe``: CFG layout, step count): a method
    pipeline shares its denoiser, and so its controller, with its base pipeline, but runs with its own guidance.
    A :class:`Plugin` config may leave out ``processor_factory`` and ``state``: it then makes its own, as with
    :func:`apply` (a pipeline borrowing a plugin for one call, e.g. IR-Diffusion's attention maps).
    """
    if processor_factory is None and state is not None:
        raise TypeError("bind(): a state without a processor_factory; give both, or neither for a Plugin config")
    if processor_factory is None:
        _check_plugin(config)
    _, pipe = find_denoiser(target)
    return Controller.of(target).install(config, state, processor_factory, caller=pipe, bound=True)


def remove(target, method: Method | type | Handle | None = None) -> int:
    """Remove every method (or the given config, method class or handle) from ``target`` at once, however many uses
    its handle has (see :func:`apply`); returns how many."""
    ctl = Controller.of(target, create=False)
    if ctl is None:
        return 0
    removed = 0
    for h in list(ctl.handles):
        if (
            method is None
            or h is method
            or h.config == method
            or (isinstance(method, type) and isinstance(h.config, method))
        ):
            ctl.uninstall(h)
            removed += 1
    return removed


def applied(target) -> list[Handle]:
    """The methods currently applied to ``target``'s denoiser, as handles (``handle.config`` is the config)."""
    ctl = Controller.of(target, create=False)
    return list(ctl.handles) if ctl is not None else []
