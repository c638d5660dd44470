"""A seeded generator of captioned pictures: coloured shapes on a coloured background.

This is the training data of the project's own small model (the SHAPES preset) and the ground
truth of its quality figures (data/classify.py grades pictures against captions). Everything is
generated from a seed; nothing is downloaded.

A `Scene` is one or two objects (shape, colour, small/large, left/right/top/bottom/center) on a
background colour, plus the exact geometry (centre, extent) after a little random jitter, plus
the set of attributes its caption states. `caption()` words it in plain English ("a small red
star on a blue background", "a green circle to the left of a yellow square"), `parse_caption()`
reads such a caption back into a `Spec` (what a prompt asks for), and `render()` /
`render_batch()` draw it anti-aliased from signed distance functions (the numpy one for a single
picture, the torch one vectorised over a batch for generating training data on the GPU; both
evaluate the same SDF code through a small numpy/torch shim, and give the same pixels).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch


# Colours far apart in RGB (every pair >= 100 apart, tested), so that the nearest palette colour
# is a robust answer even for a blurred, noisy or slightly off-colour generated picture. Brown and
# gray are the closest pairs' members; they stay because they are still >= 100 from everything.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 128, 0),
    "yellow": (240, 225, 30),
    "green": (40, 165, 60),
    "cyan": (30, 200, 215),
    "blue": (35, 70, 215),
    "purple": (130, 40, 190),
    "pink": (250, 130, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "brown": (125, 75, 30),
}
COLOR_NAMES = tuple(COLORS)
SHAPES = ("circle", "square", "triangle", "star", "heart")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")

# The extent (width of the shape's bounding square) as a fraction of the image side.
SIZE_RANGES = {"small": (0.25, 0.30), "large": (0.50, 0.58)}
# Where each named position puts the shape's centre (x, y), as fractions of the side, y down.
POSITION_CENTRES = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27),
                    "bottom": (0.5, 0.73), "center": (0.5, 0.5)}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
# Two-object relations: phrase -> (position of the first-named object, of the second).
RELATIONS = {"to the left of": ("left", "right"), "to the right of": ("right", "left"),
             "above": ("top", "bottom"), "below": ("bottom", "top")}
JITTER = 0.03   # random shift of a centre, each axis, fraction of the side
MARGIN = 0.03   # a shape's box stays this far inside the picture (its edge is never cut)
GAP = 0.05      # the least distance between the boxes of two objects (never touching, even blurred)

# The seed of the held-out evaluation prompts. Training data must never be drawn with it.
HELDOUT_SEED = 20_240_917
# Attributes a caption can state (Scene.stated, Spec.stated). "relation" is two-object only;
# "position" is one-object only (in a two-object caption the relation places both objects).
ATTRIBUTES = frozenset({"color", "shape", "background", "size", "position", "relation"})


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str       # "small" | "large"
    position: str   # a key of POSITION_CENTRES
    x: float        # centre, fraction of the width
    y: float        # centre, fraction of the height (0 = top)
    extent: float   # bounding-square side, fraction of the image side


@dataclass(frozen=True)
class ObjSpec:
    """What a prompt asks of one object; None = not stated."""
    shape: str
    color: str
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class Spec:
    """What a prompt asks for: the objects in the order they are named, the background (None =
    not stated) and the relation phrase of a two-object prompt."""
    objects: tuple[ObjSpec, ...]
    background: str | None = None
    relation: str | None = None

    @property
    def stated(self) -> set[str]:
        first = self.objects[0]
        stated = {"color", "shape"}
        for name, value in (("background", self.background), ("size", first.size),
                            ("position", first.position), ("relation", self.relation)):
            if value is not None:
                stated.add(name)
        return stated


@dataclass
class Scene:
    background: str
    objects: list[Obj]
    # Which attributes the caption states; the picture always has all of them.
    stated: set[str] = field(default_factory=lambda: {"color", "shape", "background"})

    @property
    def relation(self) -> str | None:
        if len(self.objects) != 2:
            return None
        pair = (self.objects[0].position, self.objects[1].position)
        return next(phrase for phrase, positions in RELATIONS.items() if positions == pair)

    def check(self) -> None:
        """Raise ValueError naming the first field that is not one of the known values."""
        if self.background not in COLORS:
            raise ValueError(f"background {self.background!r} is not a palette colour: expected one of {COLOR_NAMES}")
        if not 1 <= len(self.objects) <= 2 or not all(isinstance(o, Obj) for o in self.objects):
            raise ValueError(f"a scene holds one or two Obj, got {self.objects!r:.120}")
        for o in self.objects:
            for name, value, allowed in (("shape", o.shape, SHAPES), ("color", o.color, COLOR_NAMES),
                                         ("size", o.size, SIZES), ("position", o.position, POSITIONS)):
                if value not in allowed:
                    raise ValueError(f"object {name} {value!r} is unknown: expected one of {allowed}")
            if not (0 < o.extent <= 1 and 0 <= o.x <= 1 and 0 <= o.y <= 1):
                raise ValueError(f"object geometry x={o.x}, y={o.y}, extent={o.extent} is outside the "
                                 f"picture: expected fractions of the side in [0, 1]")
        if len(self.objects) == 2 and (self.objects[0].position, self.objects[1].position) not in RELATIONS.values():
            raise ValueError(f"two objects must be placed by a relation, i.e. positions one of "
                             f"{list(RELATIONS.values())}")
        if not self.stated <= ATTRIBUTES:
            raise ValueError(f"stated {sorted(self.stated)} has unknown attributes: "
                             f"expected some of {sorted(ATTRIBUTES)}")

    def spec(self) -> Spec:
        """The part of this scene that its caption states."""
        two = len(self.objects) == 2
        objects = tuple(ObjSpec(o.shape, o.color,
                                o.size if "size" in self.stated else None,
                                o.position if "position" in self.stated and not two else None)
                        for o in self.objects)
        return Spec(objects, self.background if "background" in self.stated else None,
                    self.relation if two else None)


# ---- sampling ---------------------------------------------------------------------------------
def sample_scene(rng: np.random.Generator, *, two_object_prob: float = 0.2) -> Scene:
    """A random scene. Object colours differ from the background and from each other; two
    objects sit side by side (or one above the other) at least GAP apart, at most one of them
    large. The caption states colour and shape always, the rest sometimes."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if not 0.0 <= two_object_prob <= 1.0:
        raise ValueError(f"two_object_prob must be in [0, 1], got {two_object_prob!r}")
    two = rng.random() < two_object_prob
    background = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
    others = [c for c in COLOR_NAMES if c != background]
    colors = [others[i] for i in rng.permutation(len(others))[: 2 if two else 1]]
    shapes = [SHAPES[i] for i in rng.integers(len(SHAPES), size=2 if two else 1)]
    stated = {"color", "shape"}
    if rng.random() < 0.8:
        stated.add("background")
    if rng.random() < 0.6:
        stated.add("size")
    if two:
        stated.add("relation")
        relation = list(RELATIONS)[rng.integers(len(RELATIONS))]
        # small+small, small+large or large+small: two large ones do not fit side by side.
        sizes = [("small", "small"), ("small", "large"), ("large", "small")][rng.integers(3)]
        objects = _place_pair(rng, shapes, colors, sizes, RELATIONS[relation])
    else:
        if rng.random() < 0.6:
            stated.add("position")
        size = SIZES[rng.integers(len(SIZES))]
        position = POSITIONS[rng.integers(len(POSITIONS))]
        extent = float(rng.uniform(*SIZE_RANGES[size]))
        jx, jy = rng.uniform(-JITTER, JITTER, size=2)
        cx, cy = POSITION_CENTRES[position]
        objects = [Obj(shapes[0], colors[0], size, position, _inside(cx + jx, extent),
                       _inside(cy + jy, extent), extent)]
    return Scene(background, objects, stated)


