"""What every ``kandinsky`` command shares, written once.

* how a command ends (``error: ...`` and status 2, Ctrl-C and status 130 with what was kept, ``warning:``
  lines): kandinsky/exits.py, shared with ``python -m weights_convert``; a command says what a Ctrl-C
  keeps with ``on_interrupt``.
* ``check_outputs(paths, overwrite)`` / ``check_folder``: every output can be written, and none is replaced
  without ``--overwrite``, checked before any work; ``save``: pictures saved, or rescued to a temporary
  folder, never lost.
* the one vocabulary: ``DEPRECATED_ALIASES`` (old spelling -> new, one release), ``add_size_arguments`` /
  ``width_height`` (--width / --height or --size WxH).
* ``add_pipeline_arguments`` / ``checkpoints`` / ``pipeline``: --demo / --random-demo / --prior /
  --decoder / --device / --dtype / --offload / --lora, and the pipeline they name (temporary demo
  folders removed on exit, whatever happens).
* argparse types: ``at_least(n)``, ``seed``, ``fraction``, ``unit``, ``size``; ``add_overwrite``; ``add_lora_argument``.
* ``run``: a command as exits.run runs it, with its threads (``keep_threads``): a command on a small model
  runs on one intra-op thread (kandinsky.threads' rule, measured on the models it loaded), its direct
  model calls too; the caller's setting comes back when it ends.
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import os
import sys
from pathlib import Path

from kandinsky import exits
from kandinsky.checks import with_article
from kandinsky.exits import on_interrupt  # noqa: F401 (what a Ctrl-C keeps)

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class InputError(ValueError):
    """A bad command-line input (missing image file, output that exists, unknown output format)."""


# ----------------------------------------------------------------------------- running a command
_COMMAND: contextvars.ContextVar[contextlib.ExitStack | None] = contextvars.ContextVar("command", default=None)


def run(prog: str, function, *args, kept=exits.NOTHING) -> int:
    """``exits.run``: ``function(*args)`` as the command ``prog`` (its exit status; errors, Ctrl-C and warnings
    by kandinsky/exits.py); the threads set with ``keep_threads`` while it runs are the caller's again after."""
    with contextlib.ExitStack() as stack:
        token = _COMMAND.set(stack)
        try:
            return exits.run(prog, function, *args, kept=kept)
        finally:
            _COMMAND.reset(token)


def keep_threads(threads) -> None:
    """Run the rest of the command (``run``) on ``threads``, a loaded pipeline's ``.threads(...)``
    (kandinsky.threads' one rule, measured on its models: one intra-op thread for a small model on the CPU):
    the model calls a command makes itself (eval's MoVQ round trip, score's CLIP towers, attention's and mix's
    encodings) run as the pipeline's calls do. Outside a command (the library, the studio's own server),
    nothing: each pipeline call keeps its own rule."""
    stack = _COMMAND.get()
    if stack is not None:
        stack.enter_context(threads)


# ----------------------------------------------------------------------------- argparse types
def _parsed(text: str, kind, inside, problem: str):
    """``text`` as ``kind`` (int or float) for which ``inside(value)`` holds, else an argparse error:
    "'x' is not an integer" (or "a number"), or "VALUE ``problem``"."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not inside(value):
        raise argparse.ArgumentTypeError(f"{value} {problem}")
    return value


def at_least(minimum: int):
    """An argparse type: an integer >= minimum (checked before anything is loaded)."""

    def parse(text: str) -> int:
        return _parsed(text, int, lambda v: v >= minimum, f"is too small (at least {minimum})")

    return parse


def seed(text: str) -> int:
    """An integer torch.Generator.manual_seed takes: -2**63 .. 2**64 - 1."""
    return _parsed(text, int, lambda v: -(2**63) <= v < 2**64,
                   "is out of range (a seed is a 64-bit integer: 0 .. 2**64 - 1)")


def fraction(text: str) -> float:
    """A number in (0, 1] (--strength, --prior-strength)."""
    return _parsed(text, float, lambda v: 0 < v <= 1, "is not in (0, 1]")


def unit(text: str) -> float:
    """A number in [0, 1] (--guidance-interval: a fraction of the run)."""
    return _parsed(text, float, lambda v: 0 <= v <= 1, "is not in [0, 1] (a fraction of the run)")


def integers(option: str, what: str):
    """An argparse type: comma-separated integers (``what`` names them in the message), e.g. --seeds 0,1,2."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(s) for s in text.split(",") if s.strip()]
        except ValueError:
            values = []
        if not values:
            raise argparse.ArgumentTypeError(f"{option} takes comma-separated {what} like 0,1,2, got {text!r}")
        return values

    return parse


