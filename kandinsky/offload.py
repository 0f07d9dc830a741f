"""Low-memory mode: keep the weights in CPU memory and put each part on the accelerator only
while it runs.

    from kandinsky import Kandinsky
    from kandinsky.offload import enable_offload

    pipe = Kandinsky.from_pretrained(decoder, prior=prior, dtype=torch.float16)   # on the CPU
    enable_offload(pipe, mode="model", device="cuda")
    image = pipe.text2img("a red cat").images[0]

Two modes:

* ``"model"``: a whole component (text encoder, image encoder, prior, UNet, MoVQ) moves to
  ``device`` when it is called and stays there until another component is called; then it
  goes back. At most one component is on the accelerator at a time (the largest, the 1.8 B
  CLIP image tower, sets the peak), the prior included, which the reference cannot offload.
* ``"sequential"``: every layer that holds weights (Linear, Conv2d, norm) moves to ``device``
  for its own forward only, one at a time, as accelerate's sequential offload; embedding
  tables and the tensors a module owns directly (the prior's positional embedding,
  clip_mean, ...) stay on ``device``. The smallest peak, the slowest.

How: forward pre-hooks (and wrappers around the components' other entry points, such as
``movq.decode`` or ``prior.forward_cached``, listed in ``ENTRY_METHODS``) move the weights
in, and tensor arguments to ``device``. Weights move by swapping ``param.data``, so the
modules, their names and any hooks of your own stay as they are; the CPU copy is kept and
reused (nothing is copied back). The pipelines create their tensors on
``pipeline.execution_device`` (set here).

The outputs equal those without offload: the same weights run the same code on the
device you name. ``disable_offload(pipeline)`` puts everything back on the CPU.

Offload saves memory only on a CUDA device: anywhere else the weights already are where they
run. ``offload_helps`` is that rule for every door (``enable_offload``,
``Kandinsky.from_pretrained(offload=...)``, the CLI's ``--offload``): elsewhere they warn and run
without it.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn

from kandinsky.callsite import user_stacklevel

MODES = ("model", "sequential")
# the component attributes of each pipeline (Kandinsky holds .prior and .decoder pipelines)
COMPONENTS = {
    "PriorPipeline": ("text_encoder", "image_encoder", "prior"),
    "DecoderPipeline": ("unet", "movq"),
}
# methods besides forward through which the pipelines run a component
ENTRY_METHODS = ("encode", "decode", "quantize", "prefix", "forward_cached", "normalize", "unnormalize")
# the layers each model reads its `device` and `dtype` from (input checks compare with them):
# sequential mode keeps them on the device (small: input / output projections)
RESIDENT = ("proj_out", "conv_in", "token_embedding", "patch_embedding", "quant_conv")


# ----------------------------------------------------------------------------- moving weights


class Weights:
    """The tensors of some modules (parameters and buffers), moved in and out of ``device``.

    ``modules``: (module, recurse) pairs; recurse=False takes only the module's own tensors.
    The home copies stay where they were loaded (the CPU); ``home`` is what the parameters
    point to while out: the home copies themselves, or (``home="meta"``, for tests) empty meta
    tensors, so that any use of a weight that was not moved in fails loudly.
    """

    def __init__(self, modules: list[tuple[nn.Module, bool]], device: torch.device, home: str = "cpu"):
        self.device = device
        self.slots = []  # (module, kind, name, home tensor)
        for module, recurse in modules:
            for owner in module.modules() if recurse else [module]:
                for name, p in owner._parameters.items():
                    if p is not None:
                        self.slots.append((owner, "_parameters", name, p.data))
                for name, b in owner._buffers.items():
                    if b is not None:
                        self.slots.append((owner, "_buffers", name, b))
        self.home = home
        self.loaded = False
        self.unload()

    def _set(self, owner, kind, name, tensor) -> None:
        if kind == "_parameters":
            param = owner._parameters[name]
            try:
                param.data = tensor
            except RuntimeError:  # meta <-> real: a new Parameter of the same name
                owner._parameters[name] = nn.Parameter(tensor, requires_grad=param.requires_grad)
        else:
            owner._buffers[name] = tensor

    def load(self) -> None:
        for owner, kind, name, t in self.slots:
            self._set(owner, kind, name, t.to(self.device, non_blocking=True))
        self.loaded = True

    def unload(self) -> None:
        for owner, kind, name, t in self.slots:
            out = t if self.home == "cpu" else torch.empty_like(t, device=self.home)
            self._set(owner, kind, name, out)
        self.loaded = False

    def restore(self) -> None:
        """Back to the home copies for good."""
        for owner, kind, name, t in self.slots:
            self._set(owner, kind, name, t)
        self.loaded = False


def to_device(x, device: torch.device):
    """Tensors (also inside lists, tuples and dicts) moved to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def leaves(model: nn.Module) -> list[nn.Module]:
    """The modules without children that hold weights (Linear, Conv2d, norms): the units
    sequential mode streams. Their forward is how every model here uses them, whichever
    method of the parent runs (``prior.prefix`` reaches into its blocks' attention layers).
    Embedding tables are left out (resident): parents index their weights directly
    (position embeddings, the MoVQ codebook)."""
    return [m for m in model.modules()
            if not any(True for _ in m.children()) and (m._parameters or m._buffers)
            and not isinstance(m, nn.Embedding)]