def _inside(centre: float, extent: float) -> float:
    """Clamp a centre so that the shape's box keeps MARGIN from both edges."""
    return float(min(max(centre, extent / 2 + MARGIN), 1.0 - extent / 2 - MARGIN))


def _place_pair(rng, shapes, colors, sizes, positions) -> list[Obj]:
    extents = [float(rng.uniform(*SIZE_RANGES[s])) for s in sizes]
    jitter = rng.uniform(-JITTER, JITTER, size=(2, 2))
    centres = [np.add(POSITION_CENTRES[p], j) for p, j in zip(positions, jitter)]
    axis = 0 if positions[0] in ("left", "right") else 1
    low, high = (0, 1) if positions[0] in ("left", "top") else (1, 0)  # which object is nearer 0
    # Along the relation's axis, push the two apart until GAP separates their boxes, then shift
    # both back inside the picture. SIZE_RANGES make large + small + GAP + 2 MARGIN <= 1, so it fits.
    need = (extents[low] + extents[high]) / 2 + GAP
    lo_min, hi_max = extents[low] / 2 + MARGIN, 1.0 - extents[high] / 2 - MARGIN
    lo, hi = max(centres[low][axis], lo_min), min(centres[high][axis], hi_max)
    if hi - lo < need:
        middle = (lo + hi) / 2
        lo, hi = middle - need / 2, middle + need / 2
        shift = max(0.0, lo_min - lo) - max(0.0, hi - hi_max)
        lo, hi = lo + shift, hi + shift
    centres[low][axis], centres[high][axis] = lo, hi
    return [Obj(shapes[i], colors[i], sizes[i], positions[i], _inside(centres[i][0], extents[i]),
                _inside(centres[i][1], extents[i]), extents[i]) for i in range(2)]


