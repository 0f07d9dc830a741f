"""The sampling core through the pipelines: every decoder sampler against the reference (diffusers'
schedulers in a correct loop, or diffusers' own Kandinsky pipelines where those are correct), the
prior's prefix cache, the step state, trajectories and the x0 grid."""
from __future__ import annotations

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky.sampling import samplers
from kandinsky.sampling.trajectory import Trajectory, grid_image, save_x0_grid
from tests.helpers import rel_err, unit

TOL = 1e-4
SIZE = dict(height=64, width=64)
REFERENCE_CLASSES = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def embeds(batch: int, seed: int = 0):
    g = gen(100 + seed)
    return torch.randn(batch, 32, generator=g), torch.randn(batch, 32, generator=g)


def rgb(seed: int) -> PIL.Image.Image:
    return PIL.Image.fromarray((torch.rand(64, 64, 3, generator=gen(seed)) * 255).byte().numpy())


def reference_scheduler(name: str, config):
    extra = {"use_karras_sigmas": True} if name == "dpmpp_2m_karras" else {}
    return getattr(diffusers, REFERENCE_CLASSES[name]).from_config(config, **extra)


@torch.no_grad()
def reference_loop(ref, name, e, n, guidance_scale, generator, image=None, strength=1.0, steps=6):
    """A correct sampling loop with the reference UNet, MoVQ and scheduler: the model input scaled with
    ``scale_model_input`` (the reference Kandinsky pipelines skip it), guidance as theirs, img2img as
    theirs with the step order and begin index honoured. Returns latents."""
    sched = reference_scheduler(name, ref.scheduler.config)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    B = e.shape[0]
    shape = (B, 4, 8, 8)
    if image is None:
        x = diffusers.utils.torch_utils.randn_tensor(shape, generator=generator) * sched.init_noise_sigma
    else:
        kept = min(int(steps * strength), steps)
        start = (steps - kept) * sched.order
        timesteps = timesteps[start:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start)
        pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
        latents = ref.movq.encode(pixels)["latents"].repeat(B, 1, 1, 1)
        noise = diffusers.utils.torch_utils.randn_tensor(latents.shape, generator=generator)
        x = sched.add_noise(latents, noise, timesteps[:1].repeat(B))
    guided = guidance_scale > 1
    cond = torch.cat([n, e]) if guided else e
    for t in timesteps:
        x_in = torch.cat([x, x]) if guided else x
        x_in = sched.scale_model_input(x_in, t)
        out = ref.unet(x_in, t, None, added_cond_kwargs={"image_embeds": cond}).sample[:, :4]
        if guided:
            u, c = out.chunk(2)
            out = u + guidance_scale * (c - u)
        kwargs = {"generator": generator} if name in ("ddpm", "ddim", "euler_a", "dpmpp_2m", "dpmpp_2m_karras") else {}
        x = sched.step(out, t, x, **kwargs).prev_sample
    return x


