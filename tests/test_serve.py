"""kandinsky serve: the studio's API against a live localhost server (conftest's studio_server: the shipped
shapes model at 64 px), with gradio_client; the pictures checked against the Python API bit for bit, the
shapes analyser, and the maths of pasting back."""
import concurrent.futures

import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky.data.analyse import analyse

gradio_client = pytest.importorskip("gradio_client", reason="the studio's API tests need gradio_client")
pytest.importorskip("gradio", reason="kandinsky serve needs Gradio: pip install -e '.[serve]'")
from kandinsky.serve.app import api_name  # noqa: E402

STEPS = dict(num_inference_steps=4, prior_num_inference_steps=4)
RED = "a large red circle in the center on a blue background"
GREEN = "a large green square in the center on a blue background"


@pytest.fixture(scope="module")
def client(studio_server):
    url, _, _ = studio_server
    client = gradio_client.Client(url, verbose=False)
    yield client
    client.close()


@pytest.fixture(scope="module")
def red_circle(client, tmp_path_factory):
    """A demo picture (the shapes model's red circle), saved as a PNG upload."""
    path, seed = client.predict(prompt=RED, seed=0, api_name="/text2img", num_inference_steps=10)
    copy = tmp_path_factory.mktemp("studio") / "red.png"
    PIL.Image.open(path).save(copy)
    assert analyse(PIL.Image.open(copy)).colour == "red"
    return copy


def pixels(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path).convert("RGB"))


def center_mask(folder, size=64, box=(12, 12, 52, 52)):
    mask = PIL.Image.new("L", (size, size), 0)
    mask.paste(255, box)
    mask.save(folder / "mask.png")
    return folder / "mask.png"


# ----------------------------------------------------------------------------- the endpoints
def test_endpoints_take_the_python_api_names(client):
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    common = {"seed", "num_inference_steps", "guidance_scale", "scheduler", "width", "height",
              "num_images_per_prompt"}
    expected = {
        "/text2img": {"prompt", "negative_prompt", "prior_guidance_scale", "prior_num_inference_steps"},
        "/img2img": {"prompt", "negative_prompt", "image", "strength"},
        "/inpaint": {"prompt", "negative_prompt", "image", "mask_image", "mask_blur", "inpaint_area", "padding",
                     "outpaint_left", "outpaint_right", "outpaint_top", "outpaint_bottom"},
        "/variations": {"image"},
        "/mix": {"prompt_1", "prompt_weight_1", "image_1", "image_weight_1"},
        "/emb2emb": {"prompt", "negative_prompt", "image", "prior_strength"},
    }
    for name, names in expected.items():
        got = {p["parameter_name"] for p in api[name]["parameters"]}
        assert names | common <= got, name
        assert [r["label"] for r in api[name]["returns"]] == ["image", "seed used"]


def test_text2img_is_the_python_api_bit_for_bit(client, studio_server):
    _, studio, _ = studio_server
    path, seed = client.predict(prompt=RED, seed=5, scheduler="ddim", api_name="/text2img", **STEPS)
    assert seed == 5
    expected = studio.pipe("text2img").text2img(RED, generator=torch.Generator().manual_seed(5), height=64,
                                                width=64, scheduler="ddim", progress=False, **STEPS).images[0]
    np.testing.assert_array_equal(pixels(path), np.asarray(expected))
    text = PIL.Image.open(path).text["parameters"]
    assert text.split("\n") == [RED, "Task: text2img, Steps: 4, Sampler: ddim, CFG scale: 4.0, Seed: 5, Size: 64x64, "
                                     "Prior steps: 4, Prior CFG scale: 4.0, Model: kandinsky-demo-shapes, Images: 1"]


def test_random_seed_is_reported_and_reproduces(client):
    path, seed = client.predict(prompt=RED, seed=-1, api_name="/text2img", **STEPS)
    assert 0 <= seed < 2**32
    again, same = client.predict(prompt=RED, seed=seed, api_name="/text2img", **STEPS)
    assert same == seed
    np.testing.assert_array_equal(pixels(path), pixels(again))


