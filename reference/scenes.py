"""Procedural scenes with exact ground truth: the data of the reference model and of the quality benchmark.

A scene is 1-4 small flat-coloured objects (a colour from `COLOURS`, a shape from `SHAPES`, each
(colour, shape) pair at most once) on a plain or lightly textured light background. Objects are small
(a diameter of about 1.5-2.5 patches of 14 px at 168 px) and never touch, so every answer lives in a few
visual tokens and dropping the wrong tokens costs accuracy. Everything is a pure function of the seed.

Questions have one exact answer (`TASKS`); captions name every object as "a red circle, a blue square"
and are scored by precision / recall over the (colour, shape) pairs they name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 50),
    "blue": (35, 75, 225),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 185),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURAL: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
TASKS: tuple[str, ...] = ("colour_of_shape", "shape_of_colour", "count_total", "count_colour", "count_shape",
                          "presence", "position")
CAPTION_TASK = "caption"
CAPTION_QUESTION = "describe the image ."
COUNT_QUESTION = "how many objects are there ?"
MAX_OBJECTS = 4
# Object size as a fraction of the image side (radius of the circumscribing circle).
RADIUS_RANGE = (0.06, 0.105)
GAP_FRACTION = 0.03          # minimum empty space between two objects, so objects never touch
NOISE_AMPLITUDE = 8          # textured backgrounds: +-8 grey levels, far from every palette colour


# Words of the question templates in `ask` (tests check every generated text stays inside `vocabulary()`).
TEMPLATE_WORDS: tuple[str, ...] = ("what", "colour", "is", "the", "shape", "object", "how", "many", "objects", "are",
                                   "there", "a", "where", "yes", "no", "describe", "image", "?", ",", ".")


def vocabulary() -> list[str]:
    """Every word a question, answer or caption can contain, in a fixed order."""
    words = list(TEMPLATE_WORDS) + list(COLOURS) + list(SHAPES) + list(PLURAL.values()) + list(NUMBERS)
    words += [w for q in QUADRANTS for w in q.split()]
    return list(dict.fromkeys(words))


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    cx: float
    cy: float
    radius: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def bbox(self) -> tuple[float, float, float, float]:
        return (self.cx - self.radius, self.cy - self.radius, self.cx + self.radius, self.cy + self.radius)

    def quadrant(self, size: int) -> str | None:
        """The quadrant holding the whole object, or None when it straddles a midline (then it is never asked)."""
        x0, y0, x1, y1 = self.bbox()
        half = size / 2
        horizontal = "left" if x1 < half else "right" if x0 > half else None
        vertical = "top" if y1 < half else "bottom" if y0 > half else None
        if horizontal is None or vertical is None:
            return None
        return f"{vertical} {horizontal}"


@dataclass(frozen=True)
class Scene:
    seed: int
    size: int
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]
    textured: bool

    def render(self) -> Image.Image:
        return render_scene(self)[0]


@dataclass(frozen=True)
class Question:
    task: str
    text: str
    answer: str
    # Indices into `scene.objects` of the objects the answer is read from (captions: in caption order);
    # empty when nothing matches (an absent pair, a zero count). Training supervises attention with it.
    evidence: tuple[int, ...] = ()


def generate_scene(seed: int, size: int = 168, attempt: int = 0) -> Scene:
    """The scene of `seed` (and `attempt`, used to draw another scene for the same seed when a task needs it)."""
    rng = np.random.default_rng([seed, attempt])
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    chosen = rng.choice(len(pairs), size=count, replace=False)
    objects: list[SceneObject] = []
    for index in chosen:
        colour, shape = pairs[int(index)]
        objects.append(_place(colour, shape, objects, size, rng))
    grey = int(rng.integers(200, 236))
    tint = rng.integers(-8, 9, size=3)
    background = tuple(int(v) for v in np.clip(grey + tint, 0, 255))
    return Scene(seed=seed, size=size, objects=tuple(objects), background=background,  # type: ignore[arg-type]
                 textured=bool(rng.random() < 0.5))


def _place(colour: str, shape: str, placed: list[SceneObject], size: int,
           rng: np.random.Generator) -> SceneObject:
    """Rejection-sample a position where the object lies inside the image and keeps a gap to the others."""
    gap = GAP_FRACTION * size
    while True:
        radius = float(rng.uniform(*RADIUS_RANGE)) * size
        cx, cy = (float(v) for v in rng.uniform(radius + 1, size - radius - 1, size=2))
        if all(np.hypot(cx - o.cx, cy - o.cy) >= radius + o.radius + gap for o in placed):
            return SceneObject(colour, shape, cx, cy, radius)


def _outline(obj: SceneObject) -> list[tuple[float, float]] | None:
    """Polygon of a non-circle shape; circles are drawn as ellipses."""
    cx, cy, r = obj.cx, obj.cy, obj.radius
    if obj.shape == "square":
        h = 0.78 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if obj.shape == "triangle":
        return [(cx, cy - r), (cx + 0.866 * r, cy + 0.5 * r), (cx - 0.866 * r, cy + 0.5 * r)]
    if obj.shape == "cross":
        a, w = 0.95 * r, 0.34 * r
        return [(cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w), (cx + a, cy + w),
                (cx + w, cy + w), (cx + w, cy + a), (cx - w, cy + a), (cx - w, cy + w), (cx - a, cy + w),
                (cx - a, cy - w), (cx - w, cy - w)]
    return None


def render_scene(scene: Scene) -> tuple[Image.Image, np.ndarray]:
    """RGB image and an object-index map (-1 = background) drawn by the same calls, so they agree pixel for pixel."""
    size = scene.size
    pixels = np.empty((size, size, 3), dtype=np.int16)
    pixels[:] = scene.background
    if scene.textured:
        rng = np.random.default_rng([scene.seed, 1_000_003])
        coarse = rng.integers(-NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, size=(size // 4 + 1, size // 4 + 1, 1))
        pixels += np.repeat(np.repeat(coarse, 4, axis=0), 4, axis=1)[:size, :size]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    index_map = Image.new("L", (size, size), 0)
    draw, draw_index = ImageDraw.Draw(image), ImageDraw.Draw(index_map)
    for i, obj in enumerate(scene.objects):
        polygon = _outline(obj)
        for canvas, fill in ((draw, COLOURS[obj.colour]), (draw_index, i + 1)):
            if polygon is None:
                canvas.ellipse(obj.bbox(), fill=fill)
            else:
                canvas.polygon(polygon, fill=fill)
    return image, np.asarray(index_map, dtype=np.int16) - 1


def patch_coverage(index_map: np.ndarray, patch: int, objects: int) -> np.ndarray:
    """[objects, rows, cols]: the fraction of each patch's pixels that belong to each object."""
    rows, cols = index_map.shape[0] // patch, index_map.shape[1] // patch
    grid = index_map[:rows * patch, :cols * patch].reshape(rows, patch, cols, patch)
    return np.stack([(grid == i).mean(axis=(1, 3)) for i in range(objects)]) if objects else np.zeros((0, rows, cols))