# ---- captions -------------------------------------------------------------------------------
def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _noun(obj: Obj, with_size: bool) -> str:
    return _with_article(" ".join(([obj.size] if with_size else []) + [obj.color, obj.shape]))


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """Plain-English caption stating exactly `scene.stated`. `rng` picks one of a few
    templates; without it the first ("<object> <where> on a <colour> background")."""
    scene.check()
    size = "size" in scene.stated
    first = _noun(scene.objects[0], size)
    if len(scene.objects) == 2:
        subject = f"{first} {scene.relation} {_noun(scene.objects[1], size)}"
    else:
        where = POSITION_PHRASES[scene.objects[0].position] if "position" in scene.stated else ""
        subject = f"{first} {where}".strip()
    if "background" not in scene.stated:
        return subject
    background = f"{scene.background} background"
    template = 0 if rng is None else int(rng.integers(3))
    if template == 0:
        return f"{subject} on {_with_article(background)}"
    if template == 1:
        return f"{_with_article(background)} with {subject}"
    return f"{subject}, {background}"


_COLOR = "|".join(COLOR_NAMES)
_NOUN_RE = re.compile(rf"\ban? (?:(small|large) )?({_COLOR}) ({'|'.join(SHAPES)})\b")
_BACKGROUND_RE = re.compile(rf"\b({_COLOR}) background\b")
_POSITION_RE = re.compile(r"\b(" + "|".join(POSITION_PHRASES.values()) + r")\b")
_RELATION_RE = re.compile(r"\b(" + "|".join(RELATIONS) + r")\b")


