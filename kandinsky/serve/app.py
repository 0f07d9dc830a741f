"""The studio's page and API (Gradio), built from the one declaration of the tasks.

    page, studio, url = start(args)         # a running server (kandinsky serve, the tests' fixture)
    serve(args)                             # start, print the address, serve until Ctrl-C

Each prompt-level task of kandinsky.pipelines.tasks.PROMPT_TASKS that the studio offers is a tab and an API
endpoint (``/text2img``, ``/img2img``, ``/inpaint``, ``/variations``, ``/mix``, ...) whose parameters are the
Python API's names (``parameters_of``) and which returns the first picture (a PNG with its ``parameters``
chunk) and the seed used. The page's Generate buttons call the same functions and add a gallery, the
parameters and the session's history. Inpainting's tab paints the mask with a brush on an image editor:
the painted layers' alpha becomes the same ``mask_image`` (kandinsky.serve.canvas).

Load: one queue (``--queue-size`` waiting requests at most, then "queue full"), one run at a time
(every endpoint shares one concurrency slot, and Studio's lock guards the models); requests never share a
generator. Nothing here reaches the network: analytics off, a theme of system fonts, no share links.
"""
from __future__ import annotations

import inspect
import os
import queue
import socket
import sys
import threading

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home

import gradio as gr  # noqa: E402
import PIL.Image  # noqa: E402

from kandinsky.pipelines.tasks import PROMPT_TASKS  # noqa: E402
from kandinsky.sampling.samplers import sampler_names  # noqa: E402
from kandinsky.serve import canvas  # noqa: E402
from kandinsky.serve.studio import (  # noqa: E402
    ALL_LEVELS, INPAINT_AREAS, MAX_IMAGES, MAX_SIDE, MIX_ITEMS, OUTPAINT_SIDES, PARAMETER_LABELS, Studio,
    parse_parameters)

# Local fonts only (the default theme would fetch web fonts from another host).
THEME = gr.themes.Soft(font=["system-ui", "Segoe UI", "Roboto", "sans-serif"],
                       font_mono=["ui-monospace", "Menlo", "Consolas", "monospace"])
API_NAMES = {"interpolate": "mix"}  # endpoint names that differ from the task's
ERRORS = (ValueError, TypeError, OSError, RuntimeError, FloatingPointError)  # shown as messages, never crashes
CONCURRENCY = "model"  # the one concurrency slot every run shares


def api_name(task: str) -> str:
    return API_NAMES.get(task, task)


REQUIRED = ("prompt", "image", "hint")  # parameters without a default (the rest default to the page's values)


def parameters_of(task: str) -> list[str]:
    """The endpoint's parameters, in order (REQUIRED ones first): the Python API's names for ``task``."""
    spec = PROMPT_TASKS[task]
    names = []
    if spec.embeddings in ("prompt", "emb2emb"):
        names += ["prompt", "negative_prompt"]
    if spec.embeddings in ("image", "emb2emb") and "image" not in spec.inputs:
        names.append("image")
    if spec.embeddings == "mix":
        for i in range(1, MIX_ITEMS + 1):
            names += [f"prompt_{i}", f"prompt_weight_{i}"]
        for i in range(1, MIX_ITEMS + 1):
            names += [f"image_{i}", f"image_weight_{i}"]
        names.append("negative_prompt")
    names += list(spec.inputs)
    if task == "inpaint":
        names += ["mask_blur", "inpaint_area", "padding", *(f"outpaint_{side}" for side in OUTPAINT_SIDES)]
    if spec.embeddings == "emb2emb":
        names.append("prior_strength")
    names += ["seed", "num_inference_steps", "guidance_scale", "scheduler", "width", "height",
              "num_images_per_prompt"]
    if spec.embeddings != "image":
        names += ["prior_guidance_scale", "prior_num_inference_steps"]
    return sorted(names, key=lambda n: n not in REQUIRED)


def control(name: str, studio: Studio, task: str, tab: str | None = None):
    """The page's control for parameter ``name`` of ``task`` (one table of labels and ranges), with the element
    id ``{name}-{tab}`` (default tab: the task's)."""
    component = _control(name, studio, task)
    component.elem_id = f"{name}-{tab or task}"
    return component