def size(text: str) -> tuple[int, int]:
    """--size: ``WIDTHxHEIGHT`` in pixels (one number: a square) -> (width, height) (the library's reader,
    kandinsky.research.inspect.read_size)."""
    from kandinsky.research.inspect import read_size

    try:
        return read_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_size_arguments(parser, default: str) -> None:
    """--width, --height, and --size WxH (both in one flag); ``default``: what the help says they default to.
    ``width_height(args)`` reads them."""
    parser.add_argument("--width", type=at_least(1), default=None,
                        help=f"picture width in pixels (default {default})")
    parser.add_argument("--height", type=at_least(1), default=None, help="picture height in pixels (as --width)")
    parser.add_argument("--size", type=size, default=None, metavar="WxH",
                        help="--width and --height in one flag, e.g. 512x768 (one number: a square)")


def width_height(args) -> tuple[int | None, int | None]:
    """(width, height) from --size or --width / --height (not both); None where none was given."""
    if args.size is not None:
        if args.width is not None or args.height is not None:
            raise InputError("give --size WxH or --width / --height, not both")
        return args.size
    return args.width, args.height


# ----------------------------------------------------------------------------- the one vocabulary
# An old spelling -> the name every command uses now (diffusers' argument names where one exists; --scheduler,
# as our Python API says, for the sampler). An old spelling still works for one release: hidden from --help,
# it warns and sets the new option. kandinsky.cli.parser() adds each to every command that has the new name.
DEPRECATED_ALIASES = {
    "--negative": "--negative-prompt",
    "--guidance": "--guidance-scale",
    "--prior-guidance": "--prior-guidance-scale",
    "--sampler": "--scheduler",
    "--quiet": "--no-progress",
}


def add_deprecated_aliases(parser) -> None:
    """Every old spelling of DEPRECATED_ALIASES whose new option ``parser`` has (and whose old one it lacks)."""
    for old, new in DEPRECATED_ALIASES.items():
        if new in parser._option_string_actions and old not in parser._option_string_actions:
            add_deprecated_alias(parser, old, new)


def add_deprecated_alias(parser, old: str, new: str) -> None:
    """``old``, a spelling kept for one release, hidden from --help: it does what ``new`` (an option of
    ``parser``) does, and warns ``old is deprecated ...: use new``."""
    target = parser._option_string_actions[new]

    class Deprecated(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("always")  # every time it is typed, not once per process
                warnings.warn(f"{old} is deprecated (it goes in the next release): use {new}", FutureWarning,
                              stacklevel=2)
            target(parser, namespace, values, new)

    parser.add_argument(old, dest=target.dest, action=Deprecated, nargs=target.nargs, type=target.type,
                        choices=target.choices, metavar=target.metavar, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)


# ----------------------------------------------------------------------------- outputs
OVERWRITE_HELP = ("replace output files that exist (without it an existing file is never overwritten: the command "
                  "stops before any work)")


def add_overwrite(parser) -> None:
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def check_outputs(paths, overwrite: bool, image: bool = False, flag: str = "-o") -> None:
    """Every output can be written (checked before any weights are loaded); an existing file is refused
    unless ``overwrite``; ``image``: the suffix must name an image format PIL writes; ``flag``: the option
    that names the outputs, for the messages."""
    for path in map(Path, paths):
        if image:
            from PIL import Image

            if path.suffix.lower() not in Image.registered_extensions():
                raise InputError(f"cannot tell the image format of the output {str(path)!r}: name it e.g. out.png")
        if path.is_dir():
            raise InputError(f"the output {str(path)!r} is a folder; name a file, e.g. {path / 'out.png'}")
        if path.exists() and not overwrite:
            raise InputError(f"{str(path)!r} exists; pass --overwrite to replace it, or choose another {flag}")
        check_folder(path.parent, f"cannot write {str(path)!r}")


def check_folder(folder, what: str) -> None:
    """``folder`` is a folder this process can write in, or one it can make (``what`` starts the message,
    e.g. "--out runs/a")."""
    ancestor = Path(folder)
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{what}: {str(ancestor)!r} is a file, not a folder; name a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"{what}: no permission to write in {str(ancestor)!r}")