def parse_caption(text: str) -> Spec:
    """Read what a caption made by `caption()` asks for (any case, extra spaces allowed).
    Raises ValueError for text that is not one of those captions."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    clean = " ".join(text.lower().split())
    nouns = _NOUN_RE.findall(clean)
    backgrounds = _BACKGROUND_RE.findall(clean)
    positions = _POSITION_RE.findall(clean)
    relations = _RELATION_RE.findall(clean)
    if not 1 <= len(nouns) <= 2 or len(backgrounds) > 1 or len(positions) > 1 or len(relations) > 1 \
            or (len(nouns) == 2) != (len(relations) == 1) or (len(nouns) == 2 and positions):
        raise ValueError(f"{text!r} is not a shapes caption: expected one object phrase like "
                         f"'a small red star' (optionally 'on the left', 'on a blue background') "
                         f"or two joined by 'to the left of' / 'to the right of' / 'above' / 'below'")
    position = {v: k for k, v in POSITION_PHRASES.items()}[positions[0]] if positions else None
    objects = tuple(ObjSpec(shape, color, size or None, position if len(nouns) == 1 else None)
                    for size, color, shape in nouns)
    return Spec(objects, backgrounds[0] if backgrounds else None, relations[0] if relations else None)


# ---- signed distance functions ------------------------------------------------------------------
# Each takes shape coordinates (u right, v down; the shape's bounding square is [-1, 1]^2) as
# broadcastable arrays and returns the signed distance to the outline in the same units
# (negative inside). They are written once against a tiny math namespace so that the numpy and
# the torch renderer evaluate the very same formulas. Exact SDFs after Inigo Quilez,
# https://iquilezles.org/articles/distfunctions2d/ (sdPolygon, sdHeart).
NUMPY_MATH = SimpleNamespace(sqrt=np.sqrt, minimum=np.minimum, where=np.where, clamp=np.clip, sign=np.sign)
TORCH_MATH = SimpleNamespace(sqrt=torch.sqrt, minimum=torch.minimum, where=torch.where, clamp=torch.clamp,
                             sign=torch.sign)


def _circle(u, v, m):
    return m.sqrt(u * u + v * v) - 1.0


def _polygon(vertices: list[tuple[float, float]]):
    """sdPolygon: distance to the nearest edge, sign from a crossing-number inside test."""
    def sdf(u, v, m):
        x0, y0 = vertices[0]
        squared = (u - x0) ** 2 + (v - y0) ** 2
        sign = squared * 0.0 + 1.0
        for i, (xi, yi) in enumerate(vertices):
            xj, yj = vertices[i - 1]
            ex, ey = xj - xi, yj - yi
            wx, wy = u - xi, v - yi
            t = m.clamp((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
            bx, by = wx - ex * t, wy - ey * t  # from the nearest point of edge (i, j)
            squared = m.minimum(squared, bx * bx + by * by)
            above, below, left = v >= yi, v < yj, ex * wy > ey * wx
            sign = m.where((above & below & left) | ~(above | below | left), -sign, sign)
        return sign * m.sqrt(squared)
    return sdf


def _star_vertices(inner: float = 0.45) -> list[tuple[float, float]]:
    """A 5-point star, point up, scaled so that its width is 2 and its box centred on 0."""
    radius = 1.0 / math.cos(math.radians(18))  # the side points reach x = +-1
    shift = radius * (1 - math.cos(math.radians(36))) / 2  # centre the box vertically
    return [((radius if k % 2 == 0 else radius * inner) * math.cos(math.radians(-90 + 36 * k)),
             (radius if k % 2 == 0 else radius * inner) * math.sin(math.radians(-90 + 36 * k)) + shift)
            for k in range(10)]


_HEART_HALF_WIDTH = 0.25 + math.sqrt(2) / 4    # sdHeart spans x in [-0.604, 0.604], y in [0, 1.104]
_HEART_MID_Y = (0.75 + math.sqrt(2) / 4) / 2


def _heart(u, v, m):
    """sdHeart (y up, bottom tip at the origin), scaled so that its width is 2."""
    x = abs(u) * _HEART_HALF_WIDTH
    y = _HEART_MID_Y - v * _HEART_HALF_WIDTH
    lobe = m.sqrt((x - 0.25) ** 2 + (y - 0.75) ** 2) - math.sqrt(2) / 4
    t = 0.5 * m.clamp(x + y, 0.0, None)
    point = m.sqrt(m.minimum(x * x + (y - 1.0) ** 2, (x - t) ** 2 + (y - t) ** 2)) * m.sign(x - y)
    return m.where(x + y > 1.0, lobe, point) / _HEART_HALF_WIDTH


SHAPE_SDFS = {
    "circle": _circle,
    "square": _polygon([(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]),
    "triangle": _polygon([(0.0, -math.sqrt(3) / 2), (1.0, math.sqrt(3) / 2), (-1.0, math.sqrt(3) / 2)]),
    "star": _polygon(_star_vertices()),
    "heart": _heart,
}


def coverage(distance, pixels_per_unit, m):
    """Anti-aliasing: the fraction of a pixel inside the shape, from the signed distance (a
    one-pixel linear ramp across the outline)."""
    return m.clamp(0.5 - distance * pixels_per_unit, 0.0, 1.0)


# ---- rendering --------------------------------------------------------------------------------
def render(scene: Scene, size: int = 128) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 picture (numpy, float64, one object at a time)."""
    _check_size(size)
    scene.check()
    pixels = (np.arange(size, dtype=np.float64) + 0.5) / size  # pixel centres in [0, 1]
    canvas = np.empty((size, size, 3), dtype=np.float64)
    canvas[:] = COLORS[scene.background]
    for obj in scene.objects:
        half = obj.extent / 2
        u = ((pixels - obj.x) / half)[None, None, :]  # (1, 1, W): shape units, box = [-1, 1]
        v = ((pixels - obj.y) / half)[None, :, None]  # (1, H, 1)
        alpha = coverage(SHAPE_SDFS[obj.shape](u, v, NUMPY_MATH), half * size, NUMPY_MATH)[0]
        canvas = canvas * (1 - alpha[..., None]) + np.asarray(COLORS[obj.color]) * alpha[..., None]
    return np.round(canvas).clip(0, 255).astype(np.uint8)


