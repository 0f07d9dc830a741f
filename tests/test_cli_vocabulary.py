"""One vocabulary across the commands (kandinsky/cli/common.py, issue 18 item 9): one name per concept on
every command (diffusers' argument names), the old spellings of ``common.DEPRECATED_ALIASES`` still
accepted for one release with one ``warning:`` line, ``--size WxH`` wherever ``--width`` / ``--height`` are,
``--overwrite`` on every command that writes, a help string on every option, the options table of
docs/usage.md generated from the parser, one key per checkpoint kind, and captions the shapes grammar reads
with "a" or "an". Every check is derived from the parser or the tables, so a new command is covered."""
from __future__ import annotations

import argparse
import pathlib

import numpy as np
import PIL.Image
import pytest

import kandinsky.cli as cli
from kandinsky.cli import common, main

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--prior-steps", "2", "--no-progress", "--device", "cpu"]


def subparsers() -> dict[str, argparse.ArgumentParser]:
    top = cli.parser()
    return next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices


def options(parser) -> dict[str, argparse.Action]:
    return parser._option_string_actions


# --------------------------------------------------------------------------- one name per concept
def test_every_option_of_every_command_has_help():
    for name, parser in subparsers().items():
        for action in parser._actions:
            hidden = action.help == argparse.SUPPRESS
            assert action.help and (not hidden or set(action.option_strings) <= set(common.DEPRECATED_ALIASES)), \
                (name, action.option_strings or action.dest)


def test_old_spellings_are_hidden_aliases_only():
    """No command offers an old spelling as its own option: where one parses, it is the hidden alias of
    the new name (same destination), and every command with the new name accepts the old one."""
    for name, parser in subparsers().items():
        for old, new in common.DEPRECATED_ALIASES.items():
            if old in options(parser):
                assert options(parser)[old].help == argparse.SUPPRESS, (name, old)
                assert new in options(parser) and options(parser)[old].dest == options(parser)[new].dest
            if new in options(parser):
                assert old in options(parser), (name, old)


VALUES = {"--scheduler": ["ddim"], "--no-progress": []}  # else one number


def minimal_argv(name, parser) -> list[str]:
    """The command's required arguments, each with a value its parser takes."""
    argv = [name]
    for a in parser._actions:
        if a.required:
            count = a.nargs if isinstance(a.nargs, int) else 1
            argv += a.option_strings[:1] + [str(next(iter(a.choices)) if a.choices else "1")] * count
    return argv


@pytest.mark.parametrize("old, new", list(common.DEPRECATED_ALIASES.items()))
def test_an_old_spelling_parses_as_the_new_one_and_warns(old, new):
    commands = [name for name, parser in subparsers().items() if new in options(parser)]
    assert commands, new
    for name in commands:
        base, value = minimal_argv(name, subparsers()[name]), VALUES.get(new, ["3"])
        with pytest.warns(FutureWarning, match=f"{old} is deprecated .*: use {new}"):
            via_old = cli.parser().parse_args(base + [old, *value])
        via_new = cli.parser().parse_args(base + [new, *value])
        assert via_old == via_new and via_new != cli.parser().parse_args(base), name


def test_an_old_spelling_prints_one_warning_line(capsys):
    """Through `kandinsky`: one plain `warning:` line naming the new spelling, then the command runs."""
    assert main(["eval", "shapes", "--sampler", "ddim", "--guidance", "3"]) == 2  # no checkpoints: stops
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == ["warning: --sampler is deprecated (it goes in the next release): use --scheduler",
                       "warning: --guidance is deprecated (it goes in the next release): use --guidance-scale"]
    assert err[2].startswith("error: give --prior and --decoder")


# --------------------------------------------------------------------------- --size WxH
def test_size_is_wherever_width_and_height_are():
    for name, parser in subparsers().items():
        if "--width" in options(parser) or "--size" in options(parser):
            assert {"--width", "--height", "--size"} <= set(options(parser)), name
            assert options(parser)["--size"].type is common.size, name


@pytest.mark.parametrize("text, size", [("512x768", (512, 768)), ("64", (64, 64)), ("128X64", (128, 64))])
def test_size_parser(text, size):
    assert common.size(text) == size


@pytest.mark.parametrize("text", ["64x", "x64", "0x64", "64x64x64", "big", "-64"])
def test_bad_sizes_refused_by_the_parser(text, capsys):
    with pytest.raises(SystemExit) as e:
        main(["text2img", "--random-demo", "a", "--size", text])
    assert e.value.code == 2 and "is not a size: give WIDTHxHEIGHT" in capsys.readouterr().err


