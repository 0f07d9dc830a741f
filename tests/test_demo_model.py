"""The tiny demo model: `kandinsky train-demo` (a few steps) and the shipped weights, measured with the
shapes analyser (kandinsky.data.evaluate)."""
import json
import math
from pathlib import Path

import pytest
import torch

from kandinsky.cli import main as kandinsky_main
from kandinsky.data import evaluate, shapes, train_demo
from kandinsky.demo import DEMO_WEIGHTS, demo_folders

MAX_SHIPPED_BYTES = 20 * 1024 * 1024
SHIPPED = (DEMO_WEIGHTS / "prior" / "model_index.json").is_file()


def weight_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.safetensors"))


@pytest.fixture(scope="session")
def trained_few_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("train-demo")
    with torch.random.fork_rng():
        status = kandinsky_main(["train-demo", "--out", out, "--steps", "2", "--data-size", "32"])
    assert status == 0
    return out


def test_tokenizer_has_one_token_per_grammar_word(tmp_path):
    from kandinsky.clip.tokenizer import Tokenizer

    vocab_size = train_demo.write_tokenizer(tmp_path)
    tokenizer = Tokenizer.from_folder(tmp_path)
    assert tokenizer.vocab_size == vocab_size and tokenizer.max_length == train_demo.CONTEXT
    text = "a large purple triangle at the bottom on a yellow background"
    ids, mask = tokenizer([text])
    assert int(mask.sum()) == len(text.split()) + 2  # one token per word, plus start and end
    assert int(ids[0, 0]) == vocab_size - 2 and int(ids[0, len(text.split()) + 1]) == vocab_size - 1
    # words outside the grammar still tokenize (byte pieces), into more tokens
    assert int(tokenizer(["a red cat"])[1].sum()) > 5


def test_train_demo_writes_loadable_hub_folders(trained_few_steps):
    from kandinsky.pipelines.decoder import DecoderPipeline
    from kandinsky.pipelines.prior import PriorPipeline

    out = trained_few_steps
    for repo, parts in {"prior": ("prior", "text_encoder", "image_encoder", "tokenizer", "scheduler",
                                  "image_processor"),
                        "decoder": ("unet", "movq", "scheduler"),
                        "decoder-inpaint": ("unet", "movq", "scheduler")}.items():
        assert (out / repo / "model_index.json").is_file()
        assert all((out / repo / part).is_dir() for part in parts), repo
    # inpainting UNet: noisy latents, masked picture latents, keep mask (9 for the real 4 latent channels)
    L = json.loads((out / "decoder" / "movq" / "config.json").read_text())["latent_channels"]
    assert L == train_demo.LATENT_CHANNELS
    assert json.loads((out / "decoder" / "unet" / "config.json").read_text())["in_channels"] == L
    assert json.loads((out / "decoder-inpaint" / "unet" / "config.json").read_text())["in_channels"] == 2 * L + 1
    # fp16, and small enough to ship
    from safetensors import safe_open

    files = weight_files(out)
    assert sum(f.stat().st_size for f in files) <= MAX_SHIPPED_BYTES
    with safe_open(str(files[0]), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    prior = PriorPipeline.from_pretrained(out / "prior")
    decoder = DecoderPipeline.from_pretrained(out / "decoder")
    g = torch.Generator().manual_seed(0)
    embeds, negatives = prior("a red circle", num_inference_steps=2, generator=g, progress=False)
    image = decoder.text2img(embeds, negatives, height=64, width=64, num_inference_steps=2, generator=g,
                             progress=False).images[0]
    assert image.size == (64, 64)


def test_train_demo_resumes_from_its_checkpoints(trained_few_steps, tmp_path):
    # --write-only trains nothing and writes the same weights from OUT/stages/
    import shutil

    shutil.copytree(trained_few_steps / "stages", tmp_path / "stages")
    assert kandinsky_main(["train-demo", "--out", tmp_path, "--write-only"]) == 0
    for a, b in zip(weight_files(trained_few_steps), weight_files(tmp_path)):
        assert a.relative_to(trained_few_steps) == b.relative_to(tmp_path)
        assert a.read_bytes() == b.read_bytes()


def test_train_demo_writes_no_repos_while_a_stage_is_unfinished(trained_few_steps, tmp_path, capsys):
    # a --jobs 2 child finishing first must not write the hub folders from its sibling's half-trained stage
    import shutil

    shutil.copytree(trained_few_steps / "stages", tmp_path / "stages")
    path = tmp_path / "stages" / "inpaint.pt"
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "done": False}, path)
    assert kandinsky_main(["train-demo", "--out", tmp_path, "--write-only"]) == 0
    assert "not writing the repos: stages ['inpaint']" in capsys.readouterr().out
    assert not (tmp_path / "decoder-inpaint").exists()


