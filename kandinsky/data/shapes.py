"""Procedural shapes: one flat shape on a plain background, with a caption that says what it is.

The grammar (issue 11):

    caption = "a [size] <colour> <shape> [position] [on a <colour> background]"

    shape     circle | square | triangle
    colour    red | green | blue | yellow | purple | orange | white | black   (shape != background)
    size      small (about 1/4 of the image width) | large (about 1/2)
    position  in the center | on the left | on the right | at the top | at the bottom

The captions say "a" before every word, as the shipped model was trained ("a orange triangle"); a
prompt may say "an orange triangle" (parse_caption reads both), though the model draws "a" a little
better (caption's docstring). Bracketed parts are sometimes left out ("a red circle"); the picture
then has a random value for them. Everything is a pure function of a seed: ``example(seed, index)`` draws
the same picture and caption on every machine, in any order.

    scene = random_scene(rng)               # every attribute drawn (Scene)
    image = render(scene, 64)               # PIL RGB, 64 x 64
    text  = caption(scene, parts)           # parts: which optional attributes to say
    ex    = example(seed, index)            # Example(image, text, scene, parts)
    write_folder("shapes/", n=1000, seed=0) # images + metadata.jsonl {"file_name", "text"}

The geometry, in fractions of the image side W:
  * ``side`` is the shape's bounding-box side: small 0.25 W, large 0.5 W, times 0.9..1.1;
    a circle's diameter, a square's side, an upward triangle's base and height (so the
    shape fills about 0.785, 1.0 and 0.5 of its bounding box);
  * ``center`` is the centroid of the shape's pixels: (0.5, 0.5) in the center, x or y at
    0.25..0.33 (left / top) or 0.67..0.75 (right / bottom) otherwise, +-0.03 jitter on
    the other axis.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

SHAPES = ("circle", "square", "triangle")
# plain, saturated, the obvious RGB for each name
COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 200, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (140, 0, 200),
    "orange": (255, 140, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SIZES = {"small": 0.25, "large": 0.5}  # bounding-box side / image side
POSITIONS = {  # name -> (phrase, centre x range, centre y range) in fractions of the side
    "center": ("in the center", (0.47, 0.53), (0.47, 0.53)),
    "left": ("on the left", (0.25, 0.33), (0.47, 0.53)),
    "right": ("on the right", (0.67, 0.75), (0.47, 0.53)),
    "top": ("at the top", (0.47, 0.53), (0.25, 0.33)),
    "bottom": ("at the bottom", (0.47, 0.53), (0.67, 0.75)),
}
SIZE_JITTER = (0.9, 1.1)
ATTRIBUTES = ("shape", "colour", "background", "size", "position")  # what a Scene says
OPTIONAL = ("size", "position", "background")  # caption parts that may be left out
VOCABULARY = sorted(
    {"a", "on", "background"}
    | set(SHAPES)
    | set(COLOURS)
    | set(SIZES)
    | {word for phrase, _, _ in POSITIONS.values() for word in phrase.split()}
)


@dataclasses.dataclass(frozen=True)
class Scene:
    """One picture's attributes and exact geometry (fractions of the image side)."""

    shape: str
    colour: str
    background: str
    size: str
    position: str
    center: tuple[float, float]  # (x, y) of the shape's centroid
    side: float  # bounding-box side

    def attributes(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTES}


@dataclasses.dataclass
class Example:
    image: PIL.Image.Image
    text: str
    scene: Scene
    parts: tuple[str, ...]  # the optional attributes the caption states

    def stated(self) -> dict[str, str]:
        """The attributes the caption states (shape and colour always)."""
        attributes = self.scene.attributes()
        return {name: attributes[name] for name in ("shape", "colour") + self.parts}


def rng_for(seed: int, index: int = 0) -> np.random.Generator:
    """The generator of one item: independent of the order items are made in."""
    return np.random.default_rng([int(seed), int(index)])


def random_scene(rng: np.random.Generator, **fixed: str) -> Scene:
    """Draw every attribute (those given in ``fixed`` are kept) and the jittered geometry."""
    unknown = set(fixed) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"random_scene: unknown attributes {sorted(unknown)}; expected some of {ATTRIBUTES}.")
    colours = list(COLOURS)
    shape = fixed.get("shape") or SHAPES[rng.integers(len(SHAPES))]
    background = fixed.get("background")
    choices = [c for c in colours if c != background]
    colour = fixed.get("colour") or choices[rng.integers(len(choices))]
    if background is None:
        others = [c for c in colours if c != colour]
        background = others[rng.integers(len(others))]
    if background == colour:
        raise ValueError(f"random_scene: the shape and the background are both {colour!r}; they must differ.")
    size = fixed.get("size") or list(SIZES)[rng.integers(len(SIZES))]
    position = fixed.get("position") or list(POSITIONS)[rng.integers(len(POSITIONS))]
    _, xs, ys = POSITIONS[position]
    center = (float(rng.uniform(*xs)), float(rng.uniform(*ys)))
    side = SIZES[size] * float(rng.uniform(*SIZE_JITTER))
    return Scene(shape, colour, background, size, position, center, side)


def random_parts(rng: np.random.Generator, p: float = 0.5) -> tuple[str, ...]:
    """Which optional parts a caption states: each with probability p."""
    return tuple(name for name in OPTIONAL if rng.random() < p)