@pytest.mark.parametrize("api_name", ["/img2img", "/variations", "/mix", "/emb2emb"])
def test_image_endpoints(client, studio_server, red_circle, api_name):
    _, studio, _ = studio_server
    image = gradio_client.handle_file(str(red_circle))
    picture = PIL.Image.open(red_circle)
    generator = torch.Generator().manual_seed(3)
    pipe = studio.pipe("text2img")
    if api_name == "/img2img":
        path, seed = client.predict(prompt=GREEN, image=image, strength=0.5, seed=3, api_name=api_name, **STEPS)
        expected = pipe.img2img(GREEN, picture, strength=0.5, generator=generator, progress=False, **STEPS)
    elif api_name == "/variations":
        path, seed = client.predict(image=image, seed=3, num_inference_steps=4, api_name=api_name)
        expected = pipe.variations(picture, generator=generator, num_inference_steps=4, height=64, width=64,
                                   progress=False)
    elif api_name == "/emb2emb":
        path, seed = client.predict(prompt=GREEN, image=image, prior_strength=0.5, seed=3, api_name=api_name, **STEPS)
        expected = pipe.emb2emb(GREEN, picture, prior_strength=0.5, generator=generator, height=64, width=64,
                                progress=False, **STEPS)
        assert "Prior strength: 0.5, " in PIL.Image.open(path).text["parameters"]
    else:
        path, seed = client.predict(prompt_1=GREEN, prompt_weight_1=0.5, image_1=image, image_weight_1=0.5, seed=3,
                                    api_name=api_name, **STEPS)
        expected = pipe.interpolate([GREEN, picture], [0.5, 0.5], generator=generator, height=64, width=64,
                                    progress=False, **STEPS)
    assert seed == 3
    np.testing.assert_array_equal(pixels(path), np.asarray(expected.images[0]))


def test_image_tasks_take_the_command_lines_size(client, tmp_path):
    """On --demo an input picture is resized to the shapes model's 64 px unless width / height say
    (cli.common.picture_size, one rule): the studio's pictures are `kandinsky img2img --demo`'s, byte for byte."""
    from kandinsky.cli import main

    rng = np.random.default_rng(0)
    big = tmp_path / "big.png"
    PIL.Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(big)
    for width, size in ((0, (64, 64)), (128, (128, 96))):  # a width given: the height is the picture's
        path, seed = client.predict(prompt=GREEN, image=gradio_client.handle_file(str(big)), strength=0.5, seed=3,
                                    width=width, api_name="/img2img", **STEPS)
        out = tmp_path / f"cli-{width}.png"
        assert main(["img2img", "--demo", GREEN, "--image", str(big), "-o", str(out), "--steps", "4", "--prior-steps",
                     "4", "--strength", "0.5", "--seed", "3", "--no-progress", "--device", "cpu",
                     *(["--width", str(width)] if width else [])]) == 0
        assert PIL.Image.open(path).size == PIL.Image.open(out).size == size
        np.testing.assert_array_equal(pixels(path), pixels(out))


# ----------------------------------------------------------------------------- inpainting
@pytest.mark.parametrize("area", ["whole picture", "only masked area"])
def test_inpaint_keeps_the_unmasked_pixels_and_paints_the_prompt(client, red_circle, tmp_path, area):
    mask = center_mask(tmp_path)
    path, seed = client.predict(prompt=GREEN, image=gradio_client.handle_file(str(red_circle)),
                                mask_image=gradio_client.handle_file(str(mask)), mask_blur=2, inpaint_area=area,
                                padding=8, seed=1, api_name="/inpaint", num_inference_steps=10)
    out, before = pixels(path), pixels(red_circle)
    soft = np.asarray(PIL.Image.open(mask).filter(PIL.ImageFilter.GaussianBlur(2)))
    keep = soft == 0
    assert keep.sum() > 1000  # a frame of kept pixels
    np.testing.assert_array_equal(out[keep], before[keep])  # bit for bit
    inside = np.asarray(PIL.Image.open(mask)) == 255
    assert np.abs(out[inside].astype(int) - before[inside]).mean() > 20  # the masked area changed
    assert analyse(out).colour == "green"  # ... toward the prompt
    assert f"Mask blur: 2, Inpaint area: {area}, " in PIL.Image.open(path).text["parameters"]


