"""The Kandinsky 2.2 prior pipeline: text (and images) -> CLIP image embeddings.

    prompt --tokenizer--> ids (N, 77) --CLIP text tower--> text_embeds (N, D), hidden states (N, 77, D)
    x_T ~ N(0, I) (N, D) --prior + classifier-free guidance, UnCLIP ancestral steps--> x_0 (N, D)
    image_embeds = x_0 * clip_std + clip_mean        (the prior works in a normalised CLIP space)

The decoder paints pictures from ``image_embeds`` and is guided away from
``negative_image_embeds``. Without a negative prompt, the negative embedding is the CLIP
image embedding of an all-zero ``pixel_values`` input (the normalised mean colour). A
negative prompt is itself sampled by the prior, in the same batch as the prompts (the
reference's layout, so that seeds give the same numbers): with B prompts and n images per
prompt the prior runs on N = 2 B n rows

    rows:            [prompt_1 .. prompt_B, negative_1 .. negative_B], each repeated n times
    guided against:  [negative_1 .. negative_B, negative_1 .. negative_B]

and ``latents`` (when given) are (2 B n, D): the prompts' starting noise, then the negatives'.

Unlike the reference, B > 1 prompts with one negative prompt string works (the string is
used for every prompt; the reference raises a batch-size error).

Reference: diffusers' KandinskyV22PriorPipeline (``__call__``, ``interpolate``) and
KandinskyV22PriorEmb2EmbPipeline (``emb2emb`` here).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from kandinsky.clip.preprocess import ImagePreprocessor
from kandinsky.clip.tokenizer import Tokenizer
from kandinsky.config import ConfigError
from kandinsky.hub import resolve
from kandinsky.pipelines.stepping import callbacks as _callbacks, check_device, check_finite_tensor, check_generator
from kandinsky.pipelines.stepping import progress as _progress, real_number, ticking as _ticking, to_arguments
from kandinsky.sampling import samplers
from kandinsky.sampling.denoisers import PriorDenoiser
from kandinsky.sampling.schedule import NoiseSchedule, randn
from kandinsky.sampling.trajectory import Trajectory
from kandinsky.threads import parameters, per_call, threads_for
from weights_convert import load_component

SUBFOLDERS = ("prior", "text_encoder", "image_encoder", "tokenizer", "scheduler", "image_processor")


@dataclass
class PriorOutput:
    """What the prior pipeline returns (unpacks as ``image_embeds, negative_image_embeds = out``)."""

    image_embeds: torch.Tensor  # (B * num_images_per_prompt, D)
    negative_image_embeds: torch.Tensor  # (B * num_images_per_prompt, D)
    trajectory: object = None  # a Trajectory when asked for (return_trajectory=True)

    def __iter__(self):
        return iter((self.image_embeds, self.negative_image_embeds))


# --------------------------------------------------------------------------- argument checks
def _prompt_list(prompt, what: str = "prompt") -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if isinstance(prompt, (list, tuple)) and not prompt:
        raise ValueError(f"`{what}` is an empty list.")
    raise TypeError(f"`{what}` must be a string or a list of strings, got {type(prompt).__name__}: {prompt!r}.")


def _negative_list(negative_prompt, batch_size: int) -> list[str] | None:
    """None, or one negative prompt per prompt (a single string is used for every prompt)."""
    if negative_prompt is None:
        return None
    negatives = _prompt_list(negative_prompt, "negative_prompt")
    if isinstance(negative_prompt, str):
        return negatives * batch_size
    if len(negatives) != batch_size:
        raise ValueError(
            f"`negative_prompt` has {len(negatives)} entries but `prompt` has {batch_size}: give one negative "
            "prompt per prompt, or a single string for all of them."
        )
    return negatives


def _positive_int(value, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{what}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _number(value, what: str) -> float:
    return real_number(value, what)


def _check_generator(generator, batch_size: int) -> None:
    check_generator(generator, batch_size, "sampled embeddings (prompts x num_images_per_prompt, doubled with a "
                    "negative prompt)")


# --------------------------------------------------------------------------- the pipeline
class PriorPipeline:
    """Text -> CLIP image embeddings (Kandinsky 2.2's diffusion prior and its CLIP encoders).

    ``PriorPipeline.from_pretrained(folder)`` reads a prior checkpoint in the hub layout
    (``kandinsky-2-2-prior``: prior/, text_encoder/, image_encoder/, tokenizer/, scheduler/,
    image_processor/). The components are attributes and can be used on their own.
    """

    execution_device = None  # set by kandinsky.offload: where tensors go while the weights wait on the CPU

    def __init__(self, prior, text_encoder, image_encoder, tokenizer, scheduler, image_processor):
        self.prior = prior
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.image_processor = image_processor
        self._check_sizes()

    @classmethod
    def from_pretrained(cls, folder, dtype: torch.dtype | None = None, device=None, revision: str | None = None,
                        token: str | bool | None = None, local_files_only: bool = False) -> "PriorPipeline":
        """Load a prior checkpoint folder (or hub id). ``dtype=None``: float32. ``revision``, ``token``,
        ``local_files_only``: for hub ids (see kandinsky.hub.resolve)."""
        device = check_device(device)
        folder = resolve(folder, "prior checkpoint", revision=revision, token=token, local_files_only=local_files_only)
        missing = [name for name in SUBFOLDERS if not (folder / name).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{folder} is not a Kandinsky 2.2 prior checkpoint: it lacks the subfolder(s) {missing} "
                f"(expected {list(SUBFOLDERS)}, as in kandinsky-community/kandinsky-2-2-prior)."
            )
        return cls(
            prior=load_component(folder / "prior", dtype=dtype, device=device),
            text_encoder=load_component(folder / "text_encoder", dtype=dtype, device=device),
            image_encoder=load_component(folder / "image_encoder", dtype=dtype, device=device),
            tokenizer=Tokenizer.from_folder(folder / "tokenizer"),
            scheduler=NoiseSchedule.from_folder(folder / "scheduler"),
            image_processor=ImagePreprocessor.from_folder(folder / "image_processor"),
        )

    def _check_sizes(self) -> None:
        """The size relations the prior relies on (a mixed-up folder fails here, not mid-sampling)."""
        prior, text, image = self.prior.config, self.text_encoder.config, self.image_encoder.config
        relations = [
            ("text_encoder projection_dim", text.projection_dim, "prior embedding_proj_dim", prior.text_embed_dim),
            ("text_encoder hidden_size", text.hidden_size, "prior embedding_dim", prior.embedding_dim),
            ("image_encoder projection_dim", image.projection_dim, "prior clip_embed_dim", prior.clip_dim),
            ("prior embedding_dim", prior.embedding_dim, "prior clip_embed_dim", prior.clip_dim),
            ("tokenizer max_length", self.tokenizer.max_length, "prior num_embeddings", prior.num_embeddings),
            ("image_processor crop_size", self.image_processor.config.crop_size, "image_encoder image_size", image.image_size),
        ]
        for name_a, a, name_b, b in relations:
            if a != b:
                raise ConfigError(f"the prior checkpoint's components do not fit together: {name_a}={a} but {name_b}={b}.")

    # -- where the weights are --------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the pipeline's tensors are made: its weights' device, or the offload target."""
        return self.execution_device or self.prior.clip_mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self.prior.clip_mean.dtype

    @property
    def embedding_dim(self) -> int:
        """D: the size of the image embeddings this pipeline makes."""
        return self.prior.config.clip_dim

    def threads(self, *args, **kwargs):
        """The threads of a sampling call (kandinsky.threads): one while prior and text encoder parameters x
        text tokens is small."""
        return threads_for(parameters(self.prior, self.text_encoder) * self.prior.config.num_embeddings, self.device)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "PriorPipeline":
        device, dtype = to_arguments(device, dtype)  # pipe.to(torch.float16) works too
        for model in (self.prior, self.text_encoder, self.image_encoder):
            model.to(device=device, dtype=dtype)
        return self

    # -- encoders ---------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompts -> text_embeds (N, D), hidden states (N, 77, D), mask (N, 77) bool (True = real token).

        Tokens are padded to 77 and truncated there; the text tower runs without the
        padding mask (causal attention only), as in the reference.
        """
        ids, mask = self.tokenizer(prompts)  # (N, 77), (N, 77)
        out = self.text_encoder(ids.to(self.device))
        return out.text_embeds, out.last_hidden_state, mask.to(self.device).bool()

    @torch.no_grad()
    def encode_image(self, images) -> torch.Tensor:
        """CLIP image embeddings (B, D) of one image or a list (for variations / interpolation).

        PIL images and numpy arrays (H, W, 3) uint8 or float in [0, 1] are preprocessed (bicubic
        resize of the shortest edge, centre crop, CLIP normalisation). torch tensors are taken as
        already preprocessed ``pixel_values`` (B, 3, S, S) or (3, S, S), as in the reference
        pipeline; to encode a [0, 1] image tensor, pass ``self.image_processor(tensor)``.
        """
        pixels = self._pixel_values(images)  # (B, 3, S, S)
        dtype = self.image_encoder.patch_embedding.weight.dtype
        return self.image_encoder(pixels.to(device=self.device, dtype=dtype))  # (B, D)

    def _pixel_values(self, images) -> torch.Tensor:
        items = images if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("no images given (empty list).")
        size = self.image_encoder.config.image_size
        out = []
        for item in items:
            if isinstance(item, torch.Tensor):
                pixels = item[None] if item.ndim == 3 else item
                if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
                    raise ValueError(
                        f"a torch tensor is taken as CLIP pixel_values (B, 3, {size}, {size}) (already resized and "
                        f"normalised), got shape {tuple(item.shape)}; pass PIL images or numpy arrays to have them "
                        "preprocessed, or `pipe.image_processor(tensor)` for a [0, 1] image tensor."
                    )
            elif isinstance(item, (PIL.Image.Image, np.ndarray)):
                pixels = self.image_processor(item)  # (b, 3, S, S)
            else:
                raise TypeError(
                    f"images must be PIL images, numpy arrays or torch tensors (or a list of them), "
                    f"got {type(item).__name__}."
                )
            out.append(pixels.to(self.device))
        return torch.cat(out)

    @torch.no_grad()
    def zero_image_embeds(self, batch_size: int = 1) -> torch.Tensor:
        """The default negative embedding: CLIP embedding of all-zero pixel_values, repeated (batch_size, D)."""
        size = self.image_encoder.config.image_size
        weight = self.image_encoder.patch_embedding.weight
        key = (weight.device, weight.dtype, weight.data_ptr(), weight._version)  # recomputed if the encoder changes
        if getattr(self, "_zero_embed_key", None) != key:
            zero = torch.zeros(1, 3, size, size, device=self.device, dtype=weight.dtype)
            self._zero_embed, self._zero_embed_key = self.image_encoder(zero), key  # (1, D), once per pipeline
        return self._zero_embed.repeat(batch_size, 1)

    # -- sampling ---------------------------------------------------------------------
    def _conditioning(self, rows: list[str], uncond_rows: list[str], n: int, guided: bool):
        """Text conditioning of the prior's batch: each row repeated n times; with guidance the
        unconditional rows come first, [uncond; cond] (2N rows). Each distinct string is encoded
        once: -> (text_embeds, hidden states, mask) of the distinct strings, and the row index."""
        texts = list(dict.fromkeys(rows + (uncond_rows if guided else [])))
        encoded = self.encode_text(texts)

        def index(prompts: list[str]) -> torch.Tensor:
            return torch.tensor([texts.index(p) for p in prompts], device=self.device).repeat_interleave(n)

        rows_index = torch.cat([index(uncond_rows), index(rows)]) if guided else index(rows)
        return encoded, rows_index

    def _denoise(self, latents, plan, conditioning, guidance_scale: float, generator, progress: bool,
                 callback=None, cache: bool = True):
        """The reverse diffusion x_t -> x_0 over ``plan``, then back to CLIP space. (N, D) -> (N, D)"""
        encoded, rows = conditioning
        denoiser = PriorDenoiser(self.prior, encoded, rows, guidance_scale, cache=cache)
        with _progress(plan, progress, "prior") as bar:
            latents = samplers.sample("unclip", _ticking(denoiser, bar), latents, plan, generator=generator,
                                      callback=callback)
        return self.prior.unnormalize(latents)

    def _split(self, embeds: torch.Tensor, negatives) -> PriorOutput:
        if negatives is not None:  # the second half of the batch sampled the negative prompts
            image_embeds, negative_embeds = embeds.chunk(2)
            return PriorOutput(image_embeds, negative_embeds)
        return PriorOutput(embeds, self.zero_image_embeds(embeds.shape[0]))

    @per_call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 25,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        guidance_scale: float = 4.0,
        progress: bool = True,
        callback_on_step_end=None,
        return_trajectory: bool = False,
        cache: bool = True,
    ) -> PriorOutput:
        """Sample CLIP image embeddings for ``prompt``.

        Returns ``image_embeds`` and ``negative_image_embeds``, both (B * num_images_per_prompt, D),
        ordered prompt by prompt. Guidance is on when ``guidance_scale > 1``. ``latents``: the
        starting noise x_T, (B n, D), or (2 B n, D) with a negative prompt (see the module doc).
        A list of generators needs one generator per row of that batch.
        ``callback_on_step_end(state)`` gets a StepState after every step (x and x0 in the prior's
        normalised space) and may return a replacement x; ``return_trajectory=True`` puts the
        per-step x and x0 in ``out.trajectory``. ``cache=False`` recomputes the 78 constant text
        tokens at every step (same result, slower).
        """
        prompts = _prompt_list(prompt)
        negatives = _negative_list(negative_prompt, len(prompts))
        n = _positive_int(num_images_per_prompt, "num_images_per_prompt")
        steps = _positive_int(num_inference_steps, "num_inference_steps")
        guidance_scale = _number(guidance_scale, "guidance_scale")

        rows = prompts + negatives if negatives is not None else prompts
        uncond_rows = negatives * 2 if negatives is not None else [""] * len(prompts)
        N = len(rows) * n
        _check_generator(generator, N)
        conditioning = self._conditioning(rows, uncond_rows, n, guidance_scale > 1)

        plan = samplers.make_plan("unclip", self.scheduler, steps)
        latents = self._initial_latents(latents, N, generator, conditioning[0][0].dtype, plan)  # (N, D)
        recorder = Trajectory() if return_trajectory else None
        callback = _callbacks(recorder, callback_on_step_end)
        embeds = self._denoise(latents, plan, conditioning, guidance_scale, generator, progress, callback, cache)
        out = self._split(embeds, negatives)
        out.trajectory = recorder
        return out

    def _initial_latents(self, latents, batch_size: int, generator, dtype, plan) -> torch.Tensor:
        shape = (batch_size, self.prior.config.embedding_dim)
        if latents is None:
            latents = randn(shape, generator, self.device, dtype)
        elif not isinstance(latents, torch.Tensor):
            raise TypeError(f"`latents` must be a torch tensor {shape}, got {type(latents).__name__}.")
        elif tuple(latents.shape) != shape:
            raise ValueError(
                f"`latents` must have shape {shape} (prompts x num_images_per_prompt, doubled with a negative "
                f"prompt; embedding size), got {tuple(latents.shape)}."
            )
        check_finite_tensor(latents, "latents")
        return latents.to(device=self.device, dtype=dtype) * plan.init_noise_sigma

    @per_call
    @torch.no_grad()
    def interpolate(
        self,
        images_and_prompts: list,
        weights: list[float],
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 25,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        negative_prior_prompt: str | None = None,
        negative_prompt: str = "",
        guidance_scale: float = 4.0,
        progress: bool = True,
    ) -> PriorOutput:
        """A weighted sum of image embeddings: prompts through the prior, images through CLIP.

        ``images_and_prompts``: strings, and images (PIL, numpy, or pixel_values tensors, one
        image each, see ``encode_image``). Each prompt is sampled with its own prior run
        (guided against ``negative_prior_prompt``), consuming ``generator`` in list order.
        The negative embedding: a prior run on ``negative_prompt`` (always made, as in the
        reference, so seeds match); for ``negative_prompt=""`` it is that run's negative
        embedding (the zero-image one, or ``negative_prior_prompt``'s), else its image
        embedding. Returns (num_images_per_prompt, D) each.
        """
        if not isinstance(images_and_prompts, (list, tuple)) or not isinstance(weights, (list, tuple)):
            raise TypeError("`images_and_prompts` and `weights` must be lists.")
        if len(images_and_prompts) != len(weights):
            raise ValueError(
                f"`images_and_prompts` has {len(images_and_prompts)} items and `weights` has {len(weights)}: "
                "give one weight per item."
            )
        if not images_and_prompts:
            raise ValueError("`images_and_prompts` is empty.")
        weights = [_number(w, "weights[i]") for w in weights]
        negative_prompt = "" if negative_prompt is None else negative_prompt  # None: as in the other methods
        if not isinstance(negative_prompt, str):
            raise TypeError(f"`negative_prompt` must be a string or None, got {negative_prompt!r}.")
        if negative_prior_prompt is not None and not isinstance(negative_prior_prompt, str):
            raise TypeError(f"`negative_prior_prompt` must be a string or None, got {negative_prior_prompt!r}.")
        n = _positive_int(num_images_per_prompt, "num_images_per_prompt")

        def sample(text: str) -> PriorOutput:
            return self(
                text,
                negative_prompt=negative_prior_prompt,
                num_images_per_prompt=n,
                num_inference_steps=num_inference_steps,
                generator=generator,
                latents=latents,
                guidance_scale=guidance_scale,
                progress=progress,
            )

        image_embeds = 0
        for i, (item, weight) in enumerate(zip(images_and_prompts, weights)):
            if isinstance(item, str):
                embeds = sample(item).image_embeds  # (n, D)
            elif isinstance(item, (PIL.Image.Image, np.ndarray, torch.Tensor)):
                embeds = self.encode_image(item)  # (1, D)
                if embeds.shape[0] != 1:
                    raise ValueError(
                        f"images_and_prompts[{i}] holds {embeds.shape[0]} images; give one image per item."
                    )
                embeds = embeds.repeat(n, 1)  # (n, D)
            else:
                raise TypeError(
                    f"images_and_prompts[{i}] must be a string, a PIL image, a numpy array or a torch tensor, "
                    f"got {type(item).__name__}."
                )
            image_embeds = image_embeds + weight * embeds

        out = sample(negative_prompt)
        negative_embeds = out.negative_image_embeds if negative_prompt == "" else out.image_embeds
        return PriorOutput(image_embeds, negative_embeds)

    @per_call
    @torch.no_grad()
    def emb2emb(
        self,
        prompt: str | list[str],
        image,
        strength: float = 0.3,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 25,
        generator: torch.Generator | list[torch.Generator] | None = None,
        guidance_scale: float = 4.0,
        progress: bool = True,
        callback_on_step_end=None,
        return_trajectory: bool = False,
    ) -> PriorOutput:
        """Move an image's CLIP embedding towards ``prompt`` (reference: KandinskyV22PriorEmb2EmbPipeline).

        ``image``: one image or one per prompt (PIL / numpy / pixel_values tensors), or CLIP
        image embeddings (B, D). The embedding is noised to the timestep that leaves the last
        ``int(num_inference_steps * strength)`` steps, then denoised by the prior under the
        prompt. As in the reference, the noise is added to the raw CLIP embedding (not to its
        normalised form) and the result is un-normalised at the end. Negative prompts are
        handled as in ``__call__`` (their rows start from the same noised image embedding).
        """
        strength = _number(strength, "strength")
        if not 0 < strength <= 1:
            raise ValueError(f"`strength` must be in (0, 1], got {strength}.")
        prompts = _prompt_list(prompt)
        negatives = _negative_list(negative_prompt, len(prompts))
        n = _positive_int(num_images_per_prompt, "num_images_per_prompt")
        steps = _positive_int(num_inference_steps, "num_inference_steps")
        guidance_scale = _number(guidance_scale, "guidance_scale")
        kept = min(int(steps * strength), steps)  # the last `kept` steps are run
        if kept < 1:
            raise ValueError(
                f"num_inference_steps * strength = {steps} * {strength} < 1 leaves no denoising step: "
                "raise `strength` or `num_inference_steps`."
            )

        rows = prompts + negatives if negatives is not None else prompts
        uncond_rows = negatives * 2 if negatives is not None else [""] * len(prompts)
        N = len(rows) * n
        _check_generator(generator, N)
        conditioning = self._conditioning(rows, uncond_rows, n, guidance_scale > 1)
        dtype = conditioning[0][0].dtype

        image_embeds = self._image_embeds(image, len(prompts))  # (B, D)
        if negatives is not None:
            image_embeds = torch.cat([image_embeds] * 2)  # the negative rows start from the image too
        image_embeds = image_embeds.repeat_interleave(n, dim=0).to(device=self.device, dtype=dtype)  # (N, D)

        plan = samplers.make_plan("unclip", self.scheduler, steps).tail(kept)
        noise = randn(image_embeds.shape, generator, self.device, dtype)
        latents = plan.add_noise(image_embeds, noise)  # x_t at the first kept step
        recorder = Trajectory() if return_trajectory else None
        embeds = self._denoise(latents, plan, conditioning, guidance_scale, generator, progress,
                               _callbacks(recorder, callback_on_step_end))
        out = self._split(embeds, negatives)
        out.trajectory = recorder
        return out

    def _image_embeds(self, image, batch_size: int) -> torch.Tensor:
        """emb2emb's ``image``: CLIP embeddings (B, D) as given, else encoded; one, or one per prompt."""
        items = image if isinstance(image, (list, tuple)) else [image]
        if items and all(isinstance(x, torch.Tensor) and x.ndim == 2 for x in items):
            embeds = torch.cat(items)
            if embeds.shape[1] != self.embedding_dim:
                raise ValueError(
                    f"image embeddings must be (B, {self.embedding_dim}), got {tuple(embeds.shape)}."
                )
        else:
            embeds = self.encode_image(image)
        if embeds.shape[0] == 1:
            return embeds.expand(batch_size, -1)
        if embeds.shape[0] != batch_size:
            raise ValueError(
                f"got {embeds.shape[0]} images (or image embeddings) for {batch_size} prompts: give one image, "
                "or one per prompt."
            )
        return embeds
