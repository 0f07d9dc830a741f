"""Robustness at the edges of the pipelines and the CLI (issue classes: no lost work, non-finite
values, masks as people paint them, misleading messages). Each test failed on the code before."""
from __future__ import annotations

import warnings

import numpy as np
import PIL.Image
import pytest
import torch

import kandinsky.demo
from kandinsky import DecoderPipeline, Kandinsky, PriorPipeline
from kandinsky.cli import main
from kandinsky.demo import build_demo_checkpoints
from kandinsky.pipelines.images import load_masks

BUILD_DEMO = build_demo_checkpoints
SMALL = dict(height=64, width=64, num_inference_steps=2, progress=False)
FAST = ["--steps", "2", "--prior-steps", "2", "--width", "64", "--height", "64", "--no-progress"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return BUILD_DEMO(tmp_path_factory.mktemp("robust-demo"), seed=0)


@pytest.fixture(scope="module")
def pipe(demo):
    return Kandinsky.from_pretrained(demo["decoder"], prior=demo["prior"])


@pytest.fixture(scope="module")
def inpainter(demo):
    return DecoderPipeline.from_pretrained(demo["decoder-inpaint"])


@pytest.fixture
def cached_demo(monkeypatch, demo):
    monkeypatch.setattr(kandinsky.demo, "build_demo_checkpoints", lambda root, seed=0: demo)


def embeds(pipe, n=1):
    g = torch.Generator().manual_seed(0)
    d = pipe.decoder.unet.config.encoder_hid_dim
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


# --------------------------------------------------------------------------- never lose work (CLI)
def test_existing_output_is_not_overwritten(cached_demo, tmp_path, capsys):
    out = tmp_path / "o.png"
    out.write_bytes(b"my picture")
    assert main(["text2img", "--random-demo", "a", "-o", str(out), *FAST]) == 2
    assert out.read_bytes() == b"my picture"
    assert "--overwrite" in capsys.readouterr().err
    assert main(["text2img", "--random-demo", "a", "-o", str(out), "--overwrite", *FAST]) == 0
    assert PIL.Image.open(out).size == (64, 64)


def test_unwritable_outputs_fail_before_work(cached_demo, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(Kandinsky, "from_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
    assert main(["text2img", "--random-demo", "a", "-o", str(tmp_path / "file" / "o.png"), *FAST]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    (tmp_path / "dir.png").mkdir()
    assert main(["text2img", "--random-demo", "a", "-o", str(tmp_path / "dir.png"), *FAST]) == 2
    assert "is a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["text2img", "--random-demo", "a", "--seed", str(2**64), *FAST])
    assert e.value.code == 2 and "64-bit" in capsys.readouterr().err


def test_failed_save_rescues_the_images(cached_demo, tmp_path, capsys, monkeypatch):
    from kandinsky.cli import common

    target = tmp_path / "gone" / "o.png"
    monkeypatch.setattr(common, "check_outputs",
                        lambda paths, overwrite, image: (tmp_path / "gone").write_text("now a file"))
    assert main(["text2img", "--random-demo", "a", "-o", str(target), *FAST]) == 1
    err = capsys.readouterr().err
    assert "saved to" in err
    rescued = err.rsplit("saved to ", 1)[1].split(" instead")[0]
    assert PIL.Image.open(f"{rescued}/o.png").size == (64, 64)


def test_cli_flags_and_checkpoints(cached_demo, demo, tmp_path, capsys):
    image = tmp_path / "i.png"
    PIL.Image.new("RGB", (64, 64), (200, 10, 10)).save(image)
    assert main(["variations", "--random-demo", "--image", str(image), "--negative", "x", "-o", str(tmp_path / "v.png"),
                 *FAST[:2], *FAST[4:]]) == 2
    assert "does not use --negative" in capsys.readouterr().err
    assert main(["inpaint", "a hat", "--image", str(image), "--mask", str(image), "--decoder", str(demo["decoder"]),
                 "--prior", str(demo["prior"]), "-o", str(tmp_path / "h.png"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "pass --decoder kandinsky-community/kandinsky-2-2-decoder-inpaint" in err


def test_cli_warnings_are_plain(cached_demo, tmp_path, capsys):
    assert main(["text2img", "--random-demo", "a " * 90, "-o", str(tmp_path / "o.png"), *FAST]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "warnings.warn" not in err and ".py:" not in err


# --------------------------------------------------------------------------- non-finite values
def test_non_finite_inputs_are_refused_by_name(pipe, inpainter):
    e, n = embeds(pipe)
    dec = pipe.decoder
    nan = float("nan")
    with pytest.raises(ValueError, match="`image_embeds` holds NaN"):
        dec.text2img(e * nan, n, **SMALL)
    with pytest.raises(ValueError, match="`negative_image_embeds` holds NaN"):
        dec.text2img(e, n * float("inf"), **SMALL)
    with pytest.raises(ValueError, match="latents hold NaN"):
        dec.text2img(e, n, latents=torch.full((1, 4, 8, 8), nan), **SMALL)
    with pytest.raises(ValueError, match="guidance_scale"):
        dec.text2img(e, n, guidance_scale=nan, **SMALL)
    with pytest.raises(ValueError, match="image: the image holds NaN"):
        dec.img2img(e, torch.full((3, 64, 64), nan), n, strength=1.0, **SMALL)
    with pytest.raises(ValueError, match="mask holds NaN"):
        inpainter.inpaint(e, torch.rand(3, 64, 64), torch.full((64, 64), nan), n, **SMALL)
    with pytest.raises(ValueError, match="`weights\\[i\\]` must be a finite number"):
        pipe.interpolate(["a", "b"], [0.5, nan], **SMALL)
    with pytest.raises(ValueError, match="`guidance_scale` must be a finite number"):
        pipe.prior("a", guidance_scale=float("inf"), progress=False)
    # a one-element tensor is a number, not "non-finite"
    out = dec.text2img(e, n, guidance_scale=torch.tensor(4.0), output_type="latent", **SMALL).images
    assert torch.isfinite(out).all()


def test_a_run_that_turns_non_finite_stops_naming_stage_and_step(pipe):
    e, n = embeds(pipe)
    with pytest.raises(FloatingPointError, match="decoder sample became NaN or inf at step 1"):
        pipe.decoder.text2img(e, n, callback_on_step_end=lambda s: s.x * float("nan") if s.step == 0 else None,
                              **SMALL)


# --------------------------------------------------------------------------- masks as people paint them
def test_masks_painted_in_colour_or_alpha():
    white = np.zeros((32, 32), dtype=np.float32)
    white[8:20, 4:28] = 1
    expected = load_masks(white, 32, 32)
    red = np.zeros((32, 32, 3), dtype=np.uint8)
    red[8:20, 4:28, 0] = 255
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[8:20, 4:28] = (0, 0, 255, 255)  # a blue stroke on a transparent layer
    cases = {
        "red PIL stroke": PIL.Image.fromarray(red),
        "alpha layer": PIL.Image.fromarray(rgba, mode="RGBA"),
        "(H, W, 3) numpy": red.astype(np.float32) / 255,
        "(3, H, W) tensor": torch.from_numpy(red).permute(2, 0, 1).float() / 255,
    }
    for name, mask in cases.items():
        got = load_masks(mask, 32, 32)
        assert got.shape == (1, 1, 32, 32), name
        assert torch.equal(got, expected), name


def test_empty_and_full_masks_warn():
    with pytest.warns(UserWarning, match="repaints nothing"):
        load_masks(np.zeros((16, 16), dtype=np.float32), 16, 16)
    with pytest.warns(UserWarning, match="repaints everything"):
        load_masks(PIL.Image.new("L", (16, 16), 255), 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        half = np.zeros((16, 16), dtype=np.float32)
        half[:8] = 1
        load_masks(half, 16, 16)


# --------------------------------------------------------------------------- messages that mislead
def test_messages_name_the_argument(pipe, demo):
    e, n = embeds(pipe)
    with pytest.raises(TypeError, match=r"torch.Generator\(\).manual_seed"):
        pipe.decoder.text2img(e, n, generator=0, **SMALL)
    with pytest.raises(TypeError, match=r"torch.Generator\(\).manual_seed"):
        pipe.prior("a", generator=0, progress=False)
    with pytest.raises(ValueError, match="`prior_latents` must have shape"):
        pipe.text2img("a", prior_latents=torch.zeros(3, 7), **SMALL)
    out = pipe.prior.interpolate(["a", "b"], [0.5, 0.5], negative_prompt=None, num_inference_steps=2,
                                 progress=False)  # None accepted, as by every other method
    assert out.image_embeds.shape[0] == 1
    with pytest.raises(TypeError, match="unexpected argument.*negative_prompt"):
        pipe.variations(PIL.Image.new("RGB", (64, 64)), negative_prompt="x", **SMALL)


def test_pipe_to_dtype_and_devices(demo, monkeypatch):
    pipe = Kandinsky.from_pretrained(demo["decoder"], prior=demo["prior"]).to(torch.bfloat16)
    assert pipe.prior.dtype == pipe.decoder.dtype == torch.bfloat16
    import kandinsky.pipelines.decoder as decoder_module
    import kandinsky.pipelines.prior as prior_module

    monkeypatch.setattr(decoder_module, "load_component", lambda *a, **k: pytest.fail("weights were read"))
    monkeypatch.setattr(prior_module, "load_component", lambda *a, **k: pytest.fail("weights were read"))
    for device in ("cuda:7", "nonsense"):
        with pytest.raises(ValueError, match="device"):
            Kandinsky.from_pretrained(demo["decoder"], prior=demo["prior"], device=device)
        with pytest.raises(ValueError, match="device"):
            PriorPipeline.from_pretrained(demo["prior"], device=device)


# --------------------------------------------------------------------------- --lora on every task
def test_cli_lora(cached_demo, demo, tmp_path, capsys):
    """`--lora FILE[:SCALE]` applies an adapter to the decoder's UNet: scale 0 gives the plain picture,
    another scale changes it, two flags stack; a missing file stops before any work."""
    from kandinsky.lora import add_lora, save_lora
    from weights_convert import load_component

    unet = load_component(demo["decoder"] / "unet")
    for p in add_lora(unet, rank=2):
        torch.nn.init.normal_(p, std=0.5)  # up is zero-initialised: give the adapter an effect
    save_lora(unet, tmp_path / "style")

    def run(*extra):
        out = tmp_path / f"o{len(list(tmp_path.glob('o*.png')))}.png"
        assert main(["text2img", "--random-demo", "a", "-o", str(out), *FAST, *extra]) == 0, capsys.readouterr().err
        return np.asarray(PIL.Image.open(out), dtype=int)

    plain = run()
    assert np.array_equal(run("--lora", f"{tmp_path / 'style'}:0"), plain)
    half = run("--lora", f"{tmp_path / 'style'}:0.5")
    assert np.abs(half - plain).max() > 2
    assert np.abs(run("--lora", f"{tmp_path / 'style'}:0.5", "--lora", f"{tmp_path / 'style'}:0.5") - half).max() > 2
    with pytest.raises(SystemExit) as e:
        main(["text2img", "--random-demo", "a", "-o", str(tmp_path / "x.png"), "--lora", str(tmp_path / "nope"), *FAST])
    assert e.value.code == 2 and "nope" in capsys.readouterr().err


# --------------------------------------------------------------------------- speed and memory flags
def test_cli_tile_offload_same_picture(cached_demo, tmp_path):
    """--tile on (tiny tiles), --offload model / sequential: the same picture as a plain run (the
    demo decodes 64 px, so one 64 px tile covers it: tiling is then exact)."""
    def run(name, *extra):
        out = tmp_path / f"{name}.png"
        assert main(["text2img", "--random-demo", "a", "-o", str(out), *FAST, *extra]) == 0
        return np.asarray(PIL.Image.open(out))

    plain = run("plain")
    assert np.array_equal(run("tile", "--tile", "64"), plain)
    assert np.array_equal(run("model", "--offload", "model", "--device", "cpu"), plain)
    assert np.array_equal(run("seq", "--offload", "sequential", "--device", "cpu"), plain)
    with pytest.raises(SystemExit):
        main(["text2img", "--random-demo", "a", "--tile", "big", *FAST])


def test_compile_keeps_outputs(demo):
    """Kandinsky.compile() (here with the eager backend: the same tracing, no C++ build) gives the
    same latents."""
    pipe = Kandinsky.from_pretrained(demo["decoder"], prior=demo["prior"])
    kw = dict(output_type="latent", generator=torch.Generator().manual_seed(3), **SMALL)
    plain = pipe.text2img("a red cat", prior_num_inference_steps=2, **kw).images
    kw["generator"] = torch.Generator().manual_seed(3)
    compiled = pipe.compile(backend="eager").text2img("a red cat", prior_num_inference_steps=2, **kw).images
    assert torch.allclose(compiled, plain, atol=1e-5)


def test_from_pretrained_offload(demo):
    """Kandinsky.from_pretrained(offload="model") keeps the weights on the CPU between calls and gives
    the same latents as a plain pipeline (here the target device is the CPU itself)."""
    kw = dict(output_type="latent", prior_num_inference_steps=2, **SMALL)
    plain = Kandinsky.from_pretrained(demo["decoder"], prior=demo["prior"])
    off = Kandinsky.from_pretrained(demo["decoder"], prior=demo["prior"], device="cpu", offload="model")
    assert off.offloader is not None
    a = plain.text2img("a", generator=torch.Generator().manual_seed(4), **kw).images
    b = off.text2img("a", generator=torch.Generator().manual_seed(4), **kw).images
    assert torch.equal(a, b)