# --------------------------------------------------------------------------- every sampler, whole pipelines
@pytest.mark.parametrize("name", list(REFERENCE_CLASSES))
def test_every_sampler_text2img_and_img2img(decoder, name):
    """Our DecoderPipeline with ``scheduler=name`` equals the reference UNet run by the reference
    scheduler in a correct loop: text2img guided (batch 2) and img2img (strength 0.5), 6 steps."""
    ours, ref = decoder
    e, n = embeds(2, seed=1)
    got = ours.text2img(e, n, scheduler=name, num_inference_steps=6, guidance_scale=4.0, generator=gen(1),
                        output_type="latent", progress=False, **SIZE).images
    exp = reference_loop(ref, name, e, n, 4.0, gen(1))
    assert rel_err(got, exp) < TOL
    image = rgb(2)
    got = ours.img2img(e, image, n, scheduler=name, strength=0.5, num_inference_steps=6, guidance_scale=1.0,
                       generator=gen(2), output_type="latent", progress=False, **SIZE).images
    exp = reference_loop(ref, name, e, n, 1.0, gen(2), image=image, strength=0.5)
    assert rel_err(got, exp) < TOL


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_karras"])
def test_reference_kandinsky_pipelines_with_dpm_solver(decoder, inpainter, name):
    """For DPM-Solver++ the model-input scaling is the identity, so diffusers' own Kandinsky pipelines
    with the scheduler swapped are a valid reference: text2img and inpaint, guided, batch 2."""
    ours, ref = decoder
    e, n = embeds(2, seed=3)
    kw = dict(num_inference_steps=5, guidance_scale=4.0, **SIZE)
    swapped = diffusers.KandinskyV22Pipeline(unet=ref.unet, movq=ref.movq,
                                             scheduler=reference_scheduler(name, ref.scheduler.config))
    swapped.set_progress_bar_config(disable=True)
    got = ours.text2img(e, n, scheduler=name, generator=gen(3), output_type="latent", progress=False, **kw).images
    exp = swapped(image_embeds=e, negative_image_embeds=n, generator=gen(3), output_type="latent", **kw).images
    assert rel_err(got, exp) < TOL

    ours, ref = inpainter
    mask = np.zeros((64, 64), dtype=np.float32)
    mask[8:40, 16:56] = 1
    image = rgb(4)
    swapped = diffusers.KandinskyV22InpaintPipeline(unet=ref.unet, movq=ref.movq,
                                                    scheduler=reference_scheduler(name, ref.scheduler.config))
    swapped.set_progress_bar_config(disable=True)
    got = ours.inpaint(e[:1], image, mask, n[:1], scheduler=name, generator=gen(4), output_type="latent",
                       progress=False, **kw).images
    exp = swapped(image_embeds=e[:1], image=image, mask_image=mask.copy(), negative_image_embeds=n[:1],
                  generator=gen(4), output_type="latent", **kw).images
    assert rel_err(got, exp) < TOL


def test_reference_kandinsky_pipeline_euler_is_wrong(decoder):
    """Deviation recorded: diffusers' Kandinsky pipeline never calls scale_model_input, so with
    EulerDiscreteScheduler it feeds the UNet latents scaled by sigma (~25 at the first step) and
    returns something else than a correct Euler loop; ours is the correct loop."""
    ours, ref = decoder
    e, n = embeds(1, seed=5)
    kw = dict(num_inference_steps=6, guidance_scale=4.0, **SIZE)
    swapped = diffusers.KandinskyV22Pipeline(unet=ref.unet, movq=ref.movq,
                                             scheduler=reference_scheduler("euler", ref.scheduler.config))
    swapped.set_progress_bar_config(disable=True)
    wrong = swapped(image_embeds=e, negative_image_embeds=n, generator=gen(5), output_type="latent", **kw).images
    right = reference_loop(ref, "euler", e, n, 4.0, gen(5))
    got = ours.text2img(e, n, scheduler="euler", generator=gen(5), output_type="latent", progress=False,
                        **kw).images
    assert rel_err(got, right) < TOL
    assert rel_err(wrong, right) > 0.1


def test_scheduler_names_and_objects(decoder):
    ours, ref = decoder
    assert samplers.get_sampler("DPMPP-2M").name == "dpmpp_2m"
    with pytest.raises(ValueError, match="unknown sampler 'lms'.*ddpm, ddim, dpmpp_2m"):
        ours.text2img(*embeds(1), scheduler="lms", progress=False)
    with pytest.raises(ValueError, match="the prior's"):
        ours.text2img(*embeds(1), scheduler="unclip", progress=False)
    previous = ours.sampler
    try:
        ours.set_scheduler(diffusers.EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config))
        assert ours.sampler == "euler_a"
        ours.set_scheduler(reference_scheduler("dpmpp_2m_karras", ref.scheduler.config))
        assert ours.sampler == "dpmpp_2m_karras"
        bad = diffusers.DDPMScheduler.from_config({**ref.scheduler.config, "beta_end": 0.02})
        with pytest.raises(ValueError, match="beta_end"):
            ours.set_scheduler(bad)
        with pytest.raises(TypeError, match="sampler name"):
            ours.set_scheduler(diffusers.LMSDiscreteScheduler.from_config(ref.scheduler.config))
    finally:
        ours.set_scheduler(previous)