def render_batch(scenes: list[Scene], size: int = 128, device: str | torch.device = "cpu") -> torch.Tensor:
    """The scenes as a float32 tensor (B, 3, size, size) in [-1, 1], the same pixels as
    `render()` (quantised to the 256 levels of a uint8 picture). Vectorised over the batch: each
    shape's SDF runs once over all objects of that shape."""
    _check_size(size)
    if not isinstance(scenes, (list, tuple)) or not scenes or not all(isinstance(s, Scene) for s in scenes):
        raise TypeError("scenes must be a non-empty list of Scene")
    for scene in scenes:
        scene.check()
    slots = max(len(s.objects) for s in scenes)
    batch = len(scenes)
    # Per (scene, slot): shape index, centre + half extent, colour; empty slots (-1) draw nothing.
    padding = [(-1, 0.0, 0.0, 1.0, (0, 0, 0))]
    slot_rows = [[(SHAPES.index(o.shape), o.x, o.y, o.extent / 2, COLORS[o.color]) for o in s.objects]
                 + padding * (slots - len(s.objects)) for s in scenes]
    shape_index = torch.tensor([[row[0] for row in r] for r in slot_rows], device=device)  # (B, slots)
    geometry = torch.tensor([[row[1:4] for row in r] for r in slot_rows], dtype=torch.float32,
                            device=device)  # (B, slots, 3): x, y, half extent
    color = torch.tensor([[row[4] for row in r] for r in slot_rows], dtype=torch.float32,
                         device=device)  # (B, slots, 3)
    background = torch.tensor([COLORS[s.background] for s in scenes], dtype=torch.float32, device=device)
    pixels = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    alpha = torch.zeros((batch, slots, size, size), device=device)  # (B, slots, H, W)
    for index, name in enumerate(SHAPES):
        rows, cols = torch.nonzero(shape_index == index, as_tuple=True)
        if rows.numel() == 0:
            continue
        x, y, half = geometry[rows, cols].unbind(-1)  # (N,) each
        u = (pixels[None, None, :] - x[:, None, None]) / half[:, None, None]  # (N, 1, W)
        v = (pixels[None, :, None] - y[:, None, None]) / half[:, None, None]  # (N, H, 1)
        distance = SHAPE_SDFS[name](u, v, TORCH_MATH)  # (N, H, W), shape units
        alpha[rows, cols] = coverage(distance, (half * size)[:, None, None], TORCH_MATH)
    canvas = background[:, :, None, None].expand(batch, 3, size, size)  # (B, 3, H, W)
    for k in range(slots):
        a = alpha[:, k, None]  # (B, 1, H, W)
        canvas = canvas * (1 - a) + color[:, k, :, None, None] * a
    return canvas.round().clamp(0, 255) / 127.5 - 1.0


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 16:
        raise ValueError(f"size must be an int >= 16 (pixels per side), got {size!r}")


