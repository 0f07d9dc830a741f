"""The ``kandinsky`` command line: every subcommand, declared once in ``COMMANDS``.

    kandinsky text2img --demo "a red circle on a blue background" -o out.png
    kandinsky COMMAND --help

``COMMANDS`` (name -> Command) is the one table: the argparse subcommands, ``kandinsky --help`` and
the command list of docs/usage.md (``command_table()``) derive from it; the options table of docs/usage.md
(``options_table()``) derives from the parser. Each command's module adds its
arguments and runs it; what they share (loading pipelines, output checks) is kandinsky/cli/common.py, how
they end (errors and exit codes, Ctrl-C, warnings) kandinsky/exits.py. ``python -m kandinsky.cli`` is the
same command.
"""
from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass
from typing import Callable

from kandinsky import exits
from kandinsky.cli import batch, common, eval as evaluate, generate, lens, research, serve, train


@dataclass(frozen=True)
class Command:
    name: str
    help: str  # one line: `kandinsky --help` and the docs' list
    add_arguments: Callable  # (parser) -> None
    run: Callable  # (args) -> exit status
    description: str | None = None  # `kandinsky NAME --help`'s paragraph (default: help)
    epilog: str | None = None  # its examples


def _table() -> dict[str, Command]:
    from kandinsky.pipelines.tasks import PROMPT_TASKS

    tasks = [Command(name, add_arguments=functools.partial(generate.add_arguments, name=name), run=generate.run,
                     **generate.describe(name)) for name in PROMPT_TASKS]
    others = [
        Command("train", "train a prior, decoder or inpainting UNet (full or LoRA)", train.add_train_arguments,
                train.run_train, train.TRAIN_DESCRIPTION, train.TRAIN_EXAMPLES),
        Command("train-demo", "reproduce the shipped tiny demo model from scratch", train.add_train_demo_arguments,
                train.run_train_demo, train.TRAIN_DEMO_DESCRIPTION),
        Command("eval", "evaluate the tiny shapes model (accuracy per attribute)", evaluate.add_arguments,
                evaluate.run, evaluate.DESCRIPTION),
        Command("batch", "generate many prompts (resumable, torchrun-aware)", batch.add_arguments, batch.run,
                batch.DESCRIPTION),
        Command("inspect", "module tree, parameter counts and output shapes", research.add_inspect_arguments,
                research.run_inspect, research.INSPECT_DESCRIPTION, research.INSPECT_EXAMPLES),
        Command("attention", "attention maps as pictures", research.add_attention_arguments, research.run_attention,
                research.ATTENTION_DESCRIPTION, research.ATTENTION_EXAMPLES),
        Command("score", "CLIP similarity of images and prompts", research.add_score_arguments, research.run_score,
                research.SCORE_DESCRIPTION, research.SCORE_EXAMPLES),
        Command("mix", "embedding arithmetic and slerp, decoded", research.add_mix_arguments, research.run_mix,
                research.MIX_DESCRIPTION, research.MIX_EXAMPLES),
        Command("routes", "where a concept enters the decoder: route x level x step heat maps",
                research.add_routes_arguments, research.run_routes, research.ROUTES_DESCRIPTION,
                research.ROUTES_EXAMPLES),
        Command("lens", "pictures from each CLIP text layer: where the prompt's words become usable",
                lens.add_arguments, lens.run, lens.DESCRIPTION, lens.EXAMPLES),
        Command("serve", "Kandinsky Studio: every task in a browser, and an API", serve.add_arguments, serve.run,
                serve.DESCRIPTION, serve.EXAMPLES),
    ]
    return {c.name: c for c in tasks + others}


COMMANDS = _table()


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="kandinsky", description="Kandinsky 2.2 image generation and tools. `kandinsky COMMAND --help` for a "
                                      "command's options.")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        sub = commands.add_parser(command.name, help=command.help, description=command.description or command.help,
                                  epilog=command.epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(sub)
        common.add_deprecated_aliases(sub)  # the old spellings, for one release
    return top


def command_table() -> str:
    """The markdown table of every command (docs/usage.md carries it; a test keeps the two equal)."""
    rows = [f"| `kandinsky {c.name}` | {c.help} |" for c in COMMANDS.values()]
    return "\n".join(["| command | what it does |", "| --- | --- |", *rows])


def options_table() -> str:
    """The markdown table of every command's options, read from the parser (docs/usage.md carries it; a test
    keeps the two equal): one row per option and help text, with the commands that have it; then the old
    spellings (common.DEPRECATED_ALIASES) still accepted."""
    from kandinsky.pipelines.tasks import PROMPT_TASKS

    rows: dict[tuple[str, str], list[str]] = {}
    subparsers = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.help in (None, argparse.SUPPRESS) or action.dest == "help":
                continue
            named = action.nargs != 0 and (action.metavar is not None or action.choices is not None)
            metavar = " " + formatter._format_args(action, action.dest.upper()) if named else ""
            option = ", ".join(f"`{o}{metavar}`" for o in action.option_strings)
            rows.setdefault((option, formatter._expand_help(action)), []).append(name)

    def commands(names):
        tasks = [name for name in names if name in PROMPT_TASKS]
        every = ["every generation task"] if len(tasks) == len(PROMPT_TASKS) else tasks
        return ", ".join(every + [name for name in names if name not in PROMPT_TASKS])

    def cell(text):
        return " ".join(text.split()).replace("|", "\\|")

    lines = ["| option | commands | what it does |", "| --- | --- | --- |"]
    lines += [f"| {cell(option)} | {commands(names)} | {cell(help)} |" for (option, help), names in rows.items()]
    lines += [f"| `{old}` | wherever `{new}` is | deprecated (goes in the next release): use `{new}` |"
              for old, new in common.DEPRECATED_ALIASES.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    """``kandinsky ARGS``: the exit status (0 done, 1 the pictures were saved elsewhere, 2 an error, 130 Ctrl-C)."""
    with exits.plain_warnings():  # an old spelling's warning, while the arguments are read
        args = parser().parse_args(sys.argv[1:] if argv is None else [str(a) for a in argv])
    return common.run(f"kandinsky {args.command}", COMMANDS[args.command].run, args)
