"""The Kandinsky 2.2 decoder: CLIP image embeddings -> images.

One class for the three decoder checkpoints (subfolders ``unet``, ``movq``, ``scheduler``):

    checkpoint                                    tasks
    kandinsky-2-2-decoder          (in 4)         text2img, img2img
    kandinsky-2-2-decoder-inpaint  (in 9)         inpaint
    kandinsky-2-2-controlnet-depth (image_hint)   controlnet, controlnet_img2img

Every task runs the same loop (the reference pipelines' ``pipeline_kandinsky2_2*.py``):

    latents x_T ~ N(0, 1)            (img2img: the image's MoVQ latents noised to t_start)
    for t in timesteps:
        eps_uncond, eps_cond = unet([x_t, x_t], t, [negative_embeds, image_embeds])[:, :4]
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        x_t = scheduler.step(eps, t, x_t)
        (inpaint: x_t = keep * image_latents noised to the next t + (1 - keep) * x_t)
    image = movq.decode(x_0)

The UNet's 4 variance channels are dropped (the decoder's DDPM/DDIM use a fixed
variance); ``guidance_scale <= 1`` runs the positive embedding alone.

Deviations from the reference, on purpose: every image of an inpainting batch is
blended with its own image and mask (the reference blends all with the first);
img2img / controlnet_img2img resize to (height, width) (the reference swaps them), and
round sizes like text2img; ``output_type="pt"`` is the raw decoder output for every task
(the reference's img2img variants map it to [0, 1]); ``num_images_per_prompt > 1`` works
without guidance (the reference does not repeat the embeddings then); an image, mask or hint
may serve a group of consecutive embeddings (one per prompt); inputs are checked (see images.py).
"""
from __future__ import annotations

import json
import math
import numbers
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kandinsky.hub import resolve
from kandinsky.pipelines.images import (
    ImageOutput,
    check_output_type,
    check_same_size,
    format_output,
    grow_repaint_area,
    load_images,
    load_masks,
    normalize,
)
from kandinsky.sampling.state import BRANCHES_GUIDED, BRANCHES_SINGLE, model_call
from kandinsky.schedulers import Scheduler, randn, scheduler_from_config
from weights_convert import load_component

# What each kind of checkpoint can do, and where it comes from.
TASKS = {
    "decoder": ("text2img", "img2img"),
    "inpaint": ("inpaint",),
    "controlnet": ("controlnet", "controlnet_img2img"),
}
HUB_REPOS = {
    "decoder": "kandinsky-community/kandinsky-2-2-decoder",
    "inpaint": "kandinsky-community/kandinsky-2-2-decoder-inpaint",
    "controlnet": "kandinsky-community/kandinsky-2-2-controlnet-depth",
}
KIND_OF_TASK = {task: kind for kind, tasks in TASKS.items() for task in tasks}

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


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


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of warnings.warn that names the user's line: the first frame (seen
    from the function calling this one) outside kandinsky and torch's no_grad wrapper."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


_INTERNAL = (str(Path(__file__).resolve().parents[1]) + os.sep, str(Path(torch.utils.__file__).parent / "_contextlib"))


def _is_int(value) -> bool:
    """Python or numpy integers (not bools)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    """Python or numpy real numbers (not bools)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _check_generator(generator, batch: int) -> None:
    """A list of generators draws one picture each: it needs exactly ``batch`` of them (or one)."""
    if isinstance(generator, list) and len(generator) not in (1, batch):
        raise ValueError(
            f"got a list of {len(generator)} generators for {batch} pictures (image embeddings x "
            f"num_images_per_prompt): pass one generator, or one per picture."
        )


_CALLBACK_SIGNATURE = (
    "callback_on_step_end(step, timestep, latents) must return None or a latents tensor (diffusers' "
    "(pipe, step, timestep, callback_kwargs) -> dict form is not used here)"
)


def _call_back(callback, step: int, timestep: torch.Tensor, latents: torch.Tensor):
    """Run the user's step callback; its result: None, or replacement latents."""
    try:
        out = callback(step, timestep, latents)
    except TypeError as e:
        if e.__traceback__.tb_next is None:  # raised by the call itself: the wrong arguments
            raise TypeError(f"{_CALLBACK_SIGNATURE}; calling it failed: {e}") from e
        raise
    if out is not None and not isinstance(out, torch.Tensor):
        raise TypeError(f"{_CALLBACK_SIGNATURE}; it returned a {type(out).__name__}.")
    return out


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


