"""Read and edit any intermediate tensor by module name, per sampler step and guidance branch.

    with kandinsky.capture(pipe, "unet.mid", steps=[0, 9]) as rec:
        pipe.text2img(embeds, negative, num_inference_steps=10)
    rec["unet.mid", 9, "cond"]          # (1, C, h/8, w/8): the conditional half at step 9

    with kandinsky.intervene(pipe, "unet.mid", lambda x, ctx: x + d):
        pipe.text2img(...)              # every step, both branches, edited

Names are those of ``named_modules()``; in a pipeline they are prefixed with the component
(``unet.``, ``movq.``, ``prior.``, ``text_encoder.``, ``image_encoder.``): see
:mod:`kandinsky.research.targets`. The step and the guidance branches come from
:func:`kandinsky.calls.current_call`, which the denoisers set around every model forward: with
``("uncond", "cond")`` the first half of the batch is the unconditional pass, and records /
edits are split accordingly.

Everything is plain PyTorch forward hooks on the matched modules, installed when the
``with`` block starts and removed when it ends: outside the block the models carry no hooks.
Attention probabilities and attention edits go through :func:`kandinsky.attention.hook_layer`,
which reroutes the single :func:`~kandinsky.attention.attention` call of the chosen layers only;
what their keys are (image tokens, text tokens) each layer declares (``token_layout()``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Callable

import torch

import kandinsky.attention as attn
from kandinsky.calls import current_call
from kandinsky.research.targets import attention_layout, is_attention, map_tensors, match, tensors

REDUCTIONS = {
    "mean": lambda t: t.mean(dim=0, keepdim=True),  # over the batch: (B, ...) -> (1, ...)
    "mean_heads": lambda t: t.mean(dim=1),  # attention (B, heads, Lq, Lk) -> (B, Lq, Lk)
}


# ----------------------------------------------------------------------------- steps, branches
def step_filter(steps) -> Callable[[int | None], bool]:
    """steps: None (all, and calls outside a sampling run), an int, an iterable, a range or a slice."""
    if steps is None:
        return lambda step: True
    if isinstance(steps, slice):
        start, stop, stride = steps.start or 0, steps.stop, steps.step or 1
        return lambda s: s is not None and s >= start and (stop is None or s < stop) and (s - start) % stride == 0
    if isinstance(steps, int):
        steps = [steps]
    try:
        wanted = frozenset(int(s) for s in steps)
    except (TypeError, ValueError):
        raise TypeError(f"steps must be an int, a list, a range or a slice of step indices, got {steps!r}") from None
    return lambda s: s in wanted


def branch_filter(branch) -> Callable[[str | None], bool]:
    if branch is None:
        return lambda b: True
    wanted = {branch} if isinstance(branch, str) else set(branch)
    unknown = wanted - {"uncond", "cond"}
    if unknown:
        raise ValueError(f"branch must be 'uncond', 'cond' or a list of them, got {branch!r}")
    return lambda b: b in wanted


@dataclasses.dataclass(frozen=True)
class Context:
    """What an edit function is told about the call it edits."""

    name: str  # the module's (prefixed) name
    step: int | None  # sampler step index; None outside a sampling run
    timestep: float | None
    branch: str | None  # "uncond" / "cond" inside a sampling run, None outside
    stage: str | None = None  # "prior" / "decoder"


def _calls(name: str):
    """[(Context, slice of the batch)] for the call in progress: one per guidance branch."""
    call = current_call()
    if call is None:
        return [(Context(name, None, None, None), None)]
    n = len(call.branches)
    return [(Context(name, call.step, call.timestep, b, call.stage), (i, n)) for i, b in enumerate(call.branches)]


def _chunk(x, part):
    """The part (i, n) of a batched output along dim 0 (tensors inside tuples / dataclasses too)."""
    if part is None:
        return x
    i, n = part
    return map_tensors(lambda t: t.chunk(n, dim=0)[i], x)


# ----------------------------------------------------------------------------- the record
class Record:
    """Tensors recorded by :func:`capture`, keyed by (name, step, branch).

    ``rec[name]``, ``rec[name, step]`` and ``rec[name, step, branch]`` return the one tensor
    recorded there (outside a sampling run step and branch are None); ``rec.stack(name,
    branch="cond")`` stacks the steps (S, ...); ``rec.calls(key)`` lists repeated calls.
    ``rec.meta[name]`` says how an attention record's keys are laid out.
    """

    def __init__(self):
        self.data: dict[tuple, list] = {}
        self.meta: dict[str, dict] = {}

    def add(self, name, step, branch, value) -> None:
        self.data.setdefault((name, step, branch), []).append(value)

    def keys(self) -> list[tuple]:
        return list(self.data)

    @property
    def names(self) -> list[str]:
        return sorted({k[0] for k in self.data})

    def steps(self, name: str | None = None) -> list:
        return sorted({k[1] for k in self.data if name in (None, k[0]) and k[1] is not None})

    def _select(self, key) -> list[tuple]:
        key = key if isinstance(key, tuple) else (key,)
        if not 1 <= len(key) <= 3:
            raise KeyError(f"index a record with name, (name, step) or (name, step, branch), got {key!r}")
        hits = [k for k in self.data if k[: len(key)] == key]
        if not hits:
            raise KeyError(f"nothing recorded for {key!r}; recorded: {self._summary()}")
        return hits

    def calls(self, key) -> list:
        """Every value recorded under ``key`` (one per call; several when a model ran twice at one step)."""
        return [v for k in self._select(key) for v in self.data[k]]

    def __getitem__(self, key):
        hits = self._select(key)
        if len(hits) > 1:
            raise KeyError(
                f"{key!r} holds {len(hits)} records ({', '.join(map(repr, hits[:6]))}...); "
                "index with (name, step, branch)"
            )
        values = self.data[hits[0]]
        if len(values) > 1:
            raise KeyError(f"{hits[0]!r} was recorded {len(values)} times; use rec.calls({hits[0]!r})")
        return values[0]

    def __contains__(self, key) -> bool:
        try:
            return bool(self._select(key))
        except KeyError:
            return False

    def __len__(self) -> int:
        return sum(len(v) for v in self.data.values())

    def stack(self, name: str, branch: str | None = None) -> torch.Tensor:
        """The records of ``name`` over the steps, in step order: (S, ...) (one branch; the last
        call of a step when a sampler evaluates the model several times per step)."""
        keys = sorted((k for k in self.data if k[0] == name and k[2] == branch and k[1] is not None),
                      key=lambda k: k[1])
        if not keys:
            raise KeyError(f"nothing recorded for {name!r} in branch {branch!r}; recorded: {self._summary()}")
        return torch.stack([self.data[k][-1] for k in keys])

    @property
    def nbytes(self) -> int:
        """Bytes held by the recorded tensors (their storages, counted once)."""
        seen, total = set(), 0
        for values in self.data.values():
            for v in values:
                for t in tensors(v):
                    s = t.untyped_storage()
                    if s.data_ptr() not in seen:
                        seen.add(s.data_ptr())
                        total += s.nbytes()
        return total

    def _summary(self) -> str:
        names = self.names
        return f"{len(names)} names ({', '.join(names[:5])}{'...' if len(names) > 5 else ''}), steps {self.steps()}"

    def __repr__(self) -> str:
        return f"Record({len(self)} tensors: {self._summary()})"


def _warn_if_silent(fired: list, what: str, patterns, stacklevel: int) -> None:
    if not fired:
        warnings.warn(
            f"{what} {patterns!r}: no matched module ran inside the block. If the model is compiled "
            "(torch.compile), its graph does not run hooks added after compiling: use the eager model.",
            stacklevel=stacklevel,  # the user's `with` line
        )


def _shrink(reduce, to, dtype):
    """The function applied to each recorded tensor: detach, reduce, move / cast."""
    if isinstance(reduce, str):
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {sorted(REDUCTIONS)} or a function, got {reduce!r}")
        reduce = REDUCTIONS[reduce]
    elif reduce is not None and not callable(reduce):
        raise TypeError(f"reduce must be one of {sorted(REDUCTIONS)} or a function tensor -> tensor, got {reduce!r}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (e.g. torch.float16), got {dtype!r}")
    try:
        to = torch.device(to) if to is not None else None
    except (RuntimeError, TypeError):
        raise ValueError(f"to must be a device like 'cpu' or 'cuda:0', got {to!r}") from None

    def shrink(t: torch.Tensor) -> torch.Tensor:
        source = t.untyped_storage()
        t = t.detach()
        if reduce is not None:
            t = reduce(t)
        if to is not None or dtype is not None:
            t = t.to(device=to, dtype=dtype)
        if t.untyped_storage().data_ptr() == source.data_ptr() and t.numel() * t.element_size() < source.nbytes():
            t = t.clone()  # a view of part of the output (one branch, a slice): keep a copy, not all of it
        return t

    return shrink


# ----------------------------------------------------------------------------- capture
@contextlib.contextmanager
def capture(target, patterns, *, steps=None, branch=None, attention: bool = False, reduce=None, to=None,
            dtype=None):
    """Record the outputs of the modules matching ``patterns`` (globs over module names).

    target     a model, or a PriorPipeline / DecoderPipeline / Kandinsky (names prefixed
               with the component: "unet.mid", "prior.blocks.3", "movq.decoder.up.0", ...)
    steps      only these sampler steps (int, list, range or slice); None = every call
    branch     "cond" / "uncond": only that half of a guided batch; None = both
    attention  record the attention probabilities (B, heads, Lq, Lk) of the matched attention
               layers instead of their outputs (only attention layers are matched then)
    reduce     "mean" (over the batch, keeps dim 0 as 1), "mean_heads" (attention: over heads)
               or a function tensor -> tensor, applied as it records
    to, dtype  move / cast each record as it is taken (e.g. to="cpu", dtype=torch.float16)

    Yields a :class:`Record`, filled as the block runs; the hooks are gone after it.
    """
    keep_step, keep_branch = step_filter(steps), branch_filter(branch)
    shrink = _shrink(reduce, to, dtype)
    rec = Record()
    modules = match(target, patterns, only=is_attention if attention else None,
                    what="attention layer" if attention else "module")
    if attention:
        rec.meta.update({name: attention_layout(module) for name, module in modules.items()})

    fired = []

    def store(name, get):
        """Record get(part) for each guidance branch of the call in progress the filters keep
        (nothing is computed for the others)."""
        if not fired:
            fired.append(True)
        for ctx, part in _calls(name):
            if keep_step(ctx.step) and keep_branch(ctx.branch):
                rec.add(name, ctx.step, ctx.branch, map_tensors(shrink, get(part)))

    with contextlib.ExitStack() as stack:
        for name, module in modules.items():
            if attention:
                stack.enter_context(attn.hook_layer(module, _probability_recorder(name, store)))
            else:
                handle = module.register_forward_hook(
                    lambda mod, args, out, name=name: store(name, lambda part: _chunk(out, part)))
                stack.callback(handle.remove)
        yield rec
    _warn_if_silent(fired, "capture", patterns, stacklevel=4)


def _probability_recorder(name, store):
    """A layer hook recording softmax(q k^T / sqrt(d) + mask), per branch, then computing as usual."""

    def probs(q, k, mask, causal, part):
        if mask is not None and mask.shape[0] != 1:  # a per-row mask splits with the batch
            mask = _chunk(mask, part)
        return attn.attention_probs(_chunk(q, part), _chunk(k, part), None, mask, causal)

    def record(q, k, v, mask, causal, compute):
        with torch.no_grad():
            store(name, lambda part: probs(q, k, mask, causal, part))
        return compute(q, k, v, mask, causal)

    return record


# ----------------------------------------------------------------------------- intervene
class AttentionEdit:
    """An edit made inside an attention layer (on q, k, v or the per-head output) rather than
    on a module's output. ``fn(q, k, v, mask, causal, compute, rows, layout)`` where ``rows`` is a
    (B,) bool tensor of the batch rows to edit (the chosen branches) or None for all, and
    ``layout`` the layer's token layout (``token_layout()``). ``needs``: the layout kind the edit
    works on ("added_kv": the UNet's), None for any."""

    def __init__(self, fn, needs: str | None = None, what: str = "attention edit"):
        self.fn, self.needs, self.what = fn, needs, what


def _rows(name, keep_step, keep_branch, batch: int, device) -> torch.Tensor | None | bool:
    """Which rows of the batch to edit at the call in progress: None = all, False = none."""
    calls = _calls(name)
    chosen = [keep_step(c.step) and keep_branch(c.branch) for c, _ in calls]
    if all(chosen):
        return None
    if not any(chosen):
        return False
    n = len(calls)
    return torch.tensor(chosen, device=device).repeat_interleave(batch // n)  # (B,)


@contextlib.contextmanager
def intervene(target, pattern, fn, *, steps=None, branch=None):
    """Replace the output of the modules matching ``pattern`` by ``fn(output, ctx)``.

    ``ctx`` is a :class:`Context` (name, step, timestep, branch, stage). In a guided sampling
    run ``fn`` sees each branch's half of the batch separately (ctx.branch "uncond" / "cond").
    ``steps`` (int, list, range, slice) and ``branch`` limit where the edit applies; elsewhere
    the output is untouched. ``fn`` may also be an :class:`AttentionEdit` (``ablate_heads``,
    ``drop_image_tokens``, ``scale_image_tokens``): then it acts inside the matched attention
    layers. An ``fn`` that returns its input leaves the output bit-identical.
    """
    keep_step, keep_branch = step_filter(steps), branch_filter(branch)
    if isinstance(fn, AttentionEdit):
        cm = _intervene_attention(target, pattern, fn, keep_step, keep_branch)
    elif callable(fn):
        cm = _intervene_outputs(target, pattern, fn, keep_step, keep_branch)
    else:
        raise TypeError(f"fn must be a function fn(output, ctx) -> output or an AttentionEdit, got {fn!r}")
    with cm:
        yield


@contextlib.contextmanager
def _intervene_outputs(target, pattern, fn, keep_step, keep_branch):
    fired = []

    def edit(name, output):
        if not fired:
            fired.append(True)
        calls = _calls(name)
        parts, changed = [], False
        for ctx, part in calls:
            chunk = _chunk(output, part)
            new = fn(chunk, ctx) if keep_step(ctx.step) and keep_branch(ctx.branch) else chunk
            changed |= new is not chunk
            parts.append(new)
        if not changed:
            return None  # the module's own output, untouched
        if len(parts) == 1:
            return parts[0]
        if not all(isinstance(p, torch.Tensor) for p in parts):
            raise TypeError(f"intervene on {name!r}: per-branch edits need a tensor output, "
                            f"got {type(output).__name__}")
        return torch.cat(parts, dim=0)

    with contextlib.ExitStack() as stack:
        for name, module in match(target, pattern).items():
            handle = module.register_forward_hook(lambda mod, args, out, name=name: edit(name, out))
            stack.callback(handle.remove)
        yield
    _warn_if_silent(fired, "intervene", pattern, stacklevel=6)


@contextlib.contextmanager
def _intervene_attention(target, pattern, edit: AttentionEdit, keep_step, keep_branch):
    modules = match(target, pattern, only=is_attention, what="attention layer")
    for name, module in modules.items():
        if edit.needs and attention_layout(module)["kind"] != edit.needs:
            raise ValueError(f"{edit.what} needs {edit.needs} attention layers (the UNet's), but {name!r} is "
                             f"{type(module).__name__}; match e.g. 'unet.*attn*'")

    fired = []

    def layer_hook(name, layout):
        def hook(q, k, v, mask, causal, compute):
            if not fired:
                fired.append(True)
            rows = _rows(name, keep_step, keep_branch, q.shape[0], q.device)
            if rows is False:
                return compute(q, k, v, mask, causal)
            return edit.fn(q, k, v, mask, causal, compute, rows, layout)

        return hook

    with contextlib.ExitStack() as stack:
        for name, module in modules.items():
            stack.enter_context(attn.hook_layer(module, layer_hook(name, attention_layout(module))))
        yield
    _warn_if_silent(fired, "intervene", pattern, stacklevel=6)


# ----------------------------------------------------------------------------- ready-made edits
def _row_mask(rows, batch: int, device) -> torch.Tensor:
    return torch.ones(batch, dtype=torch.bool, device=device) if rows is None else rows


def ablate_heads(heads) -> AttentionEdit:
    """Zero the outputs of these attention heads (indices) before the output projection."""
    heads = [heads] if isinstance(heads, int) else list(heads)

    def fn(q, k, v, mask, causal, compute, rows, layout):
        out = compute(q, k, v, mask, causal)  # (B, heads, Lq, d)
        H = out.shape[1]
        if any(not -H <= h < H for h in heads):
            raise ValueError(f"ablate_heads: head indices {heads} out of range for a layer with {H} heads")
        keep = torch.ones(out.shape[0], H, 1, 1, dtype=out.dtype, device=out.device)
        sel = _row_mask(rows, out.shape[0], out.device)
        keep[sel.nonzero()[:, 0][:, None], torch.tensor(heads, dtype=torch.long)[None, :]] = 0
        return out * keep

    return AttentionEdit(fn, what="ablate_heads")


def scale_image_tokens(scale: float) -> AttentionEdit:
    """Multiply what the image tokens (32) contribute to a UNet attention layer by ``scale``
    (their values scaled; the attention weights are not renormalised, as prompt-to-prompt's
    reweighting). scale=0 removes their contribution but keeps their share of the softmax."""

    def fn(q, k, v, mask, causal, compute, rows, layout):
        factor = torch.ones(v.shape[0], 1, v.shape[2], 1, dtype=v.dtype, device=v.device)  # (B, 1, Lk, 1)
        sel = _row_mask(rows, v.shape[0], v.device)
        factor[sel, :, :layout["image_tokens"]] = scale
        return compute(q, k, v * factor, mask, causal)

    return AttentionEdit(fn, needs="added_kv", what="scale_image_tokens")


def drop_image_tokens() -> AttentionEdit:
    """Hide the image tokens (32) from a UNet attention layer: the pixels attend to each other only."""

    def fn(q, k, v, mask, causal, compute, rows, layout):
        allowed = torch.ones(k.shape[0], 1, 1, k.shape[2], dtype=torch.bool, device=k.device)  # (B, 1, 1, Lk)
        sel = _row_mask(rows, k.shape[0], k.device)
        allowed[sel, :, :, :layout["image_tokens"]] = False
        if mask is not None:
            allowed = allowed & mask if mask.dtype == torch.bool else torch.where(allowed, mask, float("-inf"))
        return compute(q, k, v, allowed, causal)

    return AttentionEdit(fn, needs="added_kv", what="drop_image_tokens")


def add_direction(direction: torch.Tensor, scale: float = 1.0):
    """fn(x, ctx) = x + scale * direction (broadcast), e.g. an "h-space" direction of the UNet's
    mid-block output (Asyrp): direction (C, h, w) or (C, 1, 1) for ``unet.mid``'s (B, C, h, w)."""
    if not isinstance(direction, torch.Tensor):
        raise TypeError(f"direction must be a tensor, got {type(direction).__name__}")

    def fn(x, ctx):
        return x + scale * direction.to(device=x.device, dtype=x.dtype)

    return fn


def patch_from(record: Record):
    """Activation patching: fn(x, ctx) = the tensor ``record`` holds for (ctx.name, ctx.step,
    ctx.branch), recorded by :func:`capture` on the same modules in another run (no reduce)."""

    def fn(x, ctx):
        key = (ctx.name, ctx.step, ctx.branch)
        y = record[key]
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"patch_from: the record at {key} is {got} but the module outputs {tuple(x.shape)}; "
                             "record it with capture(...) without reduce, with the same batch")
        return y.to(device=x.device, dtype=x.dtype)

    return fn