def test_images_per_prompt_are_the_python_apis(studio_server, red_circle, tmp_path):
    """num_images_per_prompt: every picture (the page's gallery shows them all; the API returns the first), each
    a PNG with the parameters; inpainting pastes each back."""
    _, studio, _ = studio_server
    result = studio.generate("text2img", prompt=RED, seed=8, num_images_per_prompt=2, **STEPS)
    expected = studio.pipe("text2img").text2img(RED, generator=torch.Generator().manual_seed(8), height=64, width=64,
                                                num_images_per_prompt=2, progress=False, **STEPS).images
    assert len(result.paths) == 2 and result.seed == 8
    for path, picture in zip(result.paths, expected):
        np.testing.assert_array_equal(pixels(path), np.asarray(picture))
        assert "Seed: 8, " in PIL.Image.open(path).text["parameters"]
    painted = studio.inpaint(GREEN, PIL.Image.open(red_circle), PIL.Image.open(center_mask(tmp_path)), seed=1,
                             mask_blur=0, num_images_per_prompt=2, **STEPS)
    first, second = (pixels(path) for path in painted.paths)
    inside = np.asarray(PIL.Image.open(center_mask(tmp_path))) == 255
    for out in (first, second):
        np.testing.assert_array_equal(out[~inside], pixels(red_circle)[~inside])
    assert np.abs(first[inside].astype(int) - second[inside]).mean() > 1  # two pictures, not one twice


def test_the_history_reloads_a_pictures_parameters_from_its_png(client, red_circle, tmp_path):
    """A click in the history reads the picture's PNG `parameters` chunk back into its tab's controls: the
    request's values, and running them again gives the same picture."""
    from kandinsky.serve.app import RELOADABLE, parameters_of, reload_values

    request = dict(prompt="a large green square,\nin the center", negative_prompt="a circle", seed=11,
                   num_inference_steps=3, guidance_scale=5.5, scheduler="ddim", prior_guidance_scale=3.0,
                   prior_num_inference_steps=4, mask_blur=3, inpaint_area="only masked area", padding=6,
                   width=64, height=64, num_images_per_prompt=1, outpaint_left=0, outpaint_right=0, outpaint_top=0,
                   outpaint_bottom=0)
    path, _ = client.predict(image=gradio_client.handle_file(str(red_circle)), api_name="/inpaint",
                             mask_image=gradio_client.handle_file(str(center_mask(tmp_path))), **request)
    task, values = reload_values(path)
    assert task == "inpaint" and set(values) == set(RELOADABLE) & set(parameters_of("inpaint"))
    assert values == {name: request[name] for name in values}
    again, _ = client.predict(image=gradio_client.handle_file(str(red_circle)), api_name="/inpaint",
                              mask_image=gradio_client.handle_file(str(center_mask(tmp_path))), **values)
    np.testing.assert_array_equal(pixels(again), pixels(path))


