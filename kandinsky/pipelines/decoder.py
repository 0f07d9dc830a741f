"""The Kandinsky 2.2 decoder: CLIP image embeddings -> images.

One class for the three decoder checkpoints (subfolders ``unet``, ``movq``, ``scheduler``):

    checkpoint                                    tasks
    kandinsky-2-2-decoder          (in 4)         text2img, img2img
    kandinsky-2-2-decoder-inpaint  (in 9)         inpaint
    kandinsky-2-2-controlnet-depth (image_hint)   controlnet, controlnet_img2img

Every task runs the same core (kandinsky.sampling):

    plan = make_plan(sampler, schedule, num_inference_steps)   (img2img: its last `strength` share)
    x = noise * plan.init_noise_sigma                           (img2img: the image's latents noised)
    denoiser(x, t) = guided eps from unet([x, x], t, [negative_embeds, image_embeds])[:, :4]
    x_0 = sample(sampler, denoiser, x, plan, callback)          (inpaint: the kept area blended back
                                                                  after every step, as a callback)
    image = movq.decode(x_0)

The tasks and their inputs are declared once in tasks.py; ``guidance_scale <= 1`` runs the
positive embedding alone.

Deviations from the reference, on purpose: every image of an inpainting batch is
blended with its own image and mask (the reference blends all with the first);
img2img / controlnet_img2img resize to (height, width) (the reference swaps them); sizes
that are not a multiple of the model's stride are generated at the next multiple and resized
to the size asked; image tasks default to the input picture's size; ``output_type="pt"`` is
(B, 3, H, W) in [0, 1] for every task (the reference's text2img returns [-1, 1]); ``num_images_per_prompt > 1`` works
without guidance (the reference does not repeat the embeddings then); an image, mask or hint
may serve a group of consecutive embeddings (one per prompt); inputs are checked (see images.py).
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kandinsky.checks import with_article
from kandinsky.hub import resolve
from kandinsky.pipelines.images import (
    ImageOutput,
    check_output_type,
    check_same_size,
    format_output,
    grow_repaint_area,
    input_size,
    load_images,
    load_masks,
    normalize,
)
from kandinsky.pipelines.limits import check_memory
from kandinsky.pipelines.stepping import callbacks as _callbacks, check_device, check_finite_tensor, check_generator
from kandinsky.pipelines.stepping import progress as _progress, real_number, ticking as _ticking, to_arguments
from kandinsky.pipelines.tasks import CHECKPOINTS, DECODER_TASKS, TASKS_OF_CHECKPOINT, decoder_options, preset_options
from kandinsky.sampling import samplers
from kandinsky.sampling.denoisers import DecoderDenoiser, check_speedups
from kandinsky.sampling.schedule import NoiseSchedule, randn
from kandinsky.sampling.trajectory import Trajectory
from kandinsky.threads import parameters, threads_for
from weights_convert import load_component

# Kept for code that imported them from here: the tables live in tasks.py.
TASKS = TASKS_OF_CHECKPOINT
HUB_REPOS = CHECKPOINTS
KIND_OF_TASK = {name: t.checkpoint for name, t in DECODER_TASKS.items()}

# A diffusers scheduler object given as ``scheduler=``: its class -> our sampler name.
DIFFUSERS_SCHEDULERS = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "UniPCMultistepScheduler": "unipc",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun",
}


def checkpoint_kind(unet_config, latent_channels: int) -> str:
    """"decoder", "inpaint" or "controlnet", from the UNet's config."""
    hint = unet_config.addition_embed_type == "image_hint"
    sample_channels = unet_config.in_channels - (4 if hint else 0)  # the hint adds 4 inside the UNet
    if hint and sample_channels == latent_channels:
        return "controlnet"
    if not hint and sample_channels == latent_channels:
        return "decoder"
    if not hint and sample_channels == 2 * latent_channels + 1:  # latents, masked-image latents, mask
        return "inpaint"
    raise ValueError(
        f"unet in_channels={unet_config.in_channels} with addition_embed_type="
        f"{unet_config.addition_embed_type!r} is no Kandinsky 2.2 decoder UNet for {latent_channels} "
        f"latent channels (expected {latent_channels}, {2 * latent_channels + 1} for inpainting, or "
        f"{latent_channels + 4} with 'image_hint')."
    )