# ---------------------------------------------------------------- questions


def ask(scene: Scene, task: str, rng: np.random.Generator) -> Question | None:
    """A question of `task` about `scene` with its one exact answer, or None when the scene cannot pose it."""
    objects = scene.objects
    colours = [o.colour for o in objects]
    shapes = [o.shape for o in objects]
    if task == "colour_of_shape":
        unique = [o for o in objects if shapes.count(o.shape) == 1]
        if not unique:
            return None
        obj = unique[int(rng.integers(len(unique)))]
        return Question(task, f"what colour is the {obj.shape} ?", obj.colour, (objects.index(obj),))
    if task == "shape_of_colour":
        unique = [o for o in objects if colours.count(o.colour) == 1]
        if not unique:
            return None
        obj = unique[int(rng.integers(len(unique)))]
        return Question(task, f"what shape is the {obj.colour} object ?", obj.shape, (objects.index(obj),))
    if task == "count_total":
        return Question(task, COUNT_QUESTION, NUMBERS[len(objects)], tuple(range(len(objects))))
    if task == "count_colour":
        colour = _present_or_absent(list(COLOURS), colours, rng)
        return Question(task, f"how many {colour} objects are there ?", NUMBERS[colours.count(colour)],
                        _indices(colours, colour))
    if task == "count_shape":
        shape = _present_or_absent(list(SHAPES), shapes, rng)
        return Question(task, f"how many {PLURAL[shape]} are there ?", NUMBERS[shapes.count(shape)],
                        _indices(shapes, shape))
    if task == "presence":
        present = {(o.colour, o.shape) for o in objects}
        if rng.random() < 0.5:
            colour, shape = sorted(present)[int(rng.integers(len(present)))]
            return Question(task, f"is there a {colour} {shape} ?", "yes",
                            _indices(list(zip(colours, shapes)), (colour, shape)))
        colour, shape = _near_miss(present, rng)
        return Question(task, f"is there a {colour} {shape} ?", "no")
    if task == "position":
        placed = [o for o in objects if o.quadrant(scene.size) is not None]
        if not placed:
            return None
        obj = placed[int(rng.integers(len(placed)))]
        return Question(task, f"where is the {obj.name} ?", obj.quadrant(scene.size),  # type: ignore[arg-type]
                        (objects.index(obj),))
    if task == CAPTION_TASK:
        return Question(task, CAPTION_QUESTION, caption(scene), tuple(objects.index(o) for o in caption_order(scene)))
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS + (CAPTION_TASK,)}")