def test_every_tabs_settings_round_trip_through_the_png(client, studio_server, red_circle, tmp_path):
    """Every setting of every tab but the uploaded pictures (the mix's prompts and weights and the outpainting
    amounts too) is written in the PNG's parameters and read back equal (reload_values: what a click in the
    history loads); the mix reloaded (with its picture) makes the same picture."""
    from kandinsky.serve.app import RELOADABLE, UPLOADS, parameters_of, reload_values

    _, studio, _ = studio_server
    picture, tricky = gradio_client.handle_file(str(red_circle)), 'a large green square, "big": in the center'
    common = dict(seed=12, num_inference_steps=2, guidance_scale=3.5, scheduler="ddim", width=64, height=64,
                  num_images_per_prompt=1)
    prior = dict(prior_guidance_scale=2.5, prior_num_inference_steps=3)
    requests = {
        "text2img": dict(prompt=tricky, negative_prompt="a red circle, small", **prior),
        "img2img": dict(prompt=tricky, negative_prompt="", image=picture, strength=0.6, **prior),
        "inpaint": dict(prompt=tricky, negative_prompt="blur", image=picture, mask_blur=3,
                        mask_image=gradio_client.handle_file(str(center_mask(tmp_path))), inpaint_area="whole picture",
                        padding=5, outpaint_left=16, outpaint_right=0, outpaint_top=8, outpaint_bottom=0, **prior),
        "variations": dict(image=picture),
        "interpolate": dict(prompt_1=tricky, prompt_weight_1=0.7, prompt_2="", prompt_weight_2=0.25, image_1=picture,
                            image_weight_1=0.3, image_weight_2=0.5, negative_prompt="blur, noise", **prior),
        "emb2emb": dict(prompt=tricky, negative_prompt="", image=picture, prior_strength=0.5, **prior),
    }
    assert list(requests) == studio.tasks()
    made = {}
    for task, request in requests.items():
        request = {**common, **request}
        path, _ = client.predict(api_name=f"/{api_name(task)}", **request)
        settings = {name: request[name] for name in parameters_of(task) if name in RELOADABLE}
        assert set(settings) == set(parameters_of(task)) - set(UPLOADS), task  # all but the pictures
        shown, values = reload_values(path)
        made[task] = path, {name: values.get(name) for name in settings}
        assert shown == task and made[task][1] == settings, task
    path, settings = made["interpolate"]
    again, _ = client.predict(api_name="/mix", image_1=picture, **settings)
    np.testing.assert_array_equal(pixels(again), pixels(path))


def test_outpaint_returns_the_extended_size(client, red_circle):
    path, _ = client.predict(prompt=RED, image=gradio_client.handle_file(str(red_circle)), outpaint_left=16,
                             outpaint_top=8, mask_blur=0, seed=2, api_name="/inpaint", **STEPS)
    out = pixels(path)
    assert out.shape == (72, 80, 3)
    np.testing.assert_array_equal(out[8:, 16:], pixels(red_circle))  # the picture itself kept


# ----------------------------------------------------------------------------- load
def test_concurrent_clients_get_their_sequential_pictures(client, studio_server):
    url, _, _ = studio_server
    seeds = list(range(8))
    options = dict(num_inference_steps=2, prior_num_inference_steps=2, api_name="/text2img")
    alone = {seed: pixels(client.predict(prompt=RED, seed=seed, **options)[0]) for seed in seeds}

    def one_client(seed):
        own = gradio_client.Client(url, verbose=False)
        try:
            return [(s, pixels(p)) for p, s in (own.predict(prompt=RED, seed=seed, **options) for _ in range(2))]
        finally:
            own.close()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(one_client, seeds) for r in rs]
    assert len(results) == 16
    for seed, picture in results:
        np.testing.assert_array_equal(picture, alone[seed])
    assert len({alone[s].tobytes() for s in seeds}) == 8  # different seeds, different pictures


def test_queue_is_bounded_and_runs_one_at_a_time(studio_server):
    _, studio, page = studio_server
    runs = [fn for fn in page.fns.values() if fn.api_name in (*map(api_name, studio.tasks()), "look_inside")]
    assert len(runs) == len(studio.tasks()) + 1
    assert {fn.concurrency_id for fn in runs} == {"model"} and {fn.concurrency_limit for fn in runs} == {1}
    assert page._queue.max_size == 16  # --queue-size


@pytest.fixture(scope="module")
def second_studio(random_demo):
    """A second live studio: `kandinsky serve --demo --controlnet C --queue-size 1`, C the tiny random
    controlnet-depth checkpoint of kandinsky.demo (the shapes model has none). -> (url, Studio, Blocks)."""
    import argparse

    from kandinsky.cli import serve as command
    from kandinsky.serve.app import free_port, start

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    page, studio, url = start(parser.parse_args(["--demo", "--controlnet", str(random_demo["controlnet"]),
                                                 "--queue-size", "1", "--port", str(free_port())]))
    yield url, studio, page
    page.close()
    studio.close()