def test_size_and_width_height_give_the_same_picture(cli_demo, tmp_path, capsys):
    """--size 128x64 is --width 128 --height 64 (the same pixels); both together are refused."""
    def run(name, *flags):
        out = tmp_path / f"{name}.png"
        assert main(["text2img", "--random-demo", "a red cat", "-o", out, *FAST, *flags]) == 0
        return np.asarray(PIL.Image.open(out))

    by_size = run("size", "--size", "128x64")
    assert by_size.shape == (64, 128, 3)
    assert np.array_equal(by_size, run("wh", "--width", "128", "--height", "64"))
    assert main(["text2img", "--random-demo", "a", "--size", "64", "--width", "64", *FAST]) == 2
    assert "give --size WxH or --width / --height, not both" in capsys.readouterr().err


# --------------------------------------------------------------------------- writers, --demo, the table
WRITES = ("-o", "--output", "--out", "--save", "--json", "--save-steps")


def test_every_command_that_writes_has_overwrite():
    """Every command with an output option takes --overwrite."""
    for name, parser in subparsers().items():
        if set(WRITES) & set(options(parser)):
            assert "--overwrite" in options(parser), name


def test_inspect_demo_reads_the_shipped_model(capsys):
    """inspect --demo: the shipped shapes model's UNet, its parameter count that of the weights on disk."""
    from kandinsky.demo import demo_folders
    from weights_convert import load_component

    unet = load_component(demo_folders()["decoder"] / "unet")
    assert main(["inspect", "unet", "--demo", "--size", "64", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{sum(p.numel() for p in unet.parameters()):,}" in out and "demo_weights" in out
    assert main(["inspect", "unet-controlnet", "--demo"]) == 2
    assert "the shapes model has no controlnet checkpoint" in capsys.readouterr().err


def test_docs_carry_the_options_table():
    doc = (ROOT / "docs" / "usage.md").read_text()
    listed = doc.split("<!-- kandinsky.cli.options_table() -->\n", 1)[1].split("\n\n", 1)[0]
    assert listed == cli.options_table(), (
        "docs/usage.md's options table is stale: replace it with the output of "
        "python -c 'import kandinsky.cli as c; print(c.options_table())'")


def test_docs_use_the_new_spellings():
    """README and docs name no old spelling as a flag, but where they say it is deprecated."""
    import re

    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        paragraphs = [p for p in path.read_text().split("\n\n") if "deprecated" not in p]  # those may
        for old in common.DEPRECATED_ALIASES:
            assert not re.search(re.escape(old) + r"(?![\w-])", "\n\n".join(paragraphs)), (path.name, old)


# --------------------------------------------------------------------------- keys and captions
def test_one_key_per_checkpoint_kind(random_demo):
    """The demo folders are keyed by checkpoint kind, as kandinsky.pipelines.tasks.CHECKPOINTS; the hub
    folder names, the old keys, still work with a warning."""
    from kandinsky.demo import demo_folders
    from kandinsky.pipelines.tasks import CHECKPOINTS

    assert set(random_demo) == {"prior", *CHECKPOINTS}
    assert set(demo_folders()) == {"prior", "decoder", "inpaint"}
    assert random_demo["inpaint"].name == "decoder-inpaint"  # the hub folder keeps its name
    with pytest.warns(FutureWarning, match="'decoder-inpaint' is deprecated .*use 'inpaint'"):
        assert random_demo["decoder-inpaint"] == random_demo["inpaint"]
    with pytest.warns(FutureWarning, match="use 'controlnet'"):
        assert random_demo["controlnet-depth"] == random_demo["controlnet"]
    with pytest.raises(KeyError):
        random_demo["unet"]


def test_captions_read_with_a_or_an():
    """The grammar reads 'an orange ...' as 'a orange ...'; the captions keep the 'a' the shipped model
    was trained on (measured: 'an' lowers its inpainting colour accuracy, docs/usage.md)."""
    from kandinsky.data import shapes

    text = "a large orange triangle at the top on a orange background"
    assert shapes.parse_caption(text.replace("a orange", "an orange")) == shapes.parse_caption(text) == {
        "shape": "triangle", "colour": "orange", "background": "orange", "size": "large", "position": "top"}
    scene = shapes.random_scene(np.random.default_rng(0), colour="orange", shape="circle", background="red")
    assert shapes.caption(scene, ()) == "a orange circle"