def _control(name: str, studio: Studio, task: str):
    if name.startswith("prompt_weight_") or name.startswith("image_weight_"):
        return gr.Number(label=f"weight {name.rsplit('_', 1)[1]}", value=0.5 if name.endswith(("_1", "_2")) else 0)
    if name.startswith("prompt_"):
        return gr.Textbox(label=f"prompt {name.rsplit('_', 1)[1]}", lines=1)
    if name.startswith("image_") or name in ("image", "mask_image", "hint"):
        labels = {"image": "picture", "mask_image": "mask (white = repaint)", "hint": "depth hint (bright = near)"}
        return gr.Image(label=labels.get(name, f"picture {name.rsplit('_', 1)[-1]}"), type="filepath",
                        image_mode=None, sources=["upload", "clipboard"], format="png")
    steps, size = studio.default_steps(task), studio.picture_size(task)[0]
    size = f"{size} px" if size else "the picture's"
    table = {
        "prompt": lambda: gr.Textbox(label="prompt", lines=2),
        "negative_prompt": lambda: gr.Textbox(label="negative prompt", lines=1),
        "seed": lambda: gr.Number(label="seed (-1 = random)", value=-1, precision=0),
        "num_inference_steps": lambda: gr.Slider(1, 200, value=steps, step=1, label="steps"),
        "guidance_scale": lambda: gr.Slider(0, 20, value=4.0, step=0.5, label="guidance (decoder; <= 1: off)"),
        "prior_guidance_scale": lambda: gr.Slider(0, 20, value=4.0, step=0.5, label="prior guidance"),
        "prior_num_inference_steps": lambda: gr.Slider(2, 100, value=25, step=1, label="prior steps"),
        "scheduler": lambda: gr.Dropdown(sampler_names(), value="ddpm", label="sampler"),
        "width": lambda: gr.Number(label=f"width (0 = {size})", value=0, precision=0, minimum=0, maximum=MAX_SIDE),
        "height": lambda: gr.Number(label=f"height (0 = {size})", value=0, precision=0, minimum=0, maximum=MAX_SIDE),
        "num_images_per_prompt": lambda: gr.Slider(1, MAX_IMAGES, value=1, step=1, label="images"),
        "strength": lambda: gr.Slider(0.05, 1.0, value=0.3, step=0.05, label="strength (share of steps run)"),
        "prior_strength": lambda: gr.Slider(0.05, 1.0, value=0.3, step=0.05, label="prior strength"),
        "mask_blur": lambda: gr.Slider(0, 64, value=4, step=1, label="mask blur / feather (pixels)"),
        "inpaint_area": lambda: gr.Radio(list(INPAINT_AREAS), value=INPAINT_AREAS[0], label="repaint"),
        "padding": lambda: gr.Slider(0, 256, value=32, step=1, label="padding around the mask (only masked area)"),
    }
    if name.startswith("outpaint_"):
        return gr.Slider(0, 512, value=0, step=8, label=f"extend {name.removeprefix('outpaint_')} (pixels)")
    return table[name]()


# picture parameters, as messages say; the optional ones may be left empty
UPLOADS = {"image": "picture", "hint": "depth hint", "mask_image": "mask",
           **{f"image_{i}": f"picture {i}" for i in range(1, MIX_ITEMS + 1)}}
OPTIONAL_UPLOADS = ("mask_image", *(f"image_{i}" for i in range(1, MIX_ITEMS + 1)))