def save(images, paths) -> tuple[list[Path], str | None]:
    """Save each picture to its path (making the folders); if that fails, into a fresh temporary folder
    instead: -> (where they are, None or the line saying why they are elsewhere). No run is lost."""
    import tempfile

    paths = [Path(path) for path in paths]
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
        for image, path in zip(images, paths):
            image.save(path)
        return paths, None
    except (OSError, ValueError) as e:
        rescue = Path(tempfile.mkdtemp(prefix="kandinsky-rescued-"))
        saved = [rescue / path.name for path in paths]
        for image, path in zip(images, saved):
            image.save(path)
        return saved, f"could not write {paths[0]} ({e}); the images were saved to {rescue} instead"


def open_image(path: str, flag: str = "--image"):
    """The picture as stored (any mode: the pipelines convert it as the Python API does), turned upright by
    its EXIF orientation as image viewers show it. ``flag``: the option that named it, for the messages."""
    from PIL import Image, ImageOps

    if Path(path).is_dir():
        raise InputError(f"{flag}: {path!r} is a folder, not an image file; {flag} takes one picture file (PNG, "
                         f"JPEG, WebP, ...), e.g. {Path(path) / 'picture.png'}")
    if not Path(path).is_file():
        raise InputError(f"no such image file: {path!r}")
    try:
        image = Image.open(path)
        image.load()
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read image {path!r}: {e}") from None


def is_image_path(item: str) -> bool:
    """An IMAGE_OR_PROMPT argument that names an image file (by its suffix, or because it exists)."""
    from kandinsky.research.embeddings import is_image_path

    return is_image_path(item) or Path(item).is_file()


# ----------------------------------------------------------------------------- checkpoints and pipelines
LORA_HELP = ("LoRA file (or folder) to apply, optionally with its strength: --lora style.safetensors:0.8 "
             "(default 1.0); repeat for several")


def add_lora_argument(parser) -> None:
    """The ``--lora FILE[:SCALE]`` option (repeatable; ``args.lora`` is a list of the arguments as
    given) on an argparse parser. Bad forms and missing files are usage errors, before anything loads."""
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", type=_lora, help=LORA_HELP)


def _lora(arg: str) -> str:
    from kandinsky.lora import LoRAError, check_lora_file
    from kandinsky.lora.args import parse_lora_arg

    try:
        path, _ = parse_lora_arg(arg)  # (the form, and the strength's range: kandinsky.lora.check_scale)
    except LoRAError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--lora ")) from None
    if not Path(path).exists():
        raise argparse.ArgumentTypeError(f"{path}: no such file or folder")
    if Path(path).is_file():
        try:
            check_lora_file(path)  # by its first bytes: nothing is unpickled to find out
        except LoRAError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return arg


DEMO_HELP = ("the tiny model trained on procedural shapes that ships with the package (offline; prompts like "
             "'a large red circle on the left on a blue background', 64 x 64)")