def test_a_full_queue_refuses_with_its_message_and_keeps_serving(second_studio):
    """--queue-size 1: with the one model run busy and one request waiting, the next is refused (HTTP 503,
    "Queue is full"); the busy and the waiting ones then finish, and the server keeps serving."""
    import json
    import time
    import urllib.error
    import urllib.request

    url, studio, page = second_studio
    assert page._queue.max_size == 1
    client = gradio_client.Client(url, verbose=False)
    quick = dict(prompt=RED, num_inference_steps=2, prior_num_inference_steps=2, api_name="/text2img")

    def until(condition, what):
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    try:
        with studio._lock:  # the worker busy, as with a long run: the first request runs into the lock
            running = client.submit(seed=1, **quick)
            until(lambda: len(page._queue) == 0 and any(page._queue.active_jobs), "the first never started")
            waiting = client.submit(seed=2, **quick)
            until(lambda: len(page._queue) == 1, "the second never queued")
            data = [RED, "", 3, 2, 4.0, "ddpm", 0, 0, 1, 4.0, 2]  # /text2img's parameters, in order
            call = urllib.request.Request(url + "gradio_api/call/text2img", json.dumps({"data": data}).encode(),
                                          {"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(call, timeout=30)
            assert refused.value.code == 503
            assert json.load(refused.value)["detail"] == "Queue is full. Max size is 1 and size is 1."
            with pytest.raises(gradio_client.utils.QueueError, match="Queue is full"):
                client.submit(seed=3, **quick).result(timeout=30)
        assert running.result(timeout=60)[1] == 1 and waiting.result(timeout=60)[1] == 2
        path, seed = client.predict(seed=4, **quick)
        assert seed == 4 and pixels(path).shape == (64, 64, 3)
    finally:
        client.close()


def test_controlnet_tab_is_the_python_api_bit_for_bit(second_studio, random_demo, tmp_path):
    """--controlnet: the ControlNet tabs and endpoints; one request with a depth hint returns the Python API's
    picture on the same checkpoints (the random demo's prior and controlnet-depth) and the seed used."""
    from kandinsky.pipelines.combined import Kandinsky

    url, studio, page = second_studio
    assert studio.tasks()[-2:] == ["controlnet", "controlnet_img2img"]
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[:, None], (1, 64))  # near at the bottom
    hint = PIL.Image.fromarray(ramp).convert("RGB")
    hint.save(tmp_path / "depth.png")
    client = gradio_client.Client(url, verbose=False)
    try:
        path, seed = client.predict(prompt=RED, hint=gradio_client.handle_file(str(tmp_path / "depth.png")), seed=4,
                                    api_name="/controlnet", **STEPS)
    finally:
        client.close()
    assert seed == 4
    pipe = Kandinsky.from_pretrained(random_demo["controlnet"], prior=random_demo["prior"])
    expected = pipe.controlnet(RED, hint, generator=torch.Generator().manual_seed(4), progress=False, **STEPS)
    assert pixels(path).shape == (64, 64, 3)  # the hint's size: random weights are not the shapes model's 64 px
    np.testing.assert_array_equal(pixels(path), np.asarray(expected.images[0]))
    assert studio.pipe("controlnet").prior is not studio.pipe("text2img").prior  # one prior per prior checkpoint


def test_each_prior_checkpoint_loads_once(random_demo, monkeypatch):
    """Every decoder kind the studio loads (decoder, inpaint, controlnet) takes the prior already loaded
    for its prior checkpoint (cli.common.pipeline's priors): --demo --controlnet C loads two priors, the
    shapes model's (text2img, inpaint) and the random demo's (ControlNet), each once."""
    import argparse

    from kandinsky.cli import serve as command
    from kandinsky.demo import demo_folders
    from kandinsky.pipelines.prior import PriorPipeline
    from kandinsky.serve.studio import Studio

    load = PriorPipeline.from_pretrained.__func__
    loads = []

    def counted(cls, folder, *args, **kwargs):
        loads.append(str(folder))
        return load(cls, folder, *args, **kwargs)

    monkeypatch.setattr(PriorPipeline, "from_pretrained", classmethod(counted))
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    studio = Studio(parser.parse_args(["--demo", "--controlnet", str(random_demo["controlnet"])]))
    try:
        pipes = {task: studio.pipe(task) for task in ("text2img", "inpaint", "img2img", "controlnet")}
        assert loads[0] == str(demo_folders()["prior"]) and len(loads) == 2 and loads[1] != loads[0]
        assert pipes["inpaint"].prior is pipes["text2img"].prior is pipes["img2img"].prior
        assert pipes["inpaint"].decoder is not pipes["text2img"].decoder  # the inpainting checkpoint
        assert pipes["controlnet"].prior is not pipes["text2img"].prior
    finally:
        studio.close()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case, message", [
    ("not a picture", "is not a picture this studio can read: upload a PNG, JPEG"),
    ("too many pixels", "= 90,000 pixels, more than this studio reads (65,536, kandinsky serve --max-pixels)"),
    ("decompression bomb", "more pixels than this studio reads (65,536, kandinsky serve --max-pixels)"),
    ("mask of another size", "the mask is 32 x 32 but the picture is 64 x 64: the mask must have the picture's size"),
    ("NaN-producing guidance", "guidance_scale must be in [0, 100], got 1e+30"),
    ("no mask", "no mask: paint over the area to repaint"),
    ("unknown sampler", "scheduler: "),
])
def test_bad_input_gets_its_message_and_the_server_keeps_serving(client, red_circle, tmp_path, case, message):
    image = gradio_client.handle_file(str(red_circle))
    kwargs = dict(prompt=GREEN, image=image, api_name="/inpaint", mask_image=gradio_client.handle_file(
        str(center_mask(tmp_path))), **STEPS)
    if case == "not a picture":
        (tmp_path / "notes.png").write_text("hello")
        kwargs["image"] = gradio_client.handle_file(str(tmp_path / "notes.png"))
    elif case == "too many pixels":
        PIL.Image.new("RGB", (300, 300)).save(tmp_path / "big.png")
        kwargs["image"] = gradio_client.handle_file(str(tmp_path / "big.png"))
    elif case == "decompression bomb":
        from tests.test_serve_canvas import bomb_png

        kwargs["image"] = gradio_client.handle_file(str(bomb_png(tmp_path / "bomb.png")))
    elif case == "mask of another size":
        PIL.Image.new("L", (32, 32), 255).save(tmp_path / "small.png")
        kwargs["mask_image"] = gradio_client.handle_file(str(tmp_path / "small.png"))
    elif case == "NaN-producing guidance":
        kwargs["guidance_scale"] = 1e30
    elif case == "no mask":
        kwargs["mask_image"] = None
    else:
        kwargs["scheduler"] = "warp_drive"
    with pytest.raises(gradio_client.exceptions.AppError) as e:
        client.predict(**kwargs)
    assert message in str(e.value)
    assert "/tmp" not in str(e.value)  # no server paths in messages
    path, seed = client.predict(prompt=RED, seed=0, api_name="/text2img", num_inference_steps=1,
                                prior_num_inference_steps=2)
    assert seed == 0 and pixels(path).shape == (64, 64, 3)