def to_uint8(batch: torch.Tensor) -> np.ndarray:
    """`render_batch` output (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    return ((batch.float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ---- data sets --------------------------------------------------------------------------------
def sample_captioned(rng: np.random.Generator, n: int, *,
                     two_object_prob: float = 0.2) -> tuple[list[Scene], list[str]]:
    """n scenes and their captions, drawn one after the other from `rng` (so the first k of n
    are the k of a shorter draw from the same seed)."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    scenes, captions = [], []
    for _ in range(n):
        scene = sample_scene(rng, two_object_prob=two_object_prob)
        scenes.append(scene)
        captions.append(caption(scene, rng))
    return scenes, captions


def dataset(n: int, seed: int, size: int = 128) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n captioned pictures from `seed`: (uint8 (n, size, size, 3), captions, scenes)."""
    _check_size(size)
    scenes, captions = sample_captioned(np.random.default_rng(seed), n)
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    for start in range(0, n, 256):
        chunk = scenes[start:start + 256]
        images[start:start + len(chunk)] = to_uint8(render_batch(chunk, size))
    return images, captions, scenes


def heldout_prompts(n: int = 200, seed: int = HELDOUT_SEED) -> list[tuple[str, Spec]]:
    """The fixed evaluation prompts: n captions drawn with HELDOUT_SEED (which training never
    uses), each stating its background so that every prompt grades the background colour."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(n):
        scene = sample_scene(rng)
        scene.stated.add("background")
        text = caption(scene, rng)
        prompts.append((text, parse_caption(text)))
    return prompts


def random_mask(rng: np.random.Generator, size: int | tuple[int, int]) -> np.ndarray:
    """An inpainting mask (H, W) uint8: 255 = repaint (white, as the pipelines read masks),
    0 = keep. One axis-aligned rectangle or ellipse covering 15-60% of the picture."""
    height, width = (size, size) if isinstance(size, int) else size
    if min(height, width) < 8:
        raise ValueError(f"mask size must be at least 8x8 pixels, got {size!r}")
    rows = (np.arange(height) + 0.5)[:, None] / height
    cols = (np.arange(width) + 0.5)[None, :] / width
    while True:  # a few tries at most: the target area is drawn inside the allowed range
        ellipse = rng.random() < 0.5
        area = rng.uniform(0.18, 0.57)
        aspect = np.exp(rng.uniform(-0.6, 0.6))
        box = area * (4 / np.pi if ellipse else 1.0)  # w * h of the bounding box
        w, h = min(np.sqrt(box * aspect), 0.98), min(np.sqrt(box / aspect), 0.98)
        cx, cy = rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2)
        du, dv = (cols - cx) / (w / 2), (rows - cy) / (h / 2)
        inside = (du ** 2 + dv ** 2 <= 1) if ellipse else (np.abs(du) <= 1) & (np.abs(dv) <= 1)
        if 0.15 <= inside.mean() <= 0.60:
            return inside.astype(np.uint8) * 255