# --------------------------------------------------------------------------- prior prefix cache
def test_prior_cache_equals_uncached(prior_pipeline_folder):
    """The cached prior (the default, also under every reference-parity test of the prior pipeline)
    equals recomputing all 81 tokens at every step: negative prompt, 2 images per prompt."""
    from kandinsky import PriorPipeline

    pipe = PriorPipeline.from_pretrained(prior_pipeline_folder[0])
    kw = dict(negative_prompt="a dog", num_images_per_prompt=2, num_inference_steps=5, progress=False)
    cached = pipe(["a red cat", "a blue house"], generator=gen(6), **kw)
    plain = pipe(["a red cat", "a blue house"], generator=gen(6), cache=False, **kw)
    assert rel_err(cached.image_embeds, plain.image_embeds) < 1e-5
    assert rel_err(cached.negative_image_embeds, plain.negative_image_embeds) < 1e-5


def test_prior_forward_cached_equals_forward():
    from kandinsky.prior.model import DiffusionPrior, PriorConfig

    torch.manual_seed(0)
    prior = DiffusionPrior(PriorConfig(num_attention_heads=2, attention_head_dim=8, num_layers=3, embedding_dim=16))
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_(0, 0.3)
        g = gen(7)
        x, te, th = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g), torch.randn(3, 77, 16, generator=g)
        mask = torch.arange(77)[None] < torch.tensor([[5], [77], [30]])
        full = prior(x, torch.tensor([999, 500, 3]), te, th, mask)
        prefix = prior.prefix(te, th, mask)
        assert rel_err(prior.forward_cached(x, torch.tensor([999, 500, 3]), prefix), full) < 1e-5
        index = torch.tensor([2, 2, 0])
        assert rel_err(prior.forward_cached(x[index], torch.tensor([3, 3, 999]), prefix.select(index)),
                       full[torch.tensor([2, 2, 0])]) < 1e-5
        with pytest.raises(ValueError, match="prefix was computed for 3"):
            prior.forward_cached(x[:2], 5, prefix)


# --------------------------------------------------------------------------- step state, trajectories
def test_step_state_both_stages(prior_pipeline_folder, decoder_pipeline_folder):
    """One callback form for both stages: stage, step, timestep, x, x0 and, with guidance, the branch
    outputs whose combination is the guided output (s = 4); a returned tensor replaces x."""
    from kandinsky import Kandinsky

    pipe = Kandinsky.from_pretrained(decoder_pipeline_folder[0], prior=prior_pipeline_folder[0])
    seen = []

    def callback(state):
        seen.append(state)
        if state.uncond is not None:
            guided = state.uncond + 4.0 * (state.cond - state.uncond)
            assert torch.allclose(guided, state.model_output, atol=1e-6)

    pipe.text2img("a red cat", num_inference_steps=3, prior_num_inference_steps=4, guidance_scale=4.0,
                  prior_guidance_scale=1.0, callback_on_step_end=callback, progress=False, output_type="latent",
                  **SIZE)
    assert [(s.stage, s.step) for s in seen] == [("prior", i) for i in range(4)] + [("decoder", i) for i in range(3)]
    assert all(s.uncond is None for s in seen[:4]) and all(s.uncond is not None for s in seen[4:])
    assert seen[0].x.shape == (1, 32) and seen[-1].x.shape == (1, 4, 8, 8) and seen[-1].x0.shape == (1, 4, 8, 8)
    reference = diffusers.DDPMScheduler.from_pretrained(decoder_pipeline_folder[0], subfolder="scheduler")
    reference.set_timesteps(3)
    assert [s.timestep for s in seen[4:]] == [float(t) for t in reference.timesteps]