def test_a_run_that_turns_nan_gets_the_pipelines_message(client, studio_server, monkeypatch):
    """Settings that pass the checks but make the sample NaN or inf (here a decoder UNet that overflows, as
    float16 can) stop with the pipelines' own message in the API, and the server keeps serving."""
    _, studio, _ = studio_server
    unet = studio.pipe("text2img").decoder.unet
    forward = unet.forward
    monkeypatch.setattr(unet, "forward", lambda *args, **kwargs: forward(*args, **kwargs) * torch.inf)
    with pytest.raises(gradio_client.exceptions.AppError) as e:
        client.predict(prompt=RED, seed=0, api_name="/text2img", **STEPS)
    assert "the decoder sample became NaN or inf at step 0" in str(e.value)
    assert "use bfloat16 or float32 (--dtype bf16 / fp32), or a lower guidance scale" in str(e.value)
    monkeypatch.undo()
    path, seed = client.predict(prompt=RED, seed=0, api_name="/text2img", **STEPS)
    assert seed == 0 and np.isfinite(pixels(path)).all() and pixels(path).std() > 0


def test_a_server_side_path_is_refused(studio_server):
    """A request naming a file on the server (not one uploaded to it) is refused before the studio runs."""
    import json
    import urllib.request

    url, _, _ = studio_server
    data = [{"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}, 1, 2, 4.0, "ddpm", 0, 0, 1]
    call = urllib.request.Request(url + "gradio_api/call/variations", json.dumps({"data": data}).encode(),
                                  {"Content-Type": "application/json"})
    event = json.load(urllib.request.urlopen(call, timeout=60))["event_id"]
    answer = urllib.request.urlopen(f"{url}gradio_api/call/variations/{event}", timeout=60).read().decode()
    assert "event: error" in answer and "/etc/hostname to the gradio cache dir because it was not uploaded" in answer


# ----------------------------------------------------------------------------- progress and looking inside
def test_a_preset_is_the_python_apis_preset(studio_server):
    """The studio fills in its default steps and guidance only without a preset: with one, the preset's values
    (and explicit ones over them) reach the pipeline exactly as the Python API's preset= does."""
    _, studio, _ = studio_server
    # "reference": 100 DDPM steps, where the demo studio's own default is 20
    result = studio.generate("text2img", prompt=RED, seed=6, preset="reference")
    expected = studio.pipe("text2img").text2img(RED, generator=torch.Generator().manual_seed(6), height=64,
                                                width=64, preset="reference", progress=False).images[0]
    np.testing.assert_array_equal(np.asarray(result.images[0]), np.asarray(expected))


def test_x0_previews_while_it_runs_do_not_change_the_picture(studio_server):
    from kandinsky.serve.app import PREVIEWS, _on_step

    _, studio, _ = studio_server
    ticks, frames = [], []
    result = studio.generate("text2img", prompt=RED, seed=4, num_inference_steps=10, prior_num_inference_steps=4,
                             on_step=_on_step(lambda done, desc, unit: ticks.append((desc, done)), frames.append,
                                              lambda: studio.pipe("text2img").decoder.movq))
    assert ticks == [("prior", (i, 4)) for i in range(1, 5)] + [("decoder", (i, 10)) for i in range(1, 11)]
    assert len(frames) == PREVIEWS - 1 and {f.size for f in frames} == {(64, 64)}  # steps 2, 4, 6, 8 of 10
    alone = studio.generate("text2img", prompt=RED, seed=4, num_inference_steps=10, prior_num_inference_steps=4)
    np.testing.assert_array_equal(np.asarray(result.images[0]), np.asarray(alone.images[0]))


def test_look_inside_shows_the_research_pictures(client, studio_server):
    from kandinsky.research.viz import attention_pictures

    _, studio, _ = studio_server
    picture, seed, trajectory, decoder, prior = client.predict(prompt=RED, seed=2, num_inference_steps=4, step=3,
                                                               api_name="/look_inside")
    assert seed == 2
    expected = attention_pictures(studio.pipe("text2img"), RED, steps=[3], trajectory=True, num_inference_steps=4,
                                  generator=torch.Generator().manual_seed(2), height=64, width=64, progress=False)
    for path, name in ((picture, "image"), (trajectory, "trajectory"), (decoder, "decoder"), (prior, "prior")):
        np.testing.assert_array_equal(pixels(path), np.asarray(expected[name].convert("RGB")), err_msg=name)


def test_look_inside_the_last_text2img_is_that_picture(client):
    """"take the last text2img": its settings read back from its PNG (reload_values) and run by look inside
    give the same picture, bit for bit."""
    from kandinsky.serve.app import LOOK_INSIDE, LOOK_SETTINGS, reload_values

    path, seed = client.predict(prompt=RED, negative_prompt="a green square", seed=9, num_inference_steps=5,
                                scheduler="dpmpp_2m", guidance_scale=6.0, prior_guidance_scale=2.5,
                                prior_num_inference_steps=3, api_name="/text2img")
    task, values = reload_values(path)
    taken = {name: values[name] for name in (*LOOK_INSIDE, *LOOK_SETTINGS) if name in values}
    assert task == "text2img" and len(taken) == 10  # all but step and level
    picture, used, *_ = client.predict(**taken, step=2, api_name="/look_inside")
    assert used == seed == 9
    np.testing.assert_array_equal(pixels(picture), pixels(path))


def test_look_inside_one_unet_level(client, studio_server):
    """A level gives research.viz's picture for that level alone (bit for bit), one column beside the image."""
    from kandinsky.research.viz import attention_pictures, unet_levels

    _, studio, _ = studio_server
    pipe = studio.pipe("text2img")
    levels = studio.levels()  # what the selector offers
    assert levels == unet_levels(pipe) and "unet.up.1" in levels
    _, seed, _, decoder, _ = client.predict(prompt=RED, seed=2, num_inference_steps=4, step=1, level="unet.up.1",
                                            api_name="/look_inside")
    expected = attention_pictures(pipe, RED, steps=[1], levels=["unet.up.1"], num_inference_steps=4, height=64,
                                  width=64, generator=torch.Generator().manual_seed(2), progress=False)
    np.testing.assert_array_equal(pixels(decoder), np.asarray(expected["decoder"]))
    assert seed == 2 and len(levels) > 1
    assert PIL.Image.open(decoder).size == (64 + 2 * 128, 18 + 128 + 22)  # the image and one level (of several)
    with pytest.raises(gradio_client.exceptions.AppError) as e:
        client.predict(prompt=RED, seed=2, num_inference_steps=4, step=1, level="unet.sideways",
                       api_name="/look_inside")
    assert "levels must be UNet levels of this decoder (unet.down.1, " in str(e.value)


def test_the_tabs_come_from_the_task_table(studio_server):
    import argparse

    from kandinsky.pipelines.tasks import PROMPT_TASKS
    from kandinsky.serve.studio import Studio

    _, studio, _ = studio_server
    assert studio.tasks() == [t for t in PROMPT_TASKS if not t.startswith("controlnet")]  # --demo: no ControlNet
    args = argparse.Namespace(**{**vars(studio.args), "demo": False, "controlnet": "some/controlnet"})
    assert Studio(args).tasks() == list(PROMPT_TASKS)


# ----------------------------------------------------------------------------- the command
def test_kandinsky_help_does_not_import_gradio():
    import subprocess
    import sys

    code = ("import sys; from kandinsky.cli import parser; parser().format_help(); "
            "print('gradio' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_kandinsky_serve_prints_its_address_and_serves():
    import signal
    import subprocess
    import sys
    import threading
    import urllib.request

    from kandinsky.serve.app import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "kandinsky.cli", "serve", "--demo", "--port", str(port)],
                              stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, server.kill)  # no address within 2 minutes: stop, and fail below
    watchdog.start()
    try:
        lines = []
        for line in server.stderr:  # the address line comes once the server listens
            lines.append(line)
            if "Kandinsky Studio on" in line:
                break
        watchdog.cancel()
        assert f"Kandinsky Studio on http://localhost:{port}/ (Ctrl-C to stop)\n" in lines, "".join(lines)
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60).read().decode()
        assert "<!doctype html>" in page.lower()
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0  # Ctrl-C: the server closes and the command ends
    finally:
        watchdog.cancel()
        server.kill()
        server.wait()