def test_train_demo_two_jobs_trains_every_stage_and_writes_the_repos(tmp_path):
    # --jobs 2: the phases in child processes (clip | movq, then prior + movq_decoder | decoder + inpaint)
    defaults = train_demo.MOVQ_FACTOR, train_demo.LATENT_CHANNELS, train_demo.HEAD_WEIGHTS["shape"]
    assert kandinsky_main(["train-demo", "--out", tmp_path, "--steps", "1", "--data-size", "16", "--jobs", "2",
                           "--movq-factor", "4", "--shape-weight", "2", "--latent-channels", "4"]) == 0
    for stage in train_demo.STAGES:
        assert torch.load(tmp_path / "stages" / f"{stage}.pt", weights_only=True)["done"], stage
    assert all((tmp_path / repo / "model_index.json").is_file() for repo in ("prior", "decoder", "decoder-inpaint"))
    # --movq-factor 4 reached the children: 16 x 16 latents, a 3-level MoVQ
    assert json.loads((tmp_path / "decoder" / "unet" / "config.json").read_text())["sample_size"] == 16
    assert len(json.loads((tmp_path / "decoder" / "movq" / "config.json").read_text())["block_out_channels"]) == 3
    # --latent-channels 4 too: the real MoVQ's 4, the 9-channel inpainting UNet
    assert json.loads((tmp_path / "decoder-inpaint" / "unet" / "config.json").read_text())["in_channels"] == 9
    # the command set them in this process
    train_demo.MOVQ_FACTOR, train_demo.LATENT_CHANNELS, train_demo.HEAD_WEIGHTS["shape"] = defaults
    assert 2 ** (len(train_demo.CONFIGS["movq"]["block_out_channels"]) - 1) == train_demo.MOVQ_FACTOR


def test_train_demo_steps_through_the_shared_schedule_and_ema(monkeypatch):
    """A stage's loop: the learning rate of kandinsky.training.optim.lr_at at the stage's fraction done
    (a 3% warm-up, a cosine, a floor of 2% of the stage's rate), and the EMA with the ramped decay
    min(0.999, (1 + n) / (10 + n)): what the stage ends holding, and what it saves."""
    from kandinsky.training import optim

    lrs, raw, saved = [], [], []
    monkeypatch.setattr(train_demo, "set_lr", lambda opt, lr: lrs.append(optim.set_lr(opt, lr)))

    def step(*args, **kwargs):
        norm = optim.optimizer_step(*args, **kwargs)
        raw.append(model.weight.detach().clone())  # the weights after each step
        return norm

    monkeypatch.setattr(train_demo, "optimizer_step", step)
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    base = train_demo.STAGES["prior"][2]
    clock = train_demo.Clock(steps=4, seconds=0)
    train_demo.train("prior", list(model.parameters()), lambda s: ((model.weight * (s + 1)).sum(), {"x": 0.0}),
                     clock, lambda message: None, lambda: saved.append(model.weight.detach().clone()), ema=True)
    cosine = [base * 0.5 * (1 + math.cos(math.pi * f)) for f in (0.25, 0.5, 0.75)]
    assert lrs == pytest.approx([0.02 * base] + [max(lr, 0.02 * base) for lr in cosine])  # step 0: in the warm-up
    ema = torch.ones(1, 1)
    for n, w in enumerate(raw):
        decay = min(0.999, (1 + n) / (10 + n))  # 0.1, 0.18, 0.25, 0.31
        ema = decay * ema + (1 - decay) * w
    assert len(raw) == 4 and torch.allclose(model.weight, ema) and torch.allclose(saved[-1], ema)
    assert not torch.allclose(raw[-1], ema)