RANDOM_DEMO_HELP = "tiny RANDOM-weight checkpoints built on the fly (offline; the picture is noise)"


def add_pipeline_arguments(parser, *, decoder: bool = True, device: str | None = None, demo_help: str = DEMO_HELP,
                           dtype: bool = False, offload: bool = False, lora: bool = False) -> None:
    """--prior, --decoder, --demo / --random-demo, --device; and where the command takes them --dtype,
    --offload, --lora. ``device``: the default --device (None: cuda if available, else cpu)."""
    parser.add_argument("--prior", help="prior folder or hub id (default: kandinsky-community/kandinsky-2-2-prior)")
    if decoder:
        parser.add_argument("--decoder",
                            help="decoder folder or hub id (default: the kandinsky-community repo for the task)")
    demo = parser.add_mutually_exclusive_group()
    demo.add_argument("--demo", action="store_true", help=demo_help)
    demo.add_argument("--random-demo", action="store_true", help=RANDOM_DEMO_HELP)
    if dtype:
        parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                            help="weights and compute precision (default fp32; fp16 is for GPUs, slow on a CPU)")
    parser.add_argument("--device", default=device,
                        help=f"cpu, cuda, cuda:1, ... (default: {device or 'cuda if available'})")
    if offload:
        parser.add_argument("--offload", choices=("model", "sequential"), default=None,
                            help="low memory: keep the weights on the CPU and move each component (model) or each "
                                 "layer (sequential) to --device only while it runs")
    if lora:
        add_lora_argument(parser)


def device(name: str | None, default: str | None = None):
    """--device as a torch.device (None: ``default``, else cuda if available); one this machine lacks is an
    input error (the library's check, kandinsky.pipelines.stepping.check_device)."""
    import torch

    from kandinsky.pipelines.stepping import check_device

    if name is None:
        name = default or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return check_device(name)
    except ValueError as e:
        raise InputError(f"--device: {e}") from None


def default_size_and_steps(args, task: str = "text2img") -> tuple[int, int]:
    """(picture side in px, decoder steps) when none are given, for the CLI and the studio alike: the shipped
    shapes model (--demo) draws at its own 64 px, random demo weights (--random-demo, and --demo's ControlNet
    fallback) at 256 px, both in 20 steps; real weights at 512 px in the checkpoint's 100 steps."""
    if not (args.demo or getattr(args, "random_demo", False)):
        return 512, 100
    return (64 if shapes_model(args, task) else 256), 20


def shapes_model(args, task: str = "text2img") -> bool:
    """Whether ``task`` runs on the shipped shapes model (--demo; it has no ControlNet: random weights there)."""
    from kandinsky.pipelines.tasks import checkpoint_for

    return bool(args.demo) and checkpoint_for(task) != "controlnet"


def picture_size(args, task: str, width, height, picture: bool) -> tuple:
    """(width, height) to generate at, for the CLI and the studio alike: the given ones (None: not given);
    for a task starting from a picture (``picture``), None (the picture's own size), except on the shapes
    model, which draws at its own 64 px: with neither given the picture is resized to it; else
    default_size_and_steps's side."""
    if picture and not (shapes_model(args, task) and width is None and height is None):
        return width, height
    size = default_size_and_steps(args, task)[0]
    return (size if width is None else width), (size if height is None else height)


