"""``kandinsky serve``: the studio in a browser (kandinsky/serve/, Gradio: ``pip install -e ".[serve]"``).

    kandinsky serve --demo                                  # the shipped shapes model, http://127.0.0.1:7860
    kandinsky serve --prior P --decoder D --inpaint I --device cuda --dtype fp16

The model flags are every generation command's (kandinsky.cli.common); Gradio is imported only when the
command runs, so ``kandinsky --help`` never needs it.
"""
from __future__ import annotations

from kandinsky.cli import common

DESCRIPTION = ("Start Kandinsky Studio, a browser app for every task (inpainting with a mask brush, "
               "outpainting, variations, mix, looking inside the model) with an API for gradio_client, and print "
               "its address. Models load on first use and are shared by all requests; one run at a time.")
EXAMPLES = """examples:
  kandinsky serve --demo                       (offline, the tiny shapes model, in seconds)
  kandinsky serve --device cuda --dtype fp16   (the kandinsky-community checkpoints)
  kandinsky serve --demo --host 0.0.0.0 --port 8000   (reachable from other machines: only if you mean it)"""


def add_arguments(parser) -> None:
    common.add_pipeline_arguments(parser, dtype=True, offload=True, lora=True)
    parser.add_argument("--inpaint", default=None,
                        help="decoder-inpaint folder or hub id (default: kandinsky-community/"
                             "kandinsky-2-2-decoder-inpaint; --demo: the shipped one)")
    parser.add_argument("--controlnet", default=None,
                        help="controlnet-depth folder or hub id: adds the ControlNet tab (--random-demo has one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every network)")
    parser.add_argument("--port", type=common.at_least(1), default=7860, help="port (default 7860)")
    parser.add_argument("--max-pixels", type=common.at_least(1), default=4096 * 4096,
                        help="largest upload in pixels, checked before decoding (default 4096 x 4096)")
    parser.add_argument("--queue-size", type=common.at_least(1), default=16,
                        help="requests waiting at most; more are refused with a 'queue full' message (default 16)")


def run(args) -> int:
    try:
        from kandinsky.serve.app import serve
    except ImportError as e:
        raise common.InputError(f"kandinsky serve needs Gradio ({e}): pip install -e \".[serve]\"") from None
    return serve(args)
