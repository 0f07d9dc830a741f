"""The prompt-level API: the prior and the decoder chained, sharing one generator.

    prompt --PriorPipeline--> image_embeds, negative_image_embeds --DecoderPipeline--> images

Like the reference's combined pipelines (KandinskyV22CombinedPipeline and friends), the
same ``generator`` first draws the prior's noise, then the decoder's, so a seed gives
the same pictures as running ``PriorPipeline`` then ``DecoderPipeline`` by hand.
Unlike the reference, ``prior_latents`` and ``latents`` are separate arguments (the
reference hands the decoder's ``latents`` argument to the prior).
"""
from __future__ import annotations

from pathlib import Path

import torch

from kandinsky.hub import DEFAULT_DECODER, prior_from_model_card, resolve
from kandinsky.pipelines.decoder import DecoderPipeline
from kandinsky.pipelines.prior import PriorPipeline


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
        prior: str | Path | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        scheduler: str | None = None,
    ) -> "Kandinsky":
        """Folders or hub ids. Without ``prior``, the decoder's model card (README.md
        front matter ``prior:``) names it, as on the hub."""
        decoder_folder = resolve(decoder, "decoder checkpoint")
        if prior is None:
            prior = prior_from_model_card(decoder_folder)
            if prior is None:
                raise ValueError(
                    f"{decoder_folder}: its README.md names no prior (front matter `prior:`); "
                    "pass prior=<folder or hub id>, e.g. kandinsky-community/kandinsky-2-2-prior."
                )
        return cls(
            PriorPipeline.from_pretrained(resolve(prior, "prior checkpoint"), dtype=dtype, device=device),
            DecoderPipeline.from_pretrained(decoder_folder, dtype=dtype, device=device, scheduler=scheduler),
        )

    def to(self, device=None, dtype=None) -> "Kandinsky":
        self.prior.to(device=device, dtype=dtype)
        self.decoder.to(device=device, dtype=dtype)
        return self

    # ------------------------------------------------------------------ tasks
    def _embeds(self, task, prompt, negative_prompt, num_images_per_prompt, prior_num_inference_steps,
                prior_guidance_scale, generator, prior_latents, progress):
        self.decoder.check_task(task)  # a wrong checkpoint fails before the prior runs
        out = self.prior(
            prompt,
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=prior_num_inference_steps,
            generator=generator,
            latents=prior_latents,
            guidance_scale=prior_guidance_scale,
            progress=progress,
        )
        return out.image_embeds, out.negative_image_embeds

    def text2img(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        height: int = 512,
        width: int = 512,
        prior_guidance_scale: float = 4.0,
        prior_num_inference_steps: int = 25,
        generator: torch.Generator | None = None,
        prior_latents: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback_on_step_end=None,
        progress: bool = True,
    ):
        embeds, negative = self._embeds("text2img", prompt, negative_prompt, num_images_per_prompt,
                                        prior_num_inference_steps, prior_guidance_scale, generator,
                                        prior_latents, progress)
        return self.decoder.text2img(
            embeds, negative, height=height, width=width, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, generator=generator, latents=latents, output_type=output_type,
            callback_on_step_end=callback_on_step_end, progress=progress,
        )

    def img2img(
        self,
        prompt: str | list[str],
        image,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        strength: float = 0.3,
        num_images_per_prompt: int = 1,
        height: int = 512,
        width: int = 512,
        prior_guidance_scale: float = 4.0,
        prior_num_inference_steps: int = 25,
        generator: torch.Generator | None = None,
        prior_latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback_on_step_end=None,
        progress: bool = True,
    ):
        embeds, negative = self._embeds("img2img", prompt, negative_prompt, num_images_per_prompt,
                                        prior_num_inference_steps, prior_guidance_scale, generator,
                                        prior_latents, progress)
        return self.decoder.img2img(
            embeds, image, negative, height=height, width=width, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, strength=strength, generator=generator, output_type=output_type,
            callback_on_step_end=callback_on_step_end, progress=progress,
        )

    def inpaint(
        self,
        prompt: str | list[str],
        image,
        mask_image,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        height: int = 512,
        width: int = 512,
        prior_guidance_scale: float = 4.0,
        prior_num_inference_steps: int = 25,
        generator: torch.Generator | None = None,
        prior_latents: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback_on_step_end=None,
        progress: bool = True,
    ):
        """Paint ``prompt`` where ``mask_image`` is white / 1; keep the black / 0 area."""
        embeds, negative = self._embeds("inpaint", prompt, negative_prompt, num_images_per_prompt,
                                        prior_num_inference_steps, prior_guidance_scale, generator,
                                        prior_latents, progress)
        return self.decoder.inpaint(
            embeds, image, mask_image, negative, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator,
            latents=latents, output_type=output_type, callback_on_step_end=callback_on_step_end, progress=progress,
        )

    def controlnet(
        self,
        prompt: str | list[str],
        hint,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        height: int = 512,
        width: int = 512,
        prior_guidance_scale: float = 4.0,
        prior_num_inference_steps: int = 25,
        generator: torch.Generator | None = None,
        prior_latents: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback_on_step_end=None,
        progress: bool = True,
    ):
        """text2img following a depth ``hint`` (controlnet-depth checkpoint)."""
        embeds, negative = self._embeds("controlnet", prompt, negative_prompt, num_images_per_prompt,
                                        prior_num_inference_steps, prior_guidance_scale, generator,
                                        prior_latents, progress)
        return self.decoder.controlnet(
            embeds, negative, hint, height=height, width=width, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, generator=generator, latents=latents, output_type=output_type,
            callback_on_step_end=callback_on_step_end, progress=progress,
        )

    def variations(
        self,
        image,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        height: int = 512,
        width: int = 512,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback_on_step_end=None,
        progress: bool = True,
    ):
        """New pictures of what ``image`` shows: its CLIP image embedding decoded again
        (no prior), guided away from the embedding of an all-zero image.

        ``image``: a PIL image or numpy array (CLIP-preprocessed here), a list of them, or a
        torch tensor of CLIP ``pixel_values`` (already resized and normalised; see
        ``PriorPipeline.encode_image``; unlike img2img's [0, 1] image tensors)."""
        self.decoder.check_task("text2img")
        embeds = self.prior.encode_image(image)  # (B, D)
        negative = self.prior.zero_image_embeds(embeds.shape[0]).to(embeds)
        return self.decoder.text2img(
            embeds, negative, height=height, width=width, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt, generator=generator,
            latents=latents, output_type=output_type, callback_on_step_end=callback_on_step_end, progress=progress,
        )

    def interpolate(
        self,
        images_and_prompts: list,
        weights: list[float],
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        height: int = 512,
        width: int = 512,
        prior_guidance_scale: float = 4.0,
        prior_num_inference_steps: int = 25,
        negative_prior_prompt: str | None = None,
        negative_prompt: str = "",
        generator: torch.Generator | None = None,
        prior_latents: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback_on_step_end=None,
        progress: bool = True,
    ):
        """A picture of the weighted mix of several prompts and images (``PriorPipeline.interpolate``;
        image items as in :meth:`variations`)."""
        self.decoder.check_task("text2img")
        out = self.prior.interpolate(
            images_and_prompts, weights, num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=prior_num_inference_steps, generator=generator, latents=prior_latents,
            negative_prior_prompt=negative_prior_prompt, negative_prompt=negative_prompt,
            guidance_scale=prior_guidance_scale, progress=progress,
        )
        return self.decoder.text2img(
            out.image_embeds, out.negative_image_embeds, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator,
            latents=latents, output_type=output_type, callback_on_step_end=callback_on_step_end, progress=progress,
        )