def test_trajectory(decoder):
    ours, _ = decoder
    e, n = embeds(2, seed=8)
    out = ours.text2img(e, n, num_inference_steps=4, return_trajectory=True, generator=gen(8),
                        output_type="latent", progress=False, **SIZE)
    traj = out.trajectory
    assert len(traj) == 4 and traj.x.shape == traj.x0.shape == (4, 2, 4, 8, 8)
    assert torch.equal(traj.x[-1], out.images)
    assert rel_err(traj.x[-1], traj.x0[-1]) < 1e-6  # the last DDPM step lands on its x0 estimate
    recorder = Trajectory()
    again = ours.text2img(e, n, num_inference_steps=4, callback_on_step_end=recorder, generator=gen(8),
                          output_type="latent", progress=False, **SIZE).images
    assert torch.equal(again, out.images) and torch.equal(recorder.x, traj.x)
    frames = torch.rand(3, 2, 3, 10, 12)
    grid = grid_image(frames, pad=2)
    assert grid.size == (3 * 14 + 2, 2 * 12 + 2)
    y, x = 2 + 1 * (10 + 2), 2 + 1 * (12 + 2)  # image 1 of step 1: one row and one column in
    assert np.asarray(grid)[y, x].tolist() == (frames[1, 1, :, 0, 0] * 255).round().byte().tolist()


def test_save_steps_cli(tmp_path):
    """`--save-steps grid.png` writes the x0 previews: steps across, images down."""
    from kandinsky.cli import main

    out, grid = tmp_path / "o.png", tmp_path / "grid.png"
    code = main(["text2img", "--demo", "a red cat", "-o", str(out), "--steps", "3", "--prior-steps", "2",
                 "--width", "64", "--height", "64", "--num-images", "2", "--save-steps", str(grid),
                 "--scheduler", "DPMPP_2M", "--no-progress"])
    assert code == 0 and (tmp_path / "o-0.png").is_file()
    assert PIL.Image.open(grid).size == (3 * (128 + 2) + 2, 2 * (128 + 2) + 2)


# --------------------------------------------------------------------------- DDPM / DDIM / UnCLIP as functions
@pytest.mark.parametrize("name, folder, cls", [
    ("ddpm", "kandinsky-2-2-decoder", "DDPMScheduler"),
    ("ddim", "kandinsky-2-2-decoder", "DDIMScheduler"),
    ("unclip", "kandinsky-2-2-prior", "UnCLIPScheduler"),
])
def test_discrete_samplers_bit_identical(name, folder, cls):
    """The pure sampler functions give exactly the reference scheduler's trajectory (fake model,
    same generator; the prior loop passes prev_timestep as diffusers' prior pipeline does)."""
    import json

    from tests.conftest import DATA
    from kandinsky.schedulers import scheduler_from_config

    config = json.loads((DATA / folder / "scheduler" / "scheduler_config.json").read_text())
    schedule = scheduler_from_config(config, kind=name)
    shape = (2, 16) if name == "unclip" else (2, 4, 8, 8)
    scale = 8.0 if name == "unclip" else 1.0

    def model(x, t):
        return scale * torch.tanh(x + float(t) / 1000)

    x_T = torch.randn(shape, generator=gen(30))
    plan = samplers.make_plan(name, schedule, 7)
    seen = []
    ours = samplers.sample(name, lambda x, t, step: samplers.Guided(model(x, t)), x_T.clone(), plan,
                           generator=gen(31), callback=lambda s: seen.append(s.x.clone()))
    ref = getattr(diffusers, cls).from_config(config)
    ref.set_timesteps(7)
    x, g, expected = x_T.clone(), gen(31), []
    timesteps = ref.timesteps
    for i, t in enumerate(timesteps):
        kwargs = {"prev_timestep": timesteps[i + 1] if i + 1 < len(timesteps) else None} if name == "unclip" else {}
        x = ref.step(model(x, t), t, x, generator=g, **kwargs).prev_sample
        expected.append(x)
    assert torch.equal(plan.timesteps, timesteps.cpu())
    assert all(torch.equal(a, b) for a, b in zip(seen, expected)) and torch.equal(ours, x)