def _indices(values: list, value) -> tuple[int, ...]:
    return tuple(i for i, v in enumerate(values) if v == value)


def _present_or_absent(names: list[str], present: list[str], rng: np.random.Generator) -> str:
    """Three times in four a name that is in the scene, else any name (zero answers stay in the mix)."""
    if rng.random() < 0.75:
        return present[int(rng.integers(len(present)))]
    return names[int(rng.integers(len(names)))]


def _near_miss(present: set[tuple[str, str]], rng: np.random.Generator) -> tuple[str, str]:
    """An absent pair, sharing the colour or the shape of a present object when possible, so binding is tested."""
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    close = [p for p in absent if any(p[0] == c or p[1] == s for c, s in present)]
    pool = close if close and rng.random() < 0.8 else absent
    return pool[int(rng.integers(len(pool)))]


def caption_order(scene: Scene) -> list[SceneObject]:
    """Objects by colour, then shape, in the order of COLOURS and SHAPES.

    An order by what the objects are rather than where: the next object to name is the first present pair after
    the last one named, which a small model reads from the patches' colour and shape. Left to right, it needed
    each object's exact column and repeated or skipped objects (scoring ignores the order either way)."""
    colours, shapes = list(COLOURS), list(SHAPES)
    return sorted(scene.objects, key=lambda o: (colours.index(o.colour), shapes.index(o.shape)))


def caption(scene: Scene) -> str:
    """Every object in `caption_order`: "a red circle , a blue square"."""
    return " , ".join(f"a {o.name}" for o in caption_order(scene))


def write_parquet(path, seeds) -> None:
    """Scenes as a user's Parquet shard (`id`, PNG `image`, true `caption`): planner tests and benchmarks."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for seed in seeds:
        scene = generate_scene(seed)
        buffer = io.BytesIO()
        render_scene(scene)[0].save(buffer, "PNG")
        rows.append({"id": f"scene-{seed}", "image": buffer.getvalue(), "caption": caption(scene)})
    pq.write_table(pa.Table.from_pylist(rows), path)


def benchmark_item(seed: int, task: str, size: int = 168) -> tuple[Scene, Question]:
    """The scene and question of one benchmark item: the first attempt for `seed` whose scene can pose `task`."""
    attempt = 0
    while True:
        scene = generate_scene(seed, size, attempt)
        question = ask(scene, task, np.random.default_rng([seed, attempt, 7]))
        if question is not None:
            return scene, question
        attempt += 1


# ---------------------------------------------------------------- scoring


def normalise(text: str) -> str:
    """Lower case, punctuation as separate words, single spaces: how answers are compared."""
    return " ".join(re.findall(r"[a-z]+|[,.?]", text.lower()))


def answer_correct(predicted: str, expected: str) -> bool:
    return normalise(predicted).rstrip(" .") == normalise(expected).rstrip(" .")


def caption_pairs(text: str) -> list[tuple[str, str]]:
    """Every (colour, shape) pair a caption names, in order; words that form no pair are ignored."""
    words = normalise(text).split()
    return [(a, b) for a, b in zip(words, words[1:]) if a in COLOURS and b in SHAPES]


def caption_scores(predicted: str, scene: Scene) -> tuple[float, float]:
    """(precision, recall) of the pairs a caption names against the scene's objects; a repeated pair counts once."""
    named = set(caption_pairs(predicted))
    truth = {(o.colour, o.shape) for o in scene.objects}
    hits = len(named & truth)
    precision = hits / len(named) if named else 0.0
    return precision, hits / len(truth)


def f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0
