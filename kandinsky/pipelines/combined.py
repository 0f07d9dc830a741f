"""The prompt-level API: the prior and the decoder chained, sharing one generator.

    prompt --PriorPipeline--> image_embeds, negative_image_embeds --DecoderPipeline--> images

Like the reference's combined pipelines (KandinskyV22CombinedPipeline and friends), the
same ``generator`` first draws the prior's noise, then the decoder's, so a seed gives
the same pictures as running ``PriorPipeline`` then ``DecoderPipeline`` by hand.
Unlike the reference, ``prior_latents`` and ``latents`` are separate arguments (the
reference hands the decoder's ``latents`` argument to the prior).
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

from kandinsky.hub import DEFAULT_DECODER, prior_from_model_card, resolve
from kandinsky.pipelines.decoder import DecoderPipeline
from kandinsky.pipelines.prior import PriorPipeline
from kandinsky.pipelines.stepping import check_device, to_arguments
from kandinsky.pipelines.tasks import DECODER_TASKS, PRIOR_OPTIONS, PROMPT_TASKS, decoder_options, preset_options

# The prior options (tasks.PRIOR_OPTIONS) each source of image embeddings (PromptTask.embeddings) uses:
# variations ("image") runs no prior; emb2emb starts the prior from the image's noised embedding, not
# from prior_latents.
PRIOR_OPTIONS_USED = {"prompt": tuple(PRIOR_OPTIONS), "mix": tuple(PRIOR_OPTIONS),
                      "emb2emb": ("prior_guidance_scale", "prior_num_inference_steps"), "image": ()}
from kandinsky.threads import per_call


class Kandinsky:
    """``Kandinsky.from_pretrained(decoder, prior=None)``; then text2img / img2img / inpaint /
    variations / interpolate / controlnet, each returning an object with ``.images``."""

    def __init__(self, prior: PriorPipeline, decoder: DecoderPipeline):
        if prior.embedding_dim != decoder.unet.config.encoder_hid_dim:
            raise ValueError(
                f"the prior makes {prior.embedding_dim}-dim image embeddings but the decoder expects "
                f"{decoder.unet.config.encoder_hid_dim}: these checkpoints do not belong together."
            )
        self.prior = prior
        self.decoder = decoder

    @classmethod
    def from_pretrained(
        cls,
        decoder: str | Path = DEFAULT_DECODER,
        prior: str | Path | PriorPipeline | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        scheduler=None,
        revision: str | None = None,
        prior_revision: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        offload: str | None = None,
    ) -> "Kandinsky":
        """Folders or hub ids. Without ``prior``, the decoder's model card (README.md
        front matter ``prior:``) names it, as on the hub; a loaded ``PriorPipeline`` is shared as it is
        (not loaded again, moved, cast or offloaded: several decoders, one prior). ``revision`` pins the
        decoder repo, ``prior_revision`` the prior repo; ``token`` and ``local_files_only`` apply to both.
        ``offload="model"`` / ``"sequential"``: weights stay on the CPU and each component (or layer)
        moves to ``device`` only while it runs (kandinsky.offload.enable_offload; to add LoRA adapters,
        load without offload, add them, then call enable_offload); on a device other than CUDA it saves
        nothing: a warning, and the pipeline loads on ``device`` without it (kandinsky.offload.offload_helps)."""
        device = check_device(device)
        if offload is not None:  # (before any download; on a CPU: a warning, and no offload)
            from kandinsky.offload import offload_helps

            offload = offload if offload_helps(offload, device or "cuda") else None
        hub = dict(token=token, local_files_only=local_files_only)
        decoder_folder = resolve(decoder, "decoder checkpoint", revision=revision, **hub)
        if prior is None:
            prior = prior_from_model_card(decoder_folder)
            if prior is None:
                raise ValueError(
                    f"{decoder_folder}: its README.md names no prior (front matter `prior:`); "
                    "pass prior=<folder or hub id>, e.g. kandinsky-community/kandinsky-2-2-prior."
                )
        load_on = None if offload else device  # offloaded weights wait on the CPU
        shared = isinstance(prior, PriorPipeline)
        if not shared:
            prior = PriorPipeline.from_pretrained(resolve(prior, "prior checkpoint", revision=prior_revision, **hub),
                                                  dtype=dtype, device=load_on)
        pipe = cls(prior, DecoderPipeline.from_pretrained(decoder_folder, dtype=dtype, device=load_on,
                                                          scheduler=scheduler))
        if offload:
            from kandinsky.offload import enable_offload

            enable_offload(pipe.decoder if shared else pipe, mode=offload, device=device or "cuda")
        return pipe

    def compile(self, **options) -> "Kandinsky":
        """``torch.compile`` the UNet, the prior (both its cached and plain passes) and the MoVQ decoder
        (each traces as one graph, no breaks); ``options`` go to torch.compile. The first call of
        each shape compiles (slow); later calls reuse it. Hooks (kandinsky.capture) need the eager
        models: load a fresh pipeline for them."""
        unet, prior, movq = self.decoder.unet, self.prior.prior, self.decoder.movq
        unet.forward = torch.compile(unet.forward, **options)
        prior.forward = torch.compile(prior.forward, **options)
        prior.forward_cached = torch.compile(prior.forward_cached, **options)
        movq.decoder.forward = torch.compile(movq.decoder.forward, **options)
        return self

    def to(self, device=None, dtype=None) -> "Kandinsky":
        device, dtype = to_arguments(device, dtype)  # pipe.to(torch.float16) works too
        self.prior.to(device=device, dtype=dtype)
        self.decoder.to(device=device, dtype=dtype)
        return self

    # ------------------------------------------------------------------ tasks
    # The tasks are declared in tasks.PROMPT_TASKS: where the image embeddings come from, and the
    # decoder task that paints them. Every method takes the decoder options of
    # tasks.DECODER_OPTIONS and, where the prior runs, tasks.PRIOR_OPTIONS, by keyword; ``preset=`` (a key
    # of tasks.PRESETS) fills both, and explicit arguments override it.

    def text2img(self, prompt, negative_prompt=None, **options):
        return self.run("text2img", prompt=prompt, negative_prompt=negative_prompt, **options)

    def img2img(self, prompt, image, negative_prompt=None, strength: float = 0.3, **options):
        return self.run("img2img", prompt=prompt, negative_prompt=negative_prompt, image=image, strength=strength,
                        **options)

    def inpaint(self, prompt, image, mask_image, negative_prompt=None, **options):
        """Paint ``prompt`` where ``mask_image`` is white / 1; keep the black / 0 area."""
        return self.run("inpaint", prompt=prompt, negative_prompt=negative_prompt, image=image,
                        mask_image=mask_image, **options)

    def controlnet(self, prompt, hint, negative_prompt=None, **options):
        """text2img following a depth ``hint`` (controlnet-depth checkpoint)."""
        return self.run("controlnet", prompt=prompt, negative_prompt=negative_prompt, hint=hint, **options)

    def controlnet_img2img(self, prompt, image, hint, negative_prompt=None, strength: float = 0.3, **options):
        """img2img following a depth ``hint`` (controlnet-depth checkpoint)."""
        return self.run("controlnet_img2img", prompt=prompt, negative_prompt=negative_prompt, image=image,
                        hint=hint, strength=strength, **options)

    def variations(self, image, **options):
        """New pictures of what ``image`` shows: its CLIP image embedding decoded again (no prior),
        guided away from the embedding of an all-zero image.

        ``image``: a PIL image or numpy array (CLIP-preprocessed here), a list of them, or a
        torch tensor of CLIP ``pixel_values`` (already resized and normalised; see
        ``PriorPipeline.encode_image``; unlike img2img's [0, 1] image tensors).

        No ``prompt``, ``negative_prompt`` nor prior options: nothing here runs the prior, and they are
        refused (TypeError naming this call). A negative prompt has a meaning only through the prior,
        as in the reference's ``KandinskyV22PriorPipeline.interpolate``, where the negative embedding is the
        prior's embedding of ``negative_prompt``: ``interpolate([image], [1.0], negative_prompt="...")``
        decodes this same image embedding guided away from it (the prior's run draws from ``generator``
        first, so the pictures differ from ``variations``' for the same seed)."""
        return self.run("variations", image=image, **options)

    def interpolate(self, images_and_prompts: list, weights: list, negative_prior_prompt=None,
                    negative_prompt: str = "", **options):
        """A picture of the weighted mix of several prompts and images (``PriorPipeline.interpolate``;
        image items as in :meth:`variations`)."""
        return self.run("interpolate", images_and_prompts=images_and_prompts, weights=weights,
                        negative_prior_prompt=negative_prior_prompt, negative_prompt=negative_prompt, **options)

    def emb2emb(self, prompt, image, negative_prompt=None, prior_strength: float = 0.3, **options):
        """Paint ``image``'s CLIP embedding moved towards ``prompt`` by the prior
        (``PriorPipeline.emb2emb`` with ``strength=prior_strength``)."""
        return self.run("emb2emb", prompt=prompt, image=image, negative_prompt=negative_prompt,
                        prior_strength=prior_strength, **options)

    def threads(self, task=None, height=None, width=None, **_):
        """The threads of a call: the decoder's (kandinsky.threads), for the prior too."""
        return self.decoder.threads(height, width)

    @per_call
    def run(self, task: str, **kwargs):
        """Run prompt-level task ``task`` (a key of tasks.PROMPT_TASKS) with the arguments of the method of
        that name (:func:`arguments`; others are refused)."""
        spec = PROMPT_TASKS.get(task)
        if spec is None:
            raise ValueError(f"unknown task {task!r}: one of {', '.join(PROMPT_TASKS)}.")
        check_arguments(task, kwargs)
        self.decoder.check_task(spec.decoder_task)  # a wrong checkpoint fails before the prior runs
        preset = preset_options(kwargs.get("preset"), PRIOR_OPTIONS)  # the decoder applies the rest of it
        prior_opts = {k: kwargs.pop(k, preset.get(k, v)) for k, v in PRIOR_OPTIONS.items()}
        n = kwargs.get("num_images_per_prompt", 1)
        if isinstance(n, int) and spec.embeddings != "mix":  # a runaway size is refused before the prior runs
            source = kwargs.get("prompt", kwargs.get("image"))  # one row per prompt (or CLIP picture)
            rows = len(source) if isinstance(source, (list, tuple)) else 1
            picture = kwargs.get("image") if "image" in DECODER_TASKS[spec.decoder_task].inputs else None
            self.decoder.check_fits(rows * n, kwargs.get("height"), kwargs.get("width"), picture, kwargs.get("tile"))
        generator, progress = kwargs.get("generator"), kwargs.get("progress", True)
        callback = kwargs.get("callback_on_step_end")
        prior_kw = dict(num_inference_steps=prior_opts["prior_num_inference_steps"], generator=generator,
                        guidance_scale=prior_opts["prior_guidance_scale"], progress=progress)
        if spec.embeddings == "prompt":
            try:
                out = self.prior(kwargs.pop("prompt"), negative_prompt=kwargs.pop("negative_prompt", None),
                                 num_images_per_prompt=n, latents=prior_opts["prior_latents"],
                                 callback_on_step_end=callback, **prior_kw)
            except (ValueError, TypeError) as e:  # the prior's `latents` is this API's `prior_latents`
                if str(e).startswith("`latents`"):
                    raise type(e)("`prior_latents`" + str(e)[len("`latents`"):]) from None
                raise
            embeds, negative = out.image_embeds, out.negative_image_embeds
        elif spec.embeddings == "image":
            embeds = self.prior.encode_image(kwargs.pop("image"))  # (B, D)
            negative = self.prior.zero_image_embeds(embeds.shape[0]).to(embeds)
        elif spec.embeddings == "mix":
            out = self.prior.interpolate(
                kwargs.pop("images_and_prompts"), kwargs.pop("weights"), num_images_per_prompt=n,
                latents=prior_opts["prior_latents"], negative_prior_prompt=kwargs.pop("negative_prior_prompt", None),
                negative_prompt=kwargs.pop("negative_prompt", ""), **prior_kw)
            embeds, negative = out.image_embeds, out.negative_image_embeds
            kwargs["num_images_per_prompt"] = 1  # interpolate already made n embeddings
        else:  # emb2emb
            out = self.prior.emb2emb(kwargs.pop("prompt"), kwargs.pop("image"), strength=kwargs.pop("prior_strength"),
                                     negative_prompt=kwargs.pop("negative_prompt", None), num_images_per_prompt=n,
                                     callback_on_step_end=callback, **prior_kw)
            embeds, negative = out.image_embeds, out.negative_image_embeds
            kwargs["num_images_per_prompt"] = 1
        if spec.embeddings == "prompt":
            kwargs["num_images_per_prompt"] = 1  # the prior made n embeddings per prompt
        return self.decoder.run(spec.decoder_task, embeds, negative, **kwargs)


def arguments(task: str) -> tuple[str, ...]:
    """The arguments ``Kandinsky.<task>()`` (and ``run(task, ...)``) takes: its own (the method's signature),
    the prior options its source of embeddings uses (PRIOR_OPTIONS_USED), and its decoder task's options
    (tasks.decoder_options)."""
    spec = PROMPT_TASKS[task]
    own = [p.name for p in inspect.signature(getattr(Kandinsky, task)).parameters.values()
           if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"]
    return tuple(own) + PRIOR_OPTIONS_USED[spec.embeddings] + tuple(decoder_options(spec.decoder_task))


def check_arguments(task: str, given) -> None:
    """Refuse the arguments prompt-level task ``task`` does not take, naming the call the user made."""
    takes = arguments(task)
    unknown = sorted(set(given) - set(takes))
    if not unknown:
        return
    why = ""
    if PROMPT_TASKS[task].embeddings == "image" and set(unknown) & {"prompt", "negative_prompt", *PRIOR_OPTIONS}:
        why = (f" {task}() decodes the picture's CLIP embedding without the prior (guided away from the zero "
               "image's embedding), so it takes no prompt, negative prompt or prior option; for a negative "
               "prompt, use interpolate([image], [1.0], negative_prompt=...), the reference's way.")
    raise TypeError(f"{task}() got unexpected argument(s) {', '.join(unknown)}; it takes: {', '.join(takes)}.{why}")