@contextlib.contextmanager
def checkpoints(args, task: str = "text2img", weights_seed: int | None = None):
    """{"prior", "decoder" (for ``task``), "inpaint", "random"}: --prior / --decoder, else the --demo /
    --random-demo checkpoints (a one-line message on stderr), else the hub repos. A --random-demo's
    temporary folder is removed when the block ends. ``weights_seed``: the random weights' seed
    (default --seed). The shapes model has no ControlNet: its controlnet tasks use random weights."""
    from kandinsky.pipelines.tasks import CHECKPOINTS, PRIOR_CHECKPOINT, checkpoint_for

    needed = checkpoint_for(task)
    prior, decoder = args.prior, getattr(args, "decoder", None)
    if not (args.demo or getattr(args, "random_demo", False)):
        yield {"prior": prior or PRIOR_CHECKPOINT, "decoder": decoder or CHECKPOINTS[needed], "inpaint": None,
               "random": False}
        return
    from kandinsky.demo import demo_checkpoints

    random = getattr(args, "random_demo", False) or needed == "controlnet"
    seed = getattr(args, "seed", 0) if weights_seed is None else weights_seed
    folders, tmp, message = demo_checkpoints(random=random, seed=seed)
    fallback = " (the shapes model has no ControlNet: random weights)" if args.demo and random else ""
    print(message + fallback, file=sys.stderr)
    try:
        yield {"prior": prior or folders["prior"], "decoder": decoder or folders[needed],
               "inpaint": folders["inpaint"], "random": random}
    finally:
        if tmp is not None:
            tmp.cleanup()


@contextlib.contextmanager
def pipeline(args, task: str = "text2img", weights_seed: int | None = None, device_default: str | None = None,
             size: tuple[int, int, int] | None = None, priors: dict | None = None):
    """-> (the Kandinsky pipeline the arguments name, the ``checkpoints`` it came from): on --device in
    --dtype, with --lora applied and --offload set up; every optional flag the command lacks takes its
    default. The decoder must be able to run ``task``. ``size``: (pictures, height, width) to refuse
    before loading when they cannot fit in memory (kandinsky.pipelines.limits, from the configs).
    ``priors``: {prior folder: PriorPipeline} shared by the pipelines of one process (the studio's decoder
    kinds): a prior found there is used as it is, one loaded here is added; not with --lora (its adapters
    may be on the prior: each pipeline loads its own)."""
    import torch

    from kandinsky.lora.args import apply_lora_args
    from kandinsky.pipelines.combined import Kandinsky
    from kandinsky.pipelines.limits import check_folder
    from kandinsky.pipelines.tasks import CHECKPOINTS, checkpoint_for

    where = device(args.device, device_default)
    offload = getattr(args, "offload", None)
    if offload is not None:
        from kandinsky.offload import offload_helps

        offload = offload if offload_helps(offload, where, option=f"--offload {offload}") else None
    dtype = getattr(torch, DTYPES[getattr(args, "dtype", "fp32")])
    with checkpoints(args, task, weights_seed) as folders:
        if size is not None:  # a runaway size: refused before the weights load
            check_folder(folders["decoder"], where, dtype, *size, tile=getattr(args, "tile", None))
        priors = {} if priors is None or getattr(args, "lora", ()) else priors
        shared = priors.get(str(folders["prior"]))  # (None: load it)
        pipe = Kandinsky.from_pretrained(
            folders["decoder"], prior=shared or folders["prior"], dtype=dtype,
            device=None if offload else where, scheduler=getattr(args, "scheduler", None),
            revision=getattr(args, "revision", None), prior_revision=getattr(args, "prior_revision", None),
            local_files_only=getattr(args, "offline", False))
        needed = checkpoint_for(task)
        if pipe.decoder.kind != needed:
            raise ValueError(f"--decoder {folders['decoder']} is {with_article(pipe.decoder.kind)} checkpoint, which "
                             f"cannot run {task} (it runs {', '.join(pipe.decoder.tasks)}); pass --decoder "
                             f"{CHECKPOINTS[needed]} or a local copy of it, or leave --decoder out.")
        apply_lora_args(pipe, getattr(args, "lora", ()))  # adapters first: offload hooks the layers as they then are
        if offload:
            from kandinsky.offload import enable_offload

            enable_offload(pipe.decoder if shared else pipe, mode=offload, device=where)  # (a shared prior is)
        priors.setdefault(str(folders["prior"]), pipe.prior)
        keep_threads(pipe.threads(task, *(size[1:] if size else ())))  # the command's own model calls too
        yield pipe, folders