class Runner:
    """The endpoints' one body: read uploads, run the task on the studio, return the PNGs and the seed."""

    def __init__(self, studio: Studio):
        self.studio = studio

    def __call__(self, task: str, values: dict, progress=None, editor=None, preview=None):
        """-> Result. ``values``: {parameter: value} as the endpoint received them; ``preview``: a function
        receiving x0 previews while the decoder runs."""
        studio = self.studio
        values = {key: _path(value) for key, value in values.items()}
        seed = values.pop("seed", -1)
        on_step = _on_step(progress, preview, lambda: studio.pipe(task).decoder.movq)
        try:
            if editor is not None:  # the page's inpaint tab: the picture and brush strokes of the editor
                values["image"], painted = _from_editor(editor, studio)
                if values["mask_image"] is None and painted is not None and painted.getbbox() is not None:
                    values["mask_image"] = painted  # an uploaded mask wins over strokes
            for key, what in UPLOADS.items():
                if key in values and not isinstance(values[key], PIL.Image.Image):  # the editor's are read already
                    given = values[key] or key not in OPTIONAL_UPLOADS
                    values[key] = studio.open(values[key], what) if given else None
            if task == "interpolate":
                return studio.mix(seed=seed, on_step=on_step, **values)
            if task == "inpaint":
                return studio.inpaint(seed=seed, on_step=on_step, **values)
            return studio.generate(task, seed=seed, on_step=on_step, **values)
        except ERRORS as e:
            raise gr.Error(str(e), print_exception=False) from None


def _path(value):
    """A raw upload (events run with preprocess=False: Gradio has checked the file is one of its uploads, and
    the studio decodes it itself, with its own limits and messages) as its path; other values unchanged."""
    if isinstance(value, dict) and "path" in value:
        return value["path"]
    return value


def _from_editor(editor, studio: Studio):
    """(picture, painted mask or None) from an ImageEditor value {background, layers, composite}."""
    if not editor or editor.get("background") is None:
        raise ValueError("no picture: upload one into the canvas first")
    picture = studio.open(_path(editor["background"]), "picture")
    layers = [studio.open(_path(layer), "brush layer") for layer in editor.get("layers") or () if layer]
    mask = canvas.mask_from_layers(layers, picture.size) if layers else None
    return picture.convert("RGB"), mask


PREVIEWS = 5  # x0 previews per decoder run on the page


def _on_step(progress, preview=None, movq=None):
    """A step callback: Gradio's progress bar (one per stage) and, given ``preview`` (a function taking a
    picture) and ``movq``, the decoder's x0 decoded about PREVIEWS times per run (the same decoding as
    kandinsky.sampling.trajectory's x0 grids)."""

    def on_step(state):
        total = state.num_steps or (state.step + 1)
        if progress is not None:
            progress((state.step + 1, total), desc=state.stage, unit="steps")
        every = max(1, total // PREVIEWS)
        if preview is not None and state.stage == "decoder" and state.x0 is not None and \
                (state.step + 1) % every == 0 and state.step + 1 < total:
            from kandinsky.sampling.trajectory import Trajectory, grid_image, x0_previews

            frame = Trajectory()
            frame(state)
            preview(grid_image(x0_previews(frame, movq()), pad=0))

    return on_step


def _endpoint(task: str, runner: Runner, page: bool, defaults: dict):
    """A function whose signature is ``parameters_of(task)`` with ``defaults`` (what the API shows):
    -> (the first picture, the seed used). ``page``: the page's variant, which also takes the image editor
    (inpaint) and the history and streams (x0 previews while it runs, then the gallery, the seed, the
    parameters and the history)."""
    names = parameters_of(task)

    def call(*args, progress=gr.Progress()):
        result = runner(task, dict(zip(names, args)), progress)
        return str(result.paths[0]), result.seed

    def page_call(*args, progress=gr.Progress()):
        *args, history = args
        editor = None
        if task == "inpaint":
            *args, editor = args
        frames = queue.Queue()
        done = {}

        def work():
            try:
                done["result"] = runner(task, dict(zip(names, args)), progress, editor, preview=frames.put)
            except BaseException as e:  # shown in the page, below
                done["error"] = e
            finally:
                frames.put(None)

        threading.Thread(target=work, daemon=True).start()
        while (frame := frames.get()) is not None:
            yield [frame], gr.update(), gr.update(), gr.update(), gr.update()
        if "error" in done:
            raise done["error"]
        result = done["result"]
        history = (history or []) + [str(p) for p in result.paths]
        yield ([str(p) for p in result.paths], result.seed, result.parameters, history,
               [(p, _caption(p)) for p in reversed(history)])

    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, **(
        {} if n in REQUIRED or page else {"default": defaults.get(n)})) for n in names]
    if page:
        params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                   for n in (["editor"] if task == "inpaint" else []) + ["history"]]
    params.append(inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=gr.Progress()))
    fn = page_call if page else call
    fn.__signature__ = inspect.Signature(params)
    fn.__name__ = api_name(task) + ("_page" if page else "")
    return fn