# ----------------------------------------------------------------------------- the offloader


class Offloader:
    """Hooks on the components of one pipeline (or of a Kandinsky's two) that move weights."""

    def __init__(self, components: dict[str, nn.Module], mode: str, device: torch.device, home: str = "cpu"):
        self.mode, self.device = mode, device
        self.components = components
        self.active: str | None = None  # model mode: the component on the device
        self.log: list[str] = []  # what was moved in, in order (names; layers as name.path)
        self.handles = []
        self.wrapped: list[tuple[nn.Module, str]] = []
        self.weights: dict[str, Weights] = {}
        self.swapped: list[tuple[object, type]] = []
        for name, model in components.items():
            if mode == "model":
                self.weights[name] = Weights([(model, True)], device, home)
            else:
                self._stream_layers(name, model, home)
            self._hook_entries(name, model)

    # -- model mode: the whole component
    def enter(self, name: str) -> None:
        if self.mode != "model" or self.active == name:
            return
        if self.active is not None:
            self.weights[self.active].unload()
        self.weights[name].load()
        self.active = name
        self.log.append(name)

    # -- sequential mode: resident own tensors, streamed layers
    def _stream_layers(self, name: str, model: nn.Module, home: str) -> None:
        streamed = [m for m in leaves(model) if not any(m is getattr(model, r, None) for r in RESIDENT)]
        inside = {id(m) for m in streamed}
        resident = [m for m in model.modules() if id(m) not in inside]  # their own tensors only
        self.weights[name] = Weights([(m, False) for m in resident], self.device, home)
        self.weights[name].load()  # stays on the device
        paths = {id(m): path for path, m in model.named_modules()}
        for layer in streamed:
            w = Weights([(layer, True)], self.device, home)
            label = f"{name}.{paths[id(layer)]}"
            self.weights[label] = w

            def pre(module, args, kwargs, w=w, label=label):
                w.load()
                self.log.append(label)
                return to_device(args, self.device), to_device(kwargs, self.device)

            def post(module, args, output, w=w):
                w.unload()

            self.handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            self.handles.append(layer.register_forward_hook(post))

    # -- every entry point: load (model mode) and move the arguments
    def _hook_entries(self, name: str, model: nn.Module) -> None:
        def pre(module, args, kwargs):
            self.enter(name)
            return to_device(args, self.device), to_device(kwargs, self.device)

        self.handles.append(model.register_forward_pre_hook(pre, with_kwargs=True))
        for method in ENTRY_METHODS:
            bound = getattr(model, method, None)
            if bound is None or not callable(bound):
                continue

            @functools.wraps(bound)
            def entry(*args, _bound=bound, **kwargs):
                self.enter(name)
                return _bound(*to_device(args, self.device), **to_device(kwargs, self.device))

            setattr(model, method, entry)  # an instance attribute shadows the class's method
            self.wrapped.append((model, method))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for model, method in self.wrapped:
            delattr(model, method)
        for w in self.weights.values():
            w.restore()
        for obj, base in self.swapped:
            obj.__class__ = base
        self.handles, self.wrapped, self.swapped, self.active = [], [], [], None


# ----------------------------------------------------------------------------- API