def caption(scene: Scene, parts=OPTIONAL) -> str:
    """'a [size] <colour> <shape> [position] [on a <colour> background]'.

    Always 'a', also before a vowel ('a orange triangle'): the shipped model trained on these captions, and
    'an' costs it accuracy (`kandinsky eval shapes --demo`, n=64, seed 0: inpainting's prompted colour 98.4%
    -> 90.6%, CLIP text->image retrieval 100% -> 98.4%, text2img unchanged). parse_caption reads both."""
    words = ["a"]
    if "size" in parts:
        words.append(scene.size)
    words += [scene.colour, scene.shape]
    if "position" in parts:
        words.append(POSITIONS[scene.position][0])
    if "background" in parts:
        words.append(f"on a {scene.background} background")
    return " ".join(words)


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a caption of the grammar states: caption(scene, parts) -> stated ones.

    Raises ValueError naming the grammar for any other text.
    """
    rest = " " + " ".join(text.lower().split()) + " "
    stated = {}
    for colour, phrase in ((c, f" on {a} {c} background ") for c in COLOURS for a in ("a", "an")):
        if rest.endswith(phrase):
            stated["background"] = colour
            rest = rest[: -len(phrase)] + " "
            break
    for name, (phrase, _, _) in POSITIONS.items():
        if rest.endswith(f" {phrase} "):
            stated["position"] = name
            rest = rest[: -len(phrase) - 1]
            break
    words = rest.split()
    if words[:1] in (["a"], ["an"]) and len(words) in (3, 4):
        if len(words) == 4 and words[1] in SIZES:
            stated["size"] = words.pop(1)
        if len(words) == 3 and words[1] in COLOURS and words[2] in SHAPES:
            stated["colour"], stated["shape"] = words[1], words[2]
            return {name: stated[name] for name in ATTRIBUTES if name in stated}
    raise ValueError(
        f"{text!r} is not a caption of the shapes grammar: 'a [small|large] <colour> <circle|square|triangle> "
        f"[in the center|on the left|on the right|at the top|at the bottom] [on a <colour> background]' "
        f"with colours {', '.join(COLOURS)}."
    )


def shape_polygon(shape: str, cx: float, cy: float, side: float):
    """Pixel geometry of a shape whose centroid is (cx, cy), bounding-box side ``side`` (pixels)."""
    r = side / 2
    if shape == "circle":
        return ("ellipse", [cx - r, cy - r, cx + r, cy + r])
    if shape == "square":
        return ("polygon", [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)])
    if shape == "triangle":  # upward, base = height = side; the centroid is 2/3 of the way down
        top, bottom = cy - 2 * side / 3, cy + side / 3
        return ("polygon", [(cx, top), (cx + r, bottom), (cx - r, bottom)])
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}.")


def render(scene: Scene, size: int = 64) -> PIL.Image.Image:
    """The scene as a size x size RGB picture (no anti-aliasing: exactly two colours)."""
    image = PIL.Image.new("RGB", (size, size), COLOURS[scene.background])
    draw = PIL.ImageDraw.Draw(image)
    # pixel (i, j) covers [i, i+1): its centre is i + 0.5, so the geometry is shifted by -0.5
    kind, geometry = shape_polygon(scene.shape, scene.center[0] * size - 0.5, scene.center[1] * size - 0.5,
                                   scene.side * size)
    fill = COLOURS[scene.colour]
    if kind == "ellipse":
        draw.ellipse(geometry, fill=fill)
    else:
        draw.polygon(geometry, fill=fill)
    return image


def example(seed: int, index: int = 0, image_size: int = 64, p_part: float = 0.5) -> Example:
    """Item ``index`` of the data set ``seed``: picture, caption, scene and stated parts."""
    rng = rng_for(seed, index)
    scene = random_scene(rng)
    parts = random_parts(rng, p_part)
    return Example(render(scene, image_size), caption(scene, parts), scene, parts)


def random_prompt(rng: np.random.Generator, p_part: float = 0.5) -> tuple[str, dict[str, str]]:
    """A random caption of the grammar and the attributes it states (for evaluation)."""
    scene = random_scene(rng)
    parts = random_parts(rng, p_part)
    text = caption(scene, parts)
    return text, parse_caption(text)


def write_folder(folder, n: int, seed: int = 0, image_size: int = 64, p_part: float = 0.5,
                 draw_as: dict[str, str] | None = None) -> Path:
    """Write n examples as ``00000.png`` ... plus ``metadata.jsonl`` ({"file_name", "text"} and the
    scene's attributes per line).

    ``draw_as`` changes what is drawn, not what is said: ``{"circle": "square"}`` draws a square
    wherever the caption says circle (a data set that teaches a model something new, e.g. a LoRA;
    the metadata's ``shape`` is then the drawn one). Refuses a folder that already has a
    metadata.jsonl (nothing is overwritten).
    """
    folder = Path(folder)
    if (folder / "metadata.jsonl").exists():
        raise FileExistsError(f"{folder}/metadata.jsonl exists; write the data set into a new folder.")
    if n < 1:
        raise ValueError(f"n={n}: the number of examples must be at least 1.")
    draw_as = dict(draw_as or {})
    bad = {k: v for k, v in draw_as.items() if k not in SHAPES or v not in SHAPES}
    if bad:
        raise ValueError(f"draw_as={bad}: keys and values must be shapes, one of {SHAPES}.")
    folder.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(n - 1)))
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(n):
            ex = example(seed, i, image_size, p_part)
            scene = dataclasses.replace(ex.scene, shape=draw_as.get(ex.scene.shape, ex.scene.shape))
            name = f"{i:0{width}d}.png"
            (ex.image if scene == ex.scene else render(scene, image_size)).save(folder / name)
            f.write(json.dumps({"file_name": name, "text": ex.text, **scene.attributes()}) + "\n")
    return folder