def parameters_of_png(path) -> str:
    """The ``parameters`` text chunk of a PNG the studio made ("" when it has none)."""
    with PIL.Image.open(path) as png:
        return png.text.get("parameters", "")


def _caption(path) -> str:
    params = parse_parameters(parameters_of_png(path))
    prompt = params.get("prompt") or params.get("prompt_1", "")  # (the mix: its first prompt)
    return f"{params.get('task', '')} · seed {params.get('seed', '')} · {prompt}"[:80]


def build(studio: Studio) -> gr.Blocks:
    """The page: a tab per task the studio offers, Look inside, History; and the API endpoints."""
    runner = Runner(studio)
    with gr.Blocks(title="Kandinsky Studio", analytics_enabled=False) as page:
        history = gr.State([])
        gr.Markdown(f"## Kandinsky Studio · {studio.model_name()}")
        tabs = {}
        with gr.Tabs() as tab_set:
            for task in studio.tasks():
                with gr.Tab(api_name(task), id=task):
                    tabs[task] = _task_tab(task, studio, runner, history)
            with gr.Tab("look inside", id="look"):
                _look_inside_tab(studio, history)
            with gr.Tab("history", id="history"):
                shelf = gr.Gallery(label="made in this session (click one to load its settings into its tab; "
                                         "uploaded pictures are not reloaded)", columns=6, elem_id="history",
                                   format="png")
                shown = gr.Textbox(label="parameters", lines=3, interactive=False)
        for task, controls in tabs.items():
            _wire(task, controls, runner, history, shelf)
        targets = [c for task in tabs for name, c in tabs[task]["inputs"].items()
                   if name in RELOADABLE]

        def load(history, event: gr.SelectData):
            path = list(reversed(history))[event.index]
            task, values = reload_values(path)
            updates = []
            for t in tabs:
                for name in tabs[t]["inputs"]:
                    if name in RELOADABLE:
                        value = values.get(name) if t == task else None
                        updates.append(gr.update(value=value) if value is not None else gr.update())
            return [parameters_of_png(path), gr.Tabs(selected=task if task in tabs else "history")] + updates

        shelf.select(load, [history], [shown, tab_set] + targets, api_visibility="private")
    page.queue(max_size=getattr(studio.args, "queue_size", 16), default_concurrency_limit=1)
    return page


# the controls a picture's parameters set again: every one they record (PARAMETER_LABELS; Size: width and height)
RELOADABLE = ("prompt", "negative_prompt", "width", "height",
              *(key for key in PARAMETER_LABELS if key not in ("task", "size", "model")))
TEXTS = ("prompt", "negative_prompt", "scheduler", "inpaint_area",
         *(f"prompt_{i}" for i in range(1, MIX_ITEMS + 1)))  # the RELOADABLE controls that hold text


def reload_values(path) -> tuple:
    """A picture's ``parameters`` chunk read back from the PNG (what a click in the history loads): (its task,
    {control: value} for the RELOADABLE controls it names)."""
    params = parse_parameters(parameters_of_png(path))
    values = {name: _reload_value(name, params) for name in RELOADABLE}
    return params.get("task"), {name: value for name, value in values.items() if value is not None}


def _reload_value(name: str, params: dict):
    """Control ``name``'s value in a parameters text read back (``parse_parameters``), or None."""
    if name == "width" or name == "height":
        size = params.get("size", "")
        if "x" in size:
            return int(size.split("x")[0 if name == "width" else 1])
        return None
    value = params.get(name)
    if value is None or name in TEXTS:
        return value
    try:
        return int(value)
    except ValueError:
        return float(value)