def _components(pipeline) -> tuple[list, dict[str, nn.Module]]:
    """(the pipelines, {name: component}) of a PriorPipeline, DecoderPipeline or Kandinsky."""
    kind = type(pipeline).__name__
    if kind in COMPONENTS:
        pipes = [pipeline]
    elif hasattr(pipeline, "prior") and hasattr(pipeline, "decoder"):
        pipes = [pipeline.prior, pipeline.decoder]
    else:
        raise TypeError(
            f"enable_offload takes a PriorPipeline, DecoderPipeline or Kandinsky, got {kind}"
        )
    found = {}
    for pipe in pipes:
        for attr in COMPONENTS[type(pipe).__name__]:
            found[f"{type(pipe).__name__.removesuffix('Pipeline').lower()}.{attr}"] = getattr(pipe, attr)
    return pipes, found


def swap_class(obj, **attributes) -> type:
    """Give ``obj`` a subclass of its class with ``attributes`` (same name); returns the old class."""
    base = type(obj)
    obj.__class__ = type(base.__name__, (base,), {"__module__": base.__module__, **attributes})
    return base


def _set_execution_device(pipe, device: torch.device | None, offloader: Offloader) -> None:
    """Tell the pipeline where its tensors go (its weights are on the CPU between calls)."""
    pipe.execution_device = device
    if pipe.device != device:
        # a pipeline class whose `device` does not consult execution_device (yet): a subclass that does
        offloader.swapped.append((pipe, swap_class(pipe, device=property(lambda self: self.execution_device))))


def check_offload(mode: str, device) -> torch.device:
    """``device`` as a torch.device, once ``mode`` is one of MODES and a CUDA ``device`` is one torch
    sees (else ValueError)."""
    if mode not in MODES:
        raise ValueError(f"offload mode must be one of {MODES}, got {mode!r}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"offload to {device}: torch sees no CUDA device; leave offload out (it saves nothing "
                         "on a CPU) or run on a GPU machine")
    return device


def offload_helps(mode: str | None, device, option: str | None = None) -> bool:
    """The rule at every door (``enable_offload``, ``Kandinsky.from_pretrained(offload=...)``, the CLI's
    ``--offload``): whether offloading in ``mode`` to ``device`` can save memory. On a CUDA device, yes.
    On any other device the weights already are where they run: a warning (naming ``option``, the
    setting as the caller spelled it; default ``offload='<mode>'``) and False, and the caller runs
    without offload. ``mode=None``: False, silently. Bad values: ValueError (``check_offload``)."""
    if mode is None:
        return False
    device = check_offload(mode, device)
    if device.type != "cuda":
        warnings.warn(f"{option or f'offload={mode!r}'} does nothing on {device} (it keeps weights off the GPU "
                      "until they run); running without it", stacklevel=user_stacklevel())
        return False
    return True


def enable_offload(pipeline, mode: str = "model", device="cuda", *, _home: str = "cpu"):
    """Run ``pipeline`` (PriorPipeline, DecoderPipeline or Kandinsky, loaded on the CPU) with each
    component (``mode="model"``) or each layer (``mode="sequential"``) on ``device`` only while
    it runs. Returns the pipeline. ``disable_offload`` undoes it. Where offload saves nothing (not
    on CUDA: ``offload_helps``) it warns and leaves the pipeline as it is (``pipeline.offloader`` None)."""
    device = check_offload(mode, device)
    if getattr(pipeline, "offloader", None) is not None:
        raise ValueError("offload is already enabled on this pipeline; call disable_offload(pipeline) first")
    # (_home="meta", for tests: the weights really are away, so offload has work to do on any device)
    if _home == "cpu" and not offload_helps(mode, device):
        _components(pipeline)  # (a wrong kind of object is still refused)
        pipeline.offloader = None
        return pipeline
    pipes, components = _components(pipeline)
    for name, model in components.items():
        where = {p.device.type for p in model.parameters()}
        if where != {"cpu"}:
            raise ValueError(f"enable_offload: {name} has weights on {sorted(where)}; load the pipeline on the "
                             "CPU (device=None) and let offload move what runs")
    offloader = Offloader(components, mode, device, _home)
    pipeline.offloader = offloader
    for pipe in pipes:
        _set_execution_device(pipe, device, offloader)
    return pipeline


def disable_offload(pipeline):
    """Remove the hooks and leave every weight on the CPU."""
    offloader = getattr(pipeline, "offloader", None)
    if offloader is None:
        return pipeline
    offloader.remove()
    pipeline.offloader = None
    for pipe in _components(pipeline)[0]:
        pipe.execution_device = None
    return pipeline