class DecoderPipeline:
    """UNet + MoVQ + scheduler of one Kandinsky 2.2 decoder checkpoint.

    Build it with :meth:`from_pretrained`. ``kind`` says which checkpoint it is and
    ``tasks`` which methods it can run; the others raise a ValueError naming the
    checkpoint to load instead.
    """

    def __init__(self, unet, movq, scheduler, source: str = "this checkpoint"):
        self.unet, self.movq, self.scheduler = unet, movq, scheduler
        self.source = source
        self.latent_channels = movq.config.latent_channels
        self.kind = checkpoint_kind(unet.config, self.latent_channels)
        self.tasks = TASKS[self.kind]
        # MoVQ downsampling; sizes round up to a multiple of its square (the reference's
        # downscale_height_and_width): 64 pixels = 8 latent pixels = the UNet's 3 halvings.
        self.movq_scale_factor = 2 ** (len(movq.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        folder,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        scheduler: str | None = None,
    ) -> "DecoderPipeline":
        """Load a decoder, decoder-inpaint or controlnet-depth checkpoint folder (or hub id).

        ``dtype`` (default float32) and ``device`` apply to the UNet and MoVQ.
        ``scheduler``: None for the folder's scheduler (DDPM), ``"ddim"`` for DDIM built
        from the same config (as the reference's ``DDIMScheduler.from_config``), or a
        ``kandinsky.schedulers.Scheduler`` instance.
        """
        root = resolve(folder, "decoder checkpoint")
        needed = ("unet", "movq") + (() if isinstance(scheduler, Scheduler) else ("scheduler",))
        missing = [sub for sub in needed if not (root / sub).is_dir()]
        if missing:
            index = root / "model_index.json"
            name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
            what = f" (model_index.json says {name})" if name else ""
            raise ValueError(
                f"{root}{what} is not a Kandinsky 2.2 decoder folder: no {', '.join(missing)} subfolder(s). "
                f"Decoder checkpoints are e.g. {', '.join(HUB_REPOS.values())}."
            )
        if isinstance(scheduler, Scheduler):
            sched = scheduler
        else:
            config_file = root / "scheduler" / "scheduler_config.json"
            sched = scheduler_from_config(json.loads(config_file.read_text()), kind=scheduler,
                                          source=str(config_file))
        unet = load_component(root / "unet", dtype=dtype, device=device)
        movq = load_component(root / "movq", dtype=dtype, device=device)
        return cls(unet, movq, sched, source=str(root))

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device=None, dtype=None) -> "DecoderPipeline":
        self.unet.to(device=device, dtype=dtype)
        self.movq.to(device=device, dtype=dtype)
        return self

    def __repr__(self) -> str:
        return f"DecoderPipeline(kind={self.kind!r}, tasks={self.tasks}, source={self.source!r})"

    # ------------------------------------------------------------------ tasks
    @torch.no_grad()
    def text2img(
        self,
        image_embeds,
        negative_image_embeds,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        generator=None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback_on_step_end: StepCallback | None = None,
        progress: bool = True,
    ) -> ImageOutput:
        """Images from CLIP image embeddings (B, D) (e.g. PriorPipeline's output).

        ``negative_image_embeds`` (B, D) steer away (classifier-free guidance, used when
        ``guidance_scale > 1``; may be None otherwise). ``latents``: optional starting
        noise (B * num_images_per_prompt, 4, height/8, width/8).
        ``callback_on_step_end(step, timestep, latents)`` runs after every step and may
        return replacement latents. Returns ImageOutput (see images.py for the formats).
        """
        self.check_task("text2img")
        check_output_type(output_type)
        embeds, batch = self._embeddings(image_embeds, negative_image_embeds, guidance_scale, num_images_per_prompt)
        _check_generator(generator, batch)
        height, width = self._image_size(height, width)
        timesteps = self._timesteps(num_inference_steps)
        latents = self._initial_latents(batch, height, width, generator, latents)
        latents = self._denoise(latents, timesteps, embeds, guidance_scale, generator,
                                callback_on_step_end=callback_on_step_end, progress=progress)
        return self._output(latents, output_type)

    @torch.no_grad()
    def img2img(
        self,
        image_embeds,
        image,
        negative_image_embeds,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        strength: float = 0.3,
        num_images_per_prompt: int = 1,
        generator=None,
        output_type: str = "pil",
        callback_on_step_end: StepCallback | None = None,
        progress: bool = True,
    ) -> ImageOutput:
        """Re-imagine ``image`` (one, one per embedding or one per prompt; resized to height x width).

        ``strength`` in (0, 1]: the fraction of the ``num_inference_steps`` schedule run
        from the noised image (1 = from pure noise at the first timestep).
        """
        self.check_task("img2img")
        check_output_type(output_type)
        embeds, batch = self._embeddings(image_embeds, negative_image_embeds, guidance_scale, num_images_per_prompt)
        _check_generator(generator, batch)
        height, width = self._image_size(height, width)
        timesteps = self._img2img_timesteps(num_inference_steps, strength)
        latents = self._noised_image_latents(image, batch, num_images_per_prompt, height, width,
                                             timesteps[:1], generator)
        latents = self._denoise(latents, timesteps, embeds, guidance_scale, generator,
                                callback_on_step_end=callback_on_step_end, progress=progress)
        return self._output(latents, output_type)

    @torch.no_grad()
    def inpaint(
        self,
        image_embeds,
        image,
        mask_image,
        negative_image_embeds,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        generator=None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback_on_step_end: StepCallback | None = None,
        progress: bool = True,
    ) -> ImageOutput:
        """Repaint the white / 1 area of ``mask_image`` in ``image``; black / 0 is kept.

        ``image`` and ``mask_image`` must have the same size (they are resized to
        height x width); give one of each, one per embedding or one per prompt. The area to
        repaint grows by one latent pixel (8 image pixels), as in the reference.
        """
        self.check_task("inpaint")
        check_output_type(output_type)
        embeds, batch = self._embeddings(image_embeds, negative_image_embeds, guidance_scale, num_images_per_prompt)
        _check_generator(generator, batch)
        height, width = self._image_size(height, width)
        n = batch // num_images_per_prompt

        images = self._broadcast(load_images(image, height, width, "image"), n, "image")  # (n, 3, H, W)
        repaint = self._broadcast(load_masks(mask_image, height, width), n, "mask_image")  # (n, 1, H, W)
        check_same_size(image, mask_image)
        image_latents = self.movq.encode(normalize(images).to(self.device, self.dtype))  # (n, 4, h, w)
        keep = 1 - repaint.to(self.device, self.dtype)
        keep = F.interpolate(keep, image_latents.shape[-2:], mode="nearest")  # (n, 1, h, w)
        keep = grow_repaint_area(keep)
        image_latents = image_latents.repeat_interleave(num_images_per_prompt, dim=0)  # (batch, 4, h, w)
        keep = keep.repeat_interleave(num_images_per_prompt, dim=0)  # (batch, 1, h, w)

        timesteps = self._timesteps(num_inference_steps)
        latents = self._initial_latents(batch, height, width, generator, latents)
        inpaint = _InpaintState(image_latents, keep, noise=latents.clone())
        latents = self._denoise(latents, timesteps, embeds, guidance_scale, generator, inpaint=inpaint,
                                callback_on_step_end=callback_on_step_end, progress=progress)
        latents = keep * image_latents + (1 - keep) * latents
        return self._output(latents, output_type)

    @torch.no_grad()
    def controlnet(
        self,
        image_embeds,
        negative_image_embeds,
        hint,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        generator=None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback_on_step_end: StepCallback | None = None,
        progress: bool = True,
    ) -> ImageOutput:
        """text2img guided by a ``hint`` image (a depth map for the controlnet-depth checkpoint).

        ``hint``: (B, 3, H, W) or (3, H, W) tensor in [0, 1], a PIL image or numpy array;
        one channel is repeated to three; resized to height x width if needed. One hint,
        one per embedding or one per prompt.
        """
        self.check_task("controlnet")
        check_output_type(output_type)
        embeds, batch = self._embeddings(image_embeds, negative_image_embeds, guidance_scale, num_images_per_prompt)
        _check_generator(generator, batch)
        height, width = self._image_size(height, width)
        hint = self._hint(hint, batch, num_images_per_prompt, height, width)
        timesteps = self._timesteps(num_inference_steps)
        latents = self._initial_latents(batch, height, width, generator, latents)
        latents = self._denoise(latents, timesteps, embeds, guidance_scale, generator, hint=hint,
                                callback_on_step_end=callback_on_step_end, progress=progress)
        return self._output(latents, output_type)

    @torch.no_grad()
    def controlnet_img2img(
        self,
        image_embeds,
        image,
        negative_image_embeds,
        hint,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        strength: float = 0.3,
        num_images_per_prompt: int = 1,
        generator=None,
        output_type: str = "pil",
        callback_on_step_end: StepCallback | None = None,
        progress: bool = True,
    ) -> ImageOutput:
        """img2img guided by a ``hint`` image (see :meth:`img2img` and :meth:`controlnet`)."""
        self.check_task("controlnet_img2img")
        check_output_type(output_type)
        embeds, batch = self._embeddings(image_embeds, negative_image_embeds, guidance_scale, num_images_per_prompt)
        _check_generator(generator, batch)
        height, width = self._image_size(height, width)
        hint = self._hint(hint, batch, num_images_per_prompt, height, width)
        timesteps = self._img2img_timesteps(num_inference_steps, strength)
        latents = self._noised_image_latents(image, batch, num_images_per_prompt, height, width,
                                             timesteps[:1], generator)
        latents = self._denoise(latents, timesteps, embeds, guidance_scale, generator, hint=hint,
                                callback_on_step_end=callback_on_step_end, progress=progress)
        return self._output(latents, output_type)

    # ------------------------------------------------------------------ the sampling loop
    def _denoise(self, latents, timesteps, embeds, guidance_scale, generator, hint=None, inpaint=None,
                 callback_on_step_end=None, progress=True) -> torch.Tensor:
        """Run the scheduler over ``timesteps`` from ``latents`` (B, 4, h, w)."""
        guided = guidance_scale > 1
        if hint is not None and guided:
            hint = torch.cat([hint, hint])  # (2B, 3, H, W), like the embeddings [negative, positive]
        model_input_extra = None
        if inpaint is not None:
            model_input_extra = torch.cat([inpaint.image_latents * inpaint.keep, inpaint.keep], dim=1)
            if guided:
                model_input_extra = torch.cat([model_input_extra, model_input_extra])  # (2B, 5, h, w)

        for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="decoder")):
            x = torch.cat([latents, latents]) if guided else latents  # (2B or B, 4, h, w)
            if model_input_extra is not None:
                x = torch.cat([x, model_input_extra], dim=1)  # (., 9, h, w): latents, masked image, keep
            with model_call("decoder", i, t, BRANCHES_GUIDED if guided else BRANCHES_SINGLE):
                model_output = self.unet(x, t, embeds, hint=hint)  # (., 8, h, w)
            noise_pred = self._guide(model_output, guidance_scale)  # (B, 4 or 8, h, w)
            latents = self.scheduler.step(noise_pred, t, latents, generator=generator)
            if inpaint is not None:
                latents = inpaint.blend(latents, self.scheduler, timesteps, i)
            if callback_on_step_end is not None:
                replaced = _call_back(callback_on_step_end, i, t, latents)
                if replaced is not None:
                    if replaced.shape != latents.shape:
                        raise ValueError(f"callback_on_step_end returned latents of shape {tuple(replaced.shape)}, "
                                         f"expected {tuple(latents.shape)}.")
                    latents = replaced.to(latents.device, latents.dtype)
        return latents

    def _guide(self, model_output: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """Classifier-free guidance on the noise channels (the batch is [negative, positive]).

        The variance channels are passed on (those of the positive half) only to a scheduler
        with a learned variance; the decoder's DDPM/DDIM (fixed variance) get the noise alone.
        """
        noise, variance = model_output.split(self.latent_channels, dim=1)  # (., 4, h, w) each
        if guidance_scale > 1:
            noise_uncond, noise_cond = noise.chunk(2)
            noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
            variance = variance.chunk(2)[1]
        variance_type = getattr(self.scheduler.config, "variance_type", None)
        if variance_type in ("learned", "learned_range"):
            return torch.cat([noise, variance], dim=1)
        return noise

    # ------------------------------------------------------------------ inputs
    def check_task(self, task: str) -> None:
        if task in self.tasks:
            return
        right = KIND_OF_TASK[task]
        raise ValueError(
            f"{task}() needs {_a(right)} checkpoint (like {HUB_REPOS[right]}), but {self.source} is "
            f"{_a(self.kind)} checkpoint (like {HUB_REPOS[self.kind]}), which can only do: {', '.join(self.tasks)}. "
            f"Load the {right} checkpoint with DecoderPipeline.from_pretrained to run {task}()."
        )

    def _embeddings(self, image_embeds, negative_image_embeds, guidance_scale, num_images_per_prompt):
        """-> (embeddings for the UNet: [negative; positive] (2B, D) with guidance, else (B, D); B)."""
        if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}.")
        if not _is_real(guidance_scale) or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}.")
        num_images_per_prompt, guidance_scale = int(num_images_per_prompt), float(guidance_scale)
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
        return x

    def _image_size(self, height, width) -> tuple[int, int]:
        """Round (height, width) up to a multiple of movq_scale_factor**2 (64), warning if changed."""
        multiple = self.movq_scale_factor**2
        for name, value in (("height", height), ("width", width)):
            if not _is_int(value):
                raise TypeError(f"{name} must be an integer number of pixels, got {value!r}.")
            if value < multiple:
                raise ValueError(f"{name}={value} is too small: sizes must be at least {multiple} pixels.")
        height, width = int(height), int(width)
        rounded = (math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple)
        if rounded != (height, width):
            warnings.warn(
                f"height x width {height} x {width} rounded up to {rounded[0]} x {rounded[1]} (a multiple of "
                f"{multiple}, as the reference does).",
                stacklevel=_caller_stacklevel(),
            )
        return rounded

    def _latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.movq_scale_factor
        return (batch, self.latent_channels, height // f, width // f)

    def _timesteps(self, num_inference_steps: int) -> torch.Tensor:
        if not _is_int(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
        self.scheduler.set_timesteps(int(num_inference_steps), device=self.device)
        return self.scheduler.timesteps

    def _img2img_timesteps(self, num_inference_steps: int, strength: float) -> torch.Tensor:
        """The last ``int(num_inference_steps * strength)`` timesteps of the schedule."""
        if not _is_real(strength) or not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength!r}.")
        timesteps = self._timesteps(num_inference_steps)
        num_inference_steps, strength = int(num_inference_steps), float(strength)
        steps = min(int(num_inference_steps * strength), num_inference_steps)
        if steps < 1:
            raise ValueError(
                f"strength={strength} x num_inference_steps={num_inference_steps} leaves no denoising step "
                f"(int({num_inference_steps * strength:g}) = 0); raise one of them."
            )
        order = getattr(self.scheduler, "order", 1)
        return timesteps[(num_inference_steps - steps) * order:]

    def _initial_latents(self, batch, height, width, generator, latents) -> torch.Tensor:
        shape = self._latent_shape(batch, height, width)
        if latents is None:
            latents = randn(shape, generator, self.device, self.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (batch x num_images_per_prompt, "
                             f"{self.latent_channels}, height/{self.movq_scale_factor}, "
                             f"width/{self.movq_scale_factor}); got {tuple(latents.shape)}.")
        else:
            latents = latents.to(self.device, self.dtype)
        return latents * getattr(self.scheduler, "init_noise_sigma", 1.0)

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

    def _noised_image_latents(self, image, batch, num_images_per_prompt, height, width, t_start, generator):
        """MoVQ latents of ``image`` (one per embedding), noised to the first timestep."""
        n = batch // num_images_per_prompt
        images = self._broadcast(load_images(image, height, width, "image"), n, "image")  # (n, 3, H, W)
        latents = self.movq.encode(normalize(images).to(self.device, self.dtype))  # (n, 4, h, w)
        latents = latents.repeat_interleave(num_images_per_prompt, dim=0)  # (batch, 4, h, w)
        noise = randn(latents.shape, generator, self.device, self.dtype)
        return self.scheduler.add_noise(latents, noise, t_start.repeat(batch))

    def _hint(self, hint, batch, num_images_per_prompt, height, width) -> torch.Tensor:
        n = batch // num_images_per_prompt
        hint = self._broadcast(load_images(hint, height, width, "hint", hint=True), n, "hint")  # (n, 3, H, W)
        return hint.repeat_interleave(num_images_per_prompt, dim=0).to(self.device, self.dtype)

    def _output(self, latents: torch.Tensor, output_type: str) -> ImageOutput:
        if output_type == "latent":
            return ImageOutput(images=latents)
        decoded = self.movq.decode(latents, force_not_quantize=True)  # (B, 3, H, W)
        return ImageOutput(images=format_output(decoded, output_type))


class _InpaintState:
    """What the inpainting loop blends in after every step, per image of the batch."""

    def __init__(self, image_latents: torch.Tensor, keep: torch.Tensor, noise: torch.Tensor):
        self.image_latents = image_latents  # (B, 4, h, w)
        self.keep = keep  # (B, 1, h, w), 1 = keep
        self.noise = noise  # (B, 4, h, w): the initial noise

    def blend(self, latents, scheduler, timesteps, i: int) -> torch.Tensor:
        """Keep the known area: the image latents noised to the next timestep (clean after the last)."""
        known = self.image_latents
        if i < len(timesteps) - 1:
            known = scheduler.add_noise(known, self.noise, timesteps[i + 1 : i + 2])
        return self.keep * known + (1 - self.keep) * latents
