"""Session-wide fixtures. Tiny random reference checkpoints are built once per test
session by the fixture modules in tests/refs/ (one per component)."""
import pathlib

import pytest
import torch

pytest_plugins = [
    "tests.refs.clip",
    "tests.refs.prior",
    "tests.refs.unet",
    "tests.refs.movq",
    "tests.refs.prior_pipeline",
    "tests.refs.decoder_pipeline",
]

DATA = pathlib.Path(__file__).parent / "data"

# One thread per test process: `pytest -n 2` on 2 cores is then 2 threads in all (oversubscribed
# threads make tiny models many times slower on a loaded machine).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def reference_configs() -> pathlib.Path:
    """Folder holding the real hub configs of the four Kandinsky 2.2 repos."""
    return DATA


@pytest.fixture(scope="session")
def random_demo(tmp_path_factory) -> dict[str, pathlib.Path]:
    """The tiny random demo folders, ``kandinsky.demo.build_demo_checkpoints(root, seed=0)``, built once:
    kind ("prior", "decoder", "inpaint", "controlnet") -> folder. Read them; write nowhere
    inside them (copy a folder first)."""
    from kandinsky.demo import build_demo_checkpoints

    return build_demo_checkpoints(tmp_path_factory.mktemp("demo"), seed=0)


@pytest.fixture
def demo_as_hub(random_demo, tmp_path, monkeypatch) -> dict[str, pathlib.Path]:
    """Work in ``tmp_path``, where the random demo folders stand under their hub names
    (``./kandinsky-2-2-prior``, ``./kandinsky-2-2-decoder``, ...): a docs example whose
    ``kandinsky-community/NAME`` becomes ``./NAME`` runs there as written. -> ``random_demo``."""
    for folder in random_demo.values():
        (tmp_path / f"kandinsky-2-2-{folder.name}").symlink_to(folder, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return random_demo


@pytest.fixture
def cli_demo(random_demo, monkeypatch) -> dict[str, pathlib.Path]:
    """``--random-demo`` (seed 0) runs on the session's ``random_demo`` instead of building new folders
    (kandinsky.demo.build_demo_checkpoints patched). -> ``random_demo``."""
    import kandinsky.demo

    build = kandinsky.demo.build_demo_checkpoints
    monkeypatch.setattr(kandinsky.demo, "build_demo_checkpoints",
                        lambda root, seed=0: random_demo if seed == 0 else build(root, seed=seed))
    return random_demo


@pytest.fixture(scope="session")
def random_demo_kandinsky(random_demo):
    """A ``Kandinsky`` pipeline (prior + decoder) of the tiny random demo folders, loaded once. Run it;
    do not change it (no adapters, no scheduler swaps left behind)."""
    from kandinsky.pipelines.combined import Kandinsky

    return Kandinsky.from_pretrained(random_demo["decoder"], prior=random_demo["prior"])


@pytest.fixture(scope="session")
def tiny_models() -> dict:
    """One tiny randomly initialised model of each component (our classes, built from the tests/refs
    configs with torch.manual_seed(0)): "text", "vision", "prior", "unet", "controlnet", "movq".
    Shared: deepcopy one before changing it (dtype, device, adapters)."""
    from tests.refs.clip import TINY_TEXT_CONFIG, TINY_VISION_CONFIG
    from tests.refs.movq import MOVQ_TINY_CONFIG
    from tests.refs.prior import PRIOR_TINY_CONFIG
    from tests.refs.unet import tiny_unet_config
    from weights_convert import build_model

    torch.manual_seed(0)
    unet = {"_class_name": "UNet2DConditionModel"}
    return {
        "text": build_model(TINY_TEXT_CONFIG),
        "vision": build_model(TINY_VISION_CONFIG),
        "prior": build_model({"_class_name": "PriorTransformer", **PRIOR_TINY_CONFIG}),
        "unet": build_model({**unet, **tiny_unet_config("decoder", layers_per_block=1)}),
        "controlnet": build_model({**unet, **tiny_unet_config("controlnet", layers_per_block=1)}),
        "movq": build_model({"_class_name": "VQModel", **MOVQ_TINY_CONFIG}),
    }


@pytest.fixture(scope="session")
def perturbed_unet():
    """The tiny decoder UNet (kandinsky.demo.TINY) with every weight moved off its init, so norms are
    non-trivial and zero-init layers act (capture and route-patching tests; never modified by them)."""
    from kandinsky.demo import TINY
    from weights_convert import build_model

    torch.manual_seed(0)
    model = build_model(TINY["unet"]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def studio_server():
    """Kandinsky Studio (`kandinsky serve --demo`, the shipped shapes model) on a free localhost port, for
    the session: (url, Studio, the Gradio Blocks); closed after. Skips where Gradio is not installed (the [serve] extra)."""
    pytest.importorskip("gradio", reason="kandinsky serve needs Gradio: pip install -e '.[serve]'")
    import argparse

    from kandinsky.cli import serve as command
    from kandinsky.serve.app import free_port, start

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    page, studio, url = start(parser.parse_args(["--demo", "--port", str(free_port()), "--max-pixels", "65536"]))
    yield url, studio, page
    page.close()
    studio.close()


@pytest.fixture
def cli_demo_seeds(random_demo, tmp_path_factory, monkeypatch) -> list[int]:
    """As ``cli_demo``, and the seeds ``--random-demo`` asked for, in order (an empty list: nothing was
    built, e.g. a command refused before any work). Seeds other than 0 are built (and kept for the
    session)."""
    import kandinsky.demo

    build, built, calls = kandinsky.demo.build_demo_checkpoints, _CLI_DEMO_SEEDS, []
    built[0] = random_demo

    def cached(root, seed=0):
        calls.append(seed)
        if seed not in built:
            built[seed] = build(tmp_path_factory.mktemp(f"demo-{seed}"), seed=seed)
        return built[seed]

    monkeypatch.setattr(kandinsky.demo, "build_demo_checkpoints", cached)
    return calls


_CLI_DEMO_SEEDS: dict = {}


@pytest.fixture(scope="session")
def cli_pictures(tmp_path_factory) -> pathlib.Path:
    """A folder with image.png (RGB noise), mask.png (white block = repaint), hint.png (grey depth ramp),
    64 x 64: the inputs of the generation commands."""
    import numpy as np
    import PIL.Image

    folder = tmp_path_factory.mktemp("cli-pictures")
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "image.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:40, 8:48] = 255
    PIL.Image.fromarray(mask, mode="L").save(folder / "mask.png")
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
    PIL.Image.fromarray(ramp, mode="L").save(folder / "hint.png")
    return folder