def _task_tab(task: str, studio: Studio, runner: Runner, history) -> dict:
    """The controls of one task's tab: {"inputs": {parameter: component}, the outputs, the editor}."""
    names = parameters_of(task)
    main = [n for n in names if n in ("prompt", "negative_prompt", "image", "hint", "strength", "prior_strength",
                                      "inpaint_area", "mask_blur", "seed") or n.startswith(("prompt_", "image_"))]
    inputs, out = {}, {}
    with gr.Row():
        with gr.Column(scale=1):
            if task == "inpaint":
                out["editor"] = gr.ImageEditor(
                    label="picture: upload, then paint what to repaint (any colour; eraser to undo)",
                    type="filepath", image_mode="RGBA", format="png", sources=["upload", "clipboard"],
                    brush=gr.Brush(default_size=12, colors=["#ffffff"], color_mode="defaults"),
                    eraser=gr.Eraser(default_size=12), layers=False, transforms=(), elem_id="inpaint-editor",
                    canvas_size=(512, 512))
                with gr.Accordion("or upload a mask (white = repaint; same size as the picture)", open=False):
                    inputs["mask_image"] = control("mask_image", studio, task)
                with gr.Row(visible=False):  # the API's picture (the page uses the editor)
                    inputs["image"] = control("image", studio, task)
            for name in main:
                if name not in inputs:
                    inputs[name] = control(name, studio, task)
            out["button"] = gr.Button("Generate", variant="primary", elem_id=f"generate-{task}")
            with gr.Accordion("settings", open=False):
                for name in names:
                    if name not in inputs:
                        inputs[name] = control(name, studio, task)
        with gr.Column(scale=1):
            out["gallery"] = gr.Gallery(label="result", columns=2, format="png", elem_id=f"result-{task}",
                                        height=420)
            with gr.Row():
                out["seed"] = gr.Number(label="seed used", precision=0, interactive=False,
                                        elem_id=f"seed-used-{task}", scale=3)
                reuse = gr.Button("reuse this seed", scale=1, size="sm")
            out["parameters"] = gr.Textbox(label="parameters (stored in the PNG)", lines=3, interactive=False,
                                           elem_id=f"parameters-{task}")
            with gr.Row(visible=False):
                out["image"] = gr.Image(type="filepath", format="png", label="image")
                out["api"] = gr.Button("api")
    reuse.click(lambda seed: seed, out["seed"], inputs["seed"], api_visibility="private", queue=False)
    out["inputs"] = {name: inputs[name] for name in names}
    return out


def _wire(task: str, c: dict, runner: Runner, history, shelf) -> None:
    inputs = list(c["inputs"].values())
    defaults = {name: component.value for name, component in c["inputs"].items()}
    page_inputs = inputs + ([c["editor"]] if task == "inpaint" else []) + [history]
    c["button"].click(_endpoint(task, runner, True, defaults), page_inputs,
                      [c["gallery"], c["seed"], c["parameters"], history, shelf],
                      api_visibility="private", concurrency_id=CONCURRENCY, concurrency_limit=1, preprocess=False)
    c["api"].click(_endpoint(task, runner, False, defaults), inputs, [c["image"], c["seed"]], api_name=api_name(task),
                   concurrency_id=CONCURRENCY, concurrency_limit=1, preprocess=False)


LOOK_INSIDE = ("prompt", "negative_prompt", "seed", "num_inference_steps", "step", "level")  # /look_inside's
LOOK_SETTINGS = ("scheduler", "guidance_scale", "prior_guidance_scale", "prior_num_inference_steps", "width", "height")