def _is_int(value) -> bool:
    """Python or numpy integers (not bools)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _check_generator(generator, batch: int) -> None:
    check_generator(generator, batch, "pictures (image embeddings x num_images_per_prompt)")


def sampler_name(scheduler, schedule: NoiseSchedule) -> str:
    """A sampler name from a name or a diffusers scheduler object (checked against this checkpoint)."""
    if isinstance(scheduler, str):
        name = samplers.get_sampler(scheduler).name
        if name not in samplers.sampler_names("decoder"):
            raise ValueError(f"{scheduler!r} is the prior's sampler; the decoder takes one of: "
                             f"{', '.join(samplers.sampler_names())}.")
        return name
    config = getattr(scheduler, "config", None)
    class_name = type(scheduler).__name__
    if config is None or class_name not in DIFFUSERS_SCHEDULERS:
        raise TypeError(
            f"scheduler must be a sampler name ({', '.join(samplers.sampler_names())}), got "
            f"{class_name}{'' if config is None else ' (a diffusers scheduler this decoder cannot run)'}."
        )
    ours = schedule.config
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps"):
        if key in config and getattr(ours, key, None) is not None and config[key] != getattr(ours, key):
            raise ValueError(f"the {class_name} given has {key}={config[key]!r} but this checkpoint was trained "
                             f"with {getattr(ours, key)!r}; pass the sampler's name instead, e.g. "
                             f"scheduler={DIFFUSERS_SCHEDULERS[class_name]!r}.")
    name = DIFFUSERS_SCHEDULERS[class_name]
    if name == "dpmpp_2m" and config.get("use_karras_sigmas"):
        name = "dpmpp_2m_karras"
    return name


class DecoderPipeline:
    """UNet + MoVQ + scheduler of one Kandinsky 2.2 decoder checkpoint.

    Build it with :meth:`from_pretrained`. ``kind`` says which checkpoint it is and
    ``tasks`` which methods it can run; the others raise a ValueError naming the
    checkpoint to load instead.
    """

    execution_device = None  # set by kandinsky.offload: where tensors go while the weights wait on the CPU

    def __init__(self, unet, movq, scheduler, source: str = "this checkpoint", sampler: str | None = None):
        self.unet, self.movq = unet, movq
        self.source = source
        self.latent_channels = movq.config.latent_channels
        self.kind = checkpoint_kind(unet.config, self.latent_channels)
        self.tasks = TASKS_OF_CHECKPOINT[self.kind]
        # MoVQ downsampling and the UNet's halvings: sizes are generated at a multiple of both.
        self.movq_scale_factor = 2 ** (len(movq.config.block_out_channels) - 1)
        self.size_multiple = self.movq_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        self.set_scheduler(scheduler if sampler is None else sampler, schedule=scheduler)

    # ------------------------------------------------------------------ the sampler
    def set_scheduler(self, scheduler, schedule=None) -> None:
        """Choose the decoder's sampler: a name (``ddpm``, ``ddim``, ``dpmpp_2m``, ``dpmpp_2m_karras``,
        ``unipc``, ``euler``, ``euler_a``, ``heun``; case-insensitive), a
        ``kandinsky.sampling.schedule.NoiseSchedule`` (its config's sampler: DDPM or DDIM), or a
        diffusers scheduler object (its class picks the sampler; its betas must be the checkpoint's).
        Every sampler runs on the checkpoint's noise schedule."""
        if isinstance(schedule, NoiseSchedule):
            self._schedule = schedule
        if isinstance(scheduler, NoiseSchedule):
            if scheduler.kind == "unclip":
                raise ValueError("the UnCLIP schedule is the prior's (it predicts x_0 with a cosine schedule); "
                                 f"the decoder takes one of: {', '.join(samplers.sampler_names())}.")
            self._schedule, self.sampler = scheduler, scheduler.kind
        else:
            self.sampler = sampler_name(scheduler if scheduler is not None else self._schedule.kind, self._schedule)

    @property
    def scheduler(self) -> NoiseSchedule:
        """The checkpoint's noise schedule (every sampler runs on it)."""
        return self._schedule

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        folder,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        scheduler=None,
        revision: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> "DecoderPipeline":
        """Load a decoder, decoder-inpaint or controlnet-depth checkpoint folder (or hub id).

        ``dtype`` (default float32) and ``device`` apply to the UNet and MoVQ. ``scheduler``:
        None (the checkpoint's DDPM) or a sampler name (see :meth:`set_scheduler`), a
        ``NoiseSchedule`` or a diffusers scheduler object. ``revision``,
        ``token``, ``local_files_only``: for hub ids (a cached snapshot loads offline; see
        kandinsky.hub.resolve).
        """
        device = check_device(device)
        root = resolve(folder, "decoder checkpoint", revision=revision, token=token, local_files_only=local_files_only)
        ours = isinstance(scheduler, NoiseSchedule)
        needed = ("unet", "movq") + (() if ours else ("scheduler",))
        missing = [sub for sub in needed if not (root / sub).is_dir()]
        if missing:
            index = root / "model_index.json"
            name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
            what = f" (model_index.json says {name})" if name else ""
            raise ValueError(
                f"{root}{what} is not a Kandinsky 2.2 decoder folder: no {', '.join(missing)} subfolder(s). "
                f"Decoder checkpoints are e.g. {', '.join(CHECKPOINTS.values())}."
            )
        if ours:
            schedule = scheduler
        else:
            schedule = NoiseSchedule.from_folder(root / "scheduler")
            if schedule.kind == "unclip":
                raise ValueError(f"{root / 'scheduler'} holds an UnCLIPScheduler config: that is a prior "
                                 "checkpoint's, not a decoder's.")
        # names are checked before the weights are read
        sampler = None if scheduler is None or ours else sampler_name(scheduler, schedule)
        unet = load_component(root / "unet", dtype=dtype, device=device)
        movq = load_component(root / "movq", dtype=dtype, device=device)
        return cls(unet, movq, schedule, source=str(root), sampler=sampler)

    @property
    def device(self) -> torch.device:
        """Where the pipeline's tensors are made: its weights' device, or the offload target."""
        return self.execution_device or next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device=None, dtype=None) -> "DecoderPipeline":
        device, dtype = to_arguments(device, dtype)  # pipe.to(torch.float16) works too
        self.unet.to(device=device, dtype=dtype)
        self.movq.to(device=device, dtype=dtype)
        return self

    def __repr__(self) -> str:
        return f"DecoderPipeline(kind={self.kind!r}, tasks={self.tasks}, sampler={self.sampler!r}, source={self.source!r})"

    # ------------------------------------------------------------------ tasks
    # Each method is one line: the task's inputs are declared in tasks.DECODER_TASKS, the
    # options every task takes in tasks.DECODER_OPTIONS (documented in docs/usage.md).

    def text2img(self, image_embeds, negative_image_embeds=None, **options) -> ImageOutput:
        """Images from CLIP image embeddings (B, D) (e.g. PriorPipeline's output), guided away from
        ``negative_image_embeds`` (B, D) when ``guidance_scale > 1``."""
        return self.run("text2img", image_embeds, negative_image_embeds, **options)

    def img2img(self, image_embeds, image, negative_image_embeds=None, strength: float = 0.3, **options):
        """Re-imagine ``image``: the last ``strength`` share of the schedule is run from the image's
        noised latents (1 = from almost pure noise)."""
        return self.run("img2img", image_embeds, negative_image_embeds, image=image, strength=strength, **options)

    def inpaint(self, image_embeds, image, mask_image, negative_image_embeds=None, **options):
        """Repaint the white / 1 area of ``mask_image`` in ``image``; black / 0 is kept. The area
        to repaint grows by one latent pixel, as in the reference (see images.load_masks for the
        mask rules)."""
        return self.run("inpaint", image_embeds, negative_image_embeds, image=image, mask_image=mask_image,
                        **options)

    def controlnet(self, image_embeds, negative_image_embeds=None, hint=None, **options):
        """text2img guided by ``hint`` (a depth map for the controlnet-depth checkpoint): a (B, 3, H, W)
        or (3, H, W) tensor in [0, 1], a PIL image or a numpy array; one channel is repeated."""
        return self.run("controlnet", image_embeds, negative_image_embeds, hint=hint, **options)

    def controlnet_img2img(self, image_embeds, image, negative_image_embeds=None, hint=None,
                           strength: float = 0.3, **options):
        """img2img guided by a ``hint`` (see :meth:`img2img` and :meth:`controlnet`)."""
        return self.run("controlnet_img2img", image_embeds, negative_image_embeds, image=image, hint=hint,
                        strength=strength, **options)

    @torch.no_grad()
    def run(self, task: str, image_embeds, negative_image_embeds=None, **kwargs) -> ImageOutput:
        """Run decoder task ``task`` (a key of tasks.DECODER_TASKS) with its inputs and options."""
        spec = DECODER_TASKS.get(task)
        if spec is None:
            raise ValueError(f"unknown decoder task {task!r}: one of {', '.join(DECODER_TASKS)}.")
        self.check_task(task)
        inputs = {name: kwargs.pop(name, None) for name in spec.inputs}
        opts = _options(task, spec, kwargs)
        check_output_type(opts["output_type"])
        for name in spec.inputs:
            if inputs[name] is None and name != "strength":
                raise TypeError(f"{task}() needs `{name}`.")
        sampler = self.sampler if opts["scheduler"] is None else sampler_name(opts["scheduler"], self._schedule)
        opts["guidance_scale"] = real_number(opts["guidance_scale"], "guidance_scale")

        n_img = opts["num_images_per_prompt"]
        embeds, batch = self._embeddings(image_embeds, negative_image_embeds, opts["guidance_scale"], n_img)
        _check_generator(opts["generator"], batch)
        size = self._sizes(opts["height"], opts["width"], inputs.get("image", inputs.get("hint")))
        height, width = size.generate
        check_memory(self, batch, height, width, opts["tile"], size.asked)  # a runaway size: refused before any work
        with self.threads(height, width):  # a small decoder runs on one thread (kandinsky.threads)
            plan = self._plan(sampler, opts["num_inference_steps"], spec, inputs.get("strength"))
            check_speedups(opts["cache_interval"], opts["cache_level"], opts["guidance_interval"],
                           self.unet.config.depth, plan)  # before any picture is encoded
            generator = opts["generator"]

            hint = inpaint = blend = None
            if "hint" in spec.inputs:
                hint = self._hint(inputs["hint"], batch, n_img, height, width)
            if spec.start == "image":
                latents = self._noised_image_latents(inputs["image"], batch, n_img, height, width, plan, generator)
            else:
                latents = self._initial_latents(batch, height, width, generator, opts["latents"], plan)
            if task == "inpaint":
                image_latents, keep = self._inpaint_inputs(inputs["image"], inputs["mask_image"], batch, n_img,
                                                           height, width)
                inpaint = torch.cat([image_latents * keep, keep], dim=1)  # (B, 5, h, w)
                blend = _InpaintBlend(image_latents, keep, noise=latents.clone(), plan=plan)

            denoiser = DecoderDenoiser(self.unet, embeds, opts["guidance_scale"], self.latent_channels,
                                       inpaint=inpaint, hint=hint, cache_interval=opts["cache_interval"],
                                       cache_level=opts["cache_level"], guidance_interval=opts["guidance_interval"],
                                       plan=plan)
            recorder = Trajectory() if opts["return_trajectory"] else None
            callback = _callbacks(blend, recorder, opts["callback_on_step_end"])
            with _progress(plan, opts["progress"], "decoder") as bar:
                latents = samplers.sample(sampler, _ticking(denoiser, bar), latents, plan, generator=generator,
                                          callback=callback)
            if task == "inpaint":
                latents = keep * image_latents + (1 - keep) * latents  # the kept area exactly as encoded
            out = self._output(latents, opts["output_type"], size, tile=opts["tile"])
            out.trajectory = recorder
            return out

    # ------------------------------------------------------------------ inputs
    def check_task(self, task: str) -> None:
        if task in self.tasks:
            return
        right = KIND_OF_TASK[task]
        raise ValueError(
            f"{task}() needs {with_article(right)} checkpoint (like {HUB_REPOS[right]}), but {self.source} is "
            f"{with_article(self.kind)} checkpoint (like {HUB_REPOS[self.kind]}), which can only do: "
            f"{', '.join(self.tasks)}. "
            f"Load the {right} checkpoint with DecoderPipeline.from_pretrained to run {task}()."
        )

    def _embeddings(self, image_embeds, negative_image_embeds, guidance_scale, num_images_per_prompt):
        """-> (embeddings for the UNet: [negative; positive] (2B, D) with guidance, else (B, D); B)."""
        if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}.")
        guidance_scale = real_number(guidance_scale, "guidance_scale")
        num_images_per_prompt = int(num_images_per_prompt)
        dim = self.unet.config.encoder_hid_dim
        positive = self._embedding_tensor(image_embeds, "image_embeds", dim)
        guided = guidance_scale > 1
        if negative_image_embeds is None:
            if guided:
                raise ValueError("negative_image_embeds is required when guidance_scale > 1 (classifier-free "
                                 "guidance); PriorPipeline returns it as negative_image_embeds.")
        else:
            negative = self._embedding_tensor(negative_image_embeds, "negative_image_embeds", dim)
            if negative.shape[0] != positive.shape[0]:
                raise ValueError(
                    f"image_embeds and negative_image_embeds must have the same batch size, got "
                    f"{positive.shape[0]} and {negative.shape[0]}."
                )
        positive = positive.repeat_interleave(num_images_per_prompt, dim=0)  # (B, D)
        if guided:
            negative = negative.repeat_interleave(num_images_per_prompt, dim=0)
            embeds = torch.cat([negative, positive])  # (2B, D): unconditional first, as the reference
        else:
            embeds = positive
        return embeds.to(self.device, self.dtype), positive.shape[0]

    @staticmethod
    def _embedding_tensor(x, name: str, dim: int) -> torch.Tensor:
        if isinstance(x, (list, tuple)) and x and all(isinstance(e, torch.Tensor) for e in x):
            x = torch.cat([e[None] if e.ndim == 1 else e for e in x])  # a list of (D,) or (b, D)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor (B, {dim}), got {type(x).__name__}.")
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != dim or x.shape[0] == 0:
            raise ValueError(f"{name} must be (B, {dim}) for this checkpoint, got shape {tuple(x.shape)}.")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {x.dtype}.")
        check_finite_tensor(x, name)
        return x

    def check_fits(self, batch: int, height=None, width=None, picture=None, tile=None) -> None:
        """Refuse ``batch`` pictures of this size (default: ``picture``'s, else 512) when they would
        not fit in the device's memory (kandinsky.pipelines.limits): what the combined pipeline
        calls before its prior runs."""
        size = self._sizes(height, width, picture)
        check_memory(self, batch, *size.generate, tile, size.asked)

    def threads(self, height=None, width=None, picture=None):
        """The threads of a call at this size (default: ``picture``'s, else 512): one intra-op thread while
        UNet parameters x latent pixels of one picture is below kandinsky.threads.SMALL_WORK, on the CPU
        (a context manager; the caller's setting is restored after it, and a caller's own setting wins)."""
        h, w = self._sizes(height, width, picture).generate
        f = self.movq_scale_factor
        return threads_for(parameters(self.unet) * (h // f) * (w // f), self.device)

    def _sizes(self, height, width, picture=None) -> "Sizes":
        """The size asked (default: the input picture's, else 512) and the size generated: the next
        multiple of ``size_multiple`` (64 for Kandinsky 2.2). Multiples are generated as asked."""
        if (height is None or width is None) and picture is not None:
            first = picture[0] if isinstance(picture, (list, tuple)) and picture else picture
            h, w = input_size(first)
            height = h if height is None else height
            width = w if width is None else width
        height = 512 if height is None else height
        width = 512 if width is None else width
        multiple = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if not _is_int(value):
                raise TypeError(f"{name} must be an integer number of pixels, got {value!r}.")
            if value < 1:
                raise ValueError(f"{name}={value} must be a positive number of pixels.")
        height, width = int(height), int(width)
        generate = (math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple)
        return Sizes(asked=(height, width), generate=generate)

    def _latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.movq_scale_factor
        return (batch, self.latent_channels, height // f, width // f)

    def _plan(self, sampler: str, num_inference_steps, spec, strength) -> samplers.Plan:
        """The sampler's plan; for image-start tasks its last ``int(num_inference_steps * strength)`` steps."""
        if not _is_int(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
        steps = int(num_inference_steps)
        if spec.start == "image":
            if strength is None:
                strength = 0.3
            strength = real_number(strength, "strength")
            if not 0 < strength <= 1:
                raise ValueError(f"strength must be a number in (0, 1], got {strength!r}.")
            kept = min(int(steps * float(strength)), steps)
            if kept < 1:
                raise ValueError(
                    f"strength={strength} x num_inference_steps={steps} leaves no denoising step "
                    f"(int({steps * strength:g}) = 0); raise one of them."
                )
        plan = samplers.make_plan(sampler, self._schedule, steps)
        return plan.tail(kept) if spec.start == "image" else plan

    def _initial_latents(self, batch, height, width, generator, latents, plan) -> torch.Tensor:
        shape = self._latent_shape(batch, height, width)
        if latents is None:
            latents = randn(shape, generator, self.device, self.dtype)
        elif not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch tensor {shape}, got {type(latents).__name__}.")
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (batch x num_images_per_prompt, "
                             f"{self.latent_channels}, height/{self.movq_scale_factor}, "
                             f"width/{self.movq_scale_factor}); got {tuple(latents.shape)}.")
        else:
            if not torch.isfinite(latents).all():
                raise ValueError("latents hold NaN or inf values: pass finite starting noise.")
            latents = latents.to(self.device, self.dtype)
        return latents * plan.init_noise_sigma

    @staticmethod
    def _broadcast(x: torch.Tensor, n: int, name: str) -> torch.Tensor:
        """k items for n embeddings, k dividing n: item i serves the i-th group of n / k
        consecutive embeddings (k = 1: one for all; k = n: one each; k = number of prompts:
        one per prompt, as PriorPipeline orders its embeddings prompt by prompt)."""
        k = x.shape[0]
        if k == n:
            return x
        if n % k == 0:
            return x.repeat_interleave(n // k, dim=0)  # (n, ...)
        raise ValueError(
            f"got {k} {name}s for {n} image embeddings: pass one, one per embedding, or one per prompt "
            f"(a number that divides {n}; each then serves {n} / k consecutive embeddings)."
        )

    def _encode(self, image, n: int, height: int, width: int, what: str = "image") -> torch.Tensor:
        """MoVQ latents (n, 4, h, w) of one image per embedding group."""
        images = self._broadcast(load_images(image, height, width, what), n, what)  # (n, 3, H, W)
        return self.movq.encode(normalize(images).to(self.device, self.dtype))  # (n, 4, h, w)

    def _noised_image_latents(self, image, batch, num_images_per_prompt, height, width, plan, generator):
        """MoVQ latents of ``image`` (one per embedding), noised to the plan's first step."""
        latents = self._encode(image, batch // num_images_per_prompt, height, width)
        latents = latents.repeat_interleave(num_images_per_prompt, dim=0)  # (batch, 4, h, w)
        noise = randn(latents.shape, generator, self.device, self.dtype)
        return plan.add_noise(latents, noise)

    def _inpaint_inputs(self, image, mask_image, batch, num_images_per_prompt, height, width):
        """-> image latents (batch, 4, h, w) and keep mask (batch, 1, h, w) (1 = keep)."""
        n = batch // num_images_per_prompt
        image_latents = self._encode(image, n, height, width)  # (n, 4, h, w)
        repaint = self._broadcast(load_masks(mask_image, height, width), n, "mask_image")  # (n, 1, H, W)
        check_same_size(image, mask_image)
        keep = 1 - repaint.to(self.device, self.dtype)
        keep = F.interpolate(keep, image_latents.shape[-2:], mode="nearest")  # (n, 1, h, w)
        keep = grow_repaint_area(keep)
        return (image_latents.repeat_interleave(num_images_per_prompt, dim=0),
                keep.repeat_interleave(num_images_per_prompt, dim=0))

    def _hint(self, hint, batch, num_images_per_prompt, height, width) -> torch.Tensor:
        n = batch // num_images_per_prompt
        hint = self._broadcast(load_images(hint, height, width, "hint", hint=True), n, "hint")  # (n, 3, H, W)
        return hint.repeat_interleave(num_images_per_prompt, dim=0).to(self.device, self.dtype)

    def _output(self, latents: torch.Tensor, output_type: str, size: "Sizes", tile=None) -> ImageOutput:
        if output_type == "latent":
            return ImageOutput(images=latents)
        decoded = self.movq.decode(latents, force_not_quantize=True, tile=tile)  # (B, 3, H, W) in ~[-1, 1]
        if size.asked != size.generate:  # back to the size asked (bicubic, antialiased)
            decoded = F.interpolate(decoded.float(), size=size.asked, mode="bicubic", antialias=True,
                                    align_corners=False).to(decoded.dtype)
        return ImageOutput(images=format_output(decoded, output_type))


@dataclass(frozen=True)
class Sizes:
    asked: tuple[int, int]  # (height, width) returned
    generate: tuple[int, int]  # (height, width) generated: a multiple of the model's stride


def _options(task: str, spec, given: dict) -> dict:
    """The task's options: tasks.decoder_options' defaults, updated with the preset's values
    (``given["preset"]``, tasks.PRESETS), then with ``given`` (unknown names refused)."""
    allowed = decoder_options(task)  # (no latents for the tasks that start from an image)
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise TypeError(f"{task}() got unexpected argument(s) {', '.join(unknown)}; it takes: "
                        f"{', '.join(spec.inputs + tuple(allowed))}.")
    return {**allowed, **preset_options(given.get("preset"), allowed), **given}


class _InpaintBlend:
    """After every step, the kept area is the image latents noised to where the sampler now is
    (clean after the last step); each image of the batch with its own mask."""

    def __init__(self, image_latents, keep, noise, plan):
        self.image_latents, self.keep, self.noise, self.plan = image_latents, keep, noise, plan

    def __call__(self, state):
        known = self.plan.add_noise(self.image_latents, self.noise, self.plan.begin + state.step + 1)
        return self.keep * known + (1 - self.keep) * state.x