def test_checkpoint_sets_are_laid_out_as_the_hub(random_demo, reference_configs):
    """kandinsky.demo.write_checkpoint_set (the random demo set, and train-demo's repos): model_index.json,
    the scheduler configs and the image processor are the hub checkpoints' (tests/data), but for the
    image size and diffusers' version stamp."""
    def read(path):
        return {k: v for k, v in json.loads(path.read_text()).items() if k != "_diffusers_version"}

    for name, folder in random_demo.items():
        hub = reference_configs / f"kandinsky-2-2-{folder.name}"  # keyed by kind, named as the hub
        assert read(folder / "model_index.json") == read(hub / "model_index.json"), name
        assert read(folder / "scheduler" / "scheduler_config.json") == read(hub / "scheduler" / "scheduler_config.json")
    processor = read(random_demo["prior"] / "image_processor" / "preprocessor_config.json")
    hub = read(reference_configs / "kandinsky-2-2-prior" / "image_processor" / "preprocessor_config.json")
    assert processor == {**hub, "crop_size": 32, "size": 32}  # the tiny image tower's input
    vocab = json.loads((random_demo["prior"] / "tokenizer" / "vocab.json").read_text())
    assert len(vocab) == 514 and vocab["<|endoftext|>"] == 513  # bytes, bytes</w>, the specials last


def test_demo_folders_says_how_to_rebuild(monkeypatch, tmp_path):
    import kandinsky.demo

    monkeypatch.setattr(kandinsky.demo, "DEMO_WEIGHTS", tmp_path)
    with pytest.raises(FileNotFoundError, match="train-demo"):
        kandinsky.demo.demo_folders()


@pytest.mark.skipif(not SHIPPED, reason="no shipped demo weights (kandinsky/demo_weights)")
def test_shipped_weights_are_small_fp16():
    files = weight_files(DEMO_WEIGHTS)
    assert files and sum(f.stat().st_size for f in files) <= MAX_SHIPPED_BYTES
    folders = demo_folders()
    assert set(folders) == {"prior", "decoder", "inpaint"}


@pytest.mark.skipif(not SHIPPED, reason="no shipped demo weights (kandinsky/demo_weights)")
def test_shipped_weights_draw_what_the_prompt_says():
    from kandinsky.pipelines.decoder import DecoderPipeline
    from kandinsky.pipelines.prior import PriorPipeline

    folders = demo_folders()
    prior = PriorPipeline.from_pretrained(folders["prior"])
    decoder = DecoderPipeline.from_pretrained(folders["decoder"])
    report = evaluate.text2img_report(prior, decoder, n=16, seed=0, steps=20)
    accuracy = report["accuracy"]
    # thresholds a little below what `kandinsky eval shapes --demo --n 16 --seed 0` measured
    for name, threshold in THRESHOLDS.items():
        if name in accuracy:
            assert accuracy[name] >= threshold, (name, accuracy, report["prompts"])
    retrieval = evaluate.retrieval_report(prior, n=32, seed=0)
    assert retrieval["text_to_image"] >= RETRIEVAL_THRESHOLD
    # the MoVQ alone keeps every attribute of real pictures (the ceiling of the decoder's pictures)
    roundtrip = evaluate.movq_report(decoder, n=16, seed=0)
    assert min(roundtrip["accuracy"].values()) >= 0.9, roundtrip["accuracy"]
    inpaint = evaluate.inpaint_report(prior, DecoderPipeline.from_pretrained(folders["inpaint"]), n=16, seed=0)
    assert inpaint["colour"] >= INPAINT_THRESHOLD and inpaint["kept"] >= 0.9, inpaint


# measured (n=16, seed 0, 20 DDPM steps): colour 1.0, background 1.0 (8 stated), size 1.0 (8),
# position 1.0 (6), shape 0.875; CLIP text -> image retrieval 1.0 (n=32); MoVQ round trip 1.0 on every
# attribute; inpainting: prompted colour 0.94, pixels kept 0.99. The bars are issue 11's targets (the
# n=16 sample is too small for closer ones: one picture is 6%)
THRESHOLDS = {"colour": 0.9, "background": 0.85, "size": 0.85, "position": 0.8, "shape": 0.75}
RETRIEVAL_THRESHOLD = 0.9
INPAINT_THRESHOLD = 0.85