def _look_inside_tab(studio: Studio, history) -> None:
    """The x0 trajectory, the prior's attention over the prompt's words and the decoder's image-token
    attention at a chosen step for every UNet level or a chosen one: Studio.look_inside (kandinsky.research.viz's
    pictures), one text2img run (a new prompt, or the session's last text2img: all its settings, read back
    from its PNG); choosing another level or step draws the shown run again."""
    names = [*LOOK_INSIDE, *LOOK_SETTINGS]
    controls = {}
    with gr.Row():
        with gr.Column(scale=1):
            for name in LOOK_INSIDE[:4]:
                controls[name] = control(name, studio, "text2img", "look")
            controls["step"] = gr.Slider(0, 199, value=0, step=1, label="decoder step to show (0 = first)")
            # the levels are the decoder's: known once it is loaded (after the first run); any level is taken
            controls["level"] = gr.Dropdown([ALL_LEVELS], value=ALL_LEVELS, label="UNet level to show",
                                            allow_custom_value=True, elem_id="level-look")
            go = gr.Button("Generate and look inside", variant="primary", elem_id="generate-look")
            last = gr.Button("take the last text2img of this session", elem_id="last-look")
            with gr.Accordion("settings", open=False):
                for name in LOOK_SETTINGS:
                    controls[name] = control(name, studio, "text2img", "look")
        with gr.Column(scale=2):
            image = gr.Image(label="picture", type="pil", format="png", elem_id="image-look")
            used = gr.Number(label="seed used", precision=0, interactive=False, elem_id="seed-used-look")
            trajectory = gr.Image(label="x0 at every step (left to right)", type="pil", format="png")
            decoder = gr.Image(label="decoder: image-token attention per UNet level", type="pil", format="png",
                               elem_id="decoder-look")
            prior = gr.Image(label="prior: attention over the prompt's words per block", type="pil", format="png")
    outputs = [image, used, trajectory, decoder, prior]

    def look(*values, progress=gr.Progress()):
        try:
            pictures, seed = studio.look_inside(on_step=_on_step(progress), **dict(zip(names, values)))
        except ERRORS as e:
            raise gr.Error(str(e), print_exception=False) from None
        return pictures["image"], seed, pictures["trajectory"], pictures["decoder"], pictures["prior"]

    look.__signature__ = inspect.Signature(  # the API's names and defaults (the page's; a prompt is required)
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                           **({} if n == "prompt" else {"default": controls[n].value})) for n in names]
        + [inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=gr.Progress())])

    def again(*values, progress=gr.Progress()):
        """Another level or step: the shown run again (its seed used), drawn for them; nothing shown: nothing."""
        given = dict(zip(names, values))
        if given["seed"] is None or not given["prompt"]:
            return [gr.skip()] * len(outputs)
        return look(*values, progress=progress)

    reloaded = [name for name in names if name in RELOADABLE]

    def take_last(history):
        for path in reversed(history or ()):
            task, values = reload_values(path)
            if task == "text2img":
                return [values.get(name, gr.skip()) for name in reloaded]
        raise gr.Error("nothing made with text2img in this session yet", print_exception=False)

    inputs = [controls[name] for name in names]
    last.click(take_last, [history], [controls[name] for name in reloaded], api_visibility="private", queue=False)
    go.click(look, inputs, outputs, api_name="look_inside", concurrency_id=CONCURRENCY,
             concurrency_limit=1).success(lambda: gr.update(choices=[ALL_LEVELS] + studio.levels()), None,
                                          controls["level"], api_visibility="private", queue=False)
    gr.on([controls["level"].input, controls["step"].release], again,
          [used if name == "seed" else controls[name] for name in names], outputs, api_visibility="private",
          concurrency_id=CONCURRENCY, concurrency_limit=1, trigger_mode="always_last")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start(args, quiet: bool = True):
    """Build and launch the studio without blocking: (page, studio, url)."""
    studio = Studio(args, max_pixels=getattr(args, "max_pixels", canvas.MAX_PIXELS))
    page = build(studio)
    port = args.port or free_port(args.host)
    page.launch(server_name=args.host, server_port=port, prevent_thread_lock=True, quiet=quiet, share=False,
                ssr_mode=False, theme=THEME, show_error=True, max_file_size="64mb", footer_links=["api"],
                mcp_server=False, pwa=False)
    host = "localhost" if args.host in ("127.0.0.1", "0.0.0.0") else args.host
    return page, studio, f"http://{host}:{port}/"


def serve(args) -> int:
    """``kandinsky serve``: start, print the address, serve until Ctrl-C."""
    page, studio, url = start(args)
    print(f"Kandinsky Studio on {url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        page.block_thread()
    finally:
        page.close()
        studio.close()
    return 0
