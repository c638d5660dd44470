"""A deterministic classifier that reads a shapes picture back: the background colour and, per
foreground object, its shape, colour, position and size; and the grading of a picture against the
prompt it was made from (the quality figures of the project's own model).

No learned parts and no scipy/opencv: the background is the palette colour nearest the median of
the border, the foreground is what is far from it, objects are its connected components, and each
is described by scale-invariant features of its silhouette (fill ratio of the bounding box,
convexity against a monotone-chain hull, where its mass sits). The foreground mask is the 3x3
median of the distance to the background, thresholded: it drops the speckle that a generative
model's output has.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .shapes import COLOR_NAMES, COLORS, RELATIONS, Spec

PALETTE = np.array([COLORS[name] for name in COLOR_NAMES], dtype=np.float64)  # (colours, 3)
# The foreground is what lies farther from the background colour than this fraction of the
# distance to the background's nearest other palette colour (every object colour is at least
# that far): a blurred outline counts as object where it is mostly object.
FOREGROUND_FRACTION = 0.4
MIN_OBJECT_AREA = 0.003   # components smaller than this fraction of the picture are noise
LARGE_EXTENT = 0.39       # bounding-box side / picture side above which an object is "large"
CENTER_RADIUS = 0.11      # an object whose centre is this close to the middle is "center"


@dataclass(frozen=True)
class Silhouette:
    """Scale-invariant description of one component's outline."""
    fill: float        # area / bounding-box area: square 1, circle 0.78, heart 0.68, triangle 0.53, star 0.44
    convexity: float   # area / convex-hull area: about 0.95 for convex shapes (pixel steps), heart 0.95, star 0.63
    aspect: float      # bounding-box width / height: triangle 1.15, heart 1.1, the others 1
    mass_y: float      # centroid height within the box, 0 = top: triangle 0.65, star 0.55, heart 0.41


@dataclass(frozen=True)
class DetectedObject:
    shape: str
    color: str
    position: str                 # left / right / top / bottom / center
    size: str                     # small / large
    center: tuple[float, float]   # bounding-box centre (x, y), fractions of the picture, y down
    extent: float                 # larger bounding-box side / picture side
    area: float                   # fraction of the picture
    silhouette: Silhouette


@dataclass(frozen=True)
class Classified:
    background: str
    objects: list[DetectedObject]  # largest first


def classify(image: np.ndarray) -> Classified:
    """Read a picture (H, W, 3) uint8."""
    _check_image(image)
    pixels = image.astype(np.float64)
    height, width = image.shape[:2]
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    reference = np.median(border, axis=0)
    background = nearest_color(reference)
    palette_index = COLOR_NAMES.index(background)
    others = np.delete(PALETTE, palette_index, axis=0)
    threshold = FOREGROUND_FRACTION * np.linalg.norm(others - PALETTE[palette_index], axis=1).min()
    foreground = majority3x3(np.linalg.norm(pixels - reference, axis=-1) > threshold)
    labels, count = label_components(foreground)
    objects = []
    for index in range(1, count + 1):
        component = labels == index
        if component.sum() >= MIN_OBJECT_AREA * height * width:
            objects.append(_describe(component, pixels))
    objects.sort(key=lambda o: -o.area)
    return Classified(background, objects)


def _describe(component: np.ndarray, image: np.ndarray) -> DetectedObject:
    height, width = component.shape
    rows, cols = np.nonzero(component)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    box = component[top:bottom, left:right]
    box_h, box_w = box.shape
    area = float(rows.size)
    silhouette = Silhouette(fill=area / (box_h * box_w), convexity=area / _hull_area(box),
                            aspect=box_w / box_h, mass_y=(rows.mean() + 0.5 - top) / box_h)
    # The colour comes from the interior: eroding one pixel drops the anti-aliased (or blurred)
    # outline, whose colour is a mix with the background.
    interior = component.copy()
    interior[1:] &= component[:-1]
    interior[:-1] &= component[1:]
    interior[:, 1:] &= component[:, :-1]
    interior[:, :-1] &= component[:, 1:]
    pixels = image[interior] if interior.any() else image[component]
    center = ((left + right) / 2 / width, (top + bottom) / 2 / height)
    extent = max(box_w / width, box_h / height)
    return DetectedObject(shape=shape_of(silhouette), color=nearest_color(np.median(pixels, axis=0)),
                          position=position_of(center), size="large" if extent > LARGE_EXTENT else "small",
                          center=center, extent=extent, area=area / (height * width), silhouette=silhouette)


def shape_of(s: Silhouette) -> str:
    """Shape from the silhouette: concave and sparse is a star; then the mass distribution
    separates the pointed-top triangle and the pointed-bottom heart from the symmetric circle and
    square, which the fill ratio tells apart. The thresholds sit halfway between the values of
    the rendered shapes (see Silhouette), measured clean, noisy and blurred."""
    if s.convexity < 0.8:       # star <= 0.71, the others >= 0.89
        return "star"
    if s.mass_y > 0.57:         # triangle >= 0.62, circle/square/heart <= 0.52
        return "triangle"
    if s.mass_y < 0.46:         # heart <= 0.44, circle/square >= 0.48
        return "heart"
    return "square" if s.fill > 0.86 else "circle"  # square >= 0.90, circle <= 0.83


def position_of(center: tuple[float, float]) -> str:
    dx, dy = center[0] - 0.5, center[1] - 0.5
    if max(abs(dx), abs(dy)) < CENTER_RADIUS:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def nearest_color(rgb: np.ndarray) -> str:
    return COLOR_NAMES[int(np.argmin(np.linalg.norm(PALETTE - np.asarray(rgb, np.float64), axis=1)))]


# ---- grading ----------------------------------------------------------------------------------
def grade(spec: Spec, image: np.ndarray) -> dict[str, bool]:
    """Check a picture against what its prompt states: one bool per stated attribute.

    One object: the largest foreground object's colour, shape, size and position. Two objects:
    of the two largest objects, the one where the relation puts the first-named object (the
    left one for "to the left of", ...) is checked for colour, shape and size; "relation" holds
    when both objects are there and each side has the named colour.
    """
    if not isinstance(spec, Spec):
        raise TypeError(f"spec must be a shapes.Spec (parse_caption's result), got {type(spec).__name__}")
    found = classify(image)
    result = {}
    if spec.background is not None:
        result["background"] = found.background == spec.background
    wanted = spec.objects[0]
    subject = found.objects[0] if found.objects else None
    if spec.relation is not None:
        result["relation"] = False
        if len(found.objects) >= 2:
            subject, other = _order_by_relation(found.objects[:2], spec.relation)
            result["relation"] = subject.color == wanted.color and other.color == spec.objects[1].color
    result["color"] = subject is not None and subject.color == wanted.color
    result["shape"] = subject is not None and subject.shape == wanted.shape
    if wanted.size is not None:
        result["size"] = subject is not None and subject.size == wanted.size
    if wanted.position is not None:
        result["position"] = subject is not None and subject.position == wanted.position
    return result


def _order_by_relation(pair: list[DetectedObject], relation: str) -> tuple[DetectedObject, DetectedObject]:
    """(the object where the relation puts the first-named one, the other)."""
    first_position = RELATIONS[relation][0]
    axis = 0 if first_position in ("left", "right") else 1
    low, high = sorted(pair, key=lambda o: o.center[axis])
    return (low, high) if first_position in ("left", "top") else (high, low)


def score(specs: list[Spec], images) -> dict[str, float]:
    """Accuracy per attribute over the prompts that state it, plus "all": the fraction of
    pictures right on every stated attribute."""
    if len(specs) != len(images):
        raise ValueError(f"got {len(specs)} specs and {len(images)} images: expected one image per spec")
    if not specs:
        raise ValueError("score needs at least one (spec, image) pair")
    totals: dict[str, list[bool]] = {}
    for spec, image in zip(specs, images):
        grades = grade(spec, image)
        for name, ok in grades.items():
            totals.setdefault(name, []).append(ok)
        totals.setdefault("all", []).append(all(grades.values()))
    return {name: float(np.mean(values)) for name, values in totals.items()}


# ---- image processing helpers -----------------------------------------------------------------
def majority3x3(mask: np.ndarray) -> np.ndarray:
    """True where at least 5 of the 3x3 neighbourhood are (edges replicated). Thresholding a
    3x3 median equals this vote over the thresholded values, at a fraction of the cost: it
    removes speckle and keeps outlines sharp."""
    height, width = mask.shape
    padded = np.pad(mask, 1, mode="edge").astype(np.uint8)
    votes = sum(padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3))
    return votes >= 5


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean (H, W) mask: (labels 1..n, 0 = not in the mask; n).

    Each pixel starts with its own flat index as label; labels spread as minima to 4-neighbours
    inside the mask, with pointer jumping (a pixel adopts its label's label) so that long thin
    components converge in a few dozen vectorised steps instead of one per pixel of length.
    """
    height, width = mask.shape
    none = height * width
    labels = np.where(mask, np.arange(none).reshape(height, width), none)
    while True:
        spread = labels.copy()
        np.minimum(spread[1:], labels[:-1], out=spread[1:])
        np.minimum(spread[:-1], labels[1:], out=spread[:-1])
        np.minimum(spread[:, 1:], labels[:, :-1], out=spread[:, 1:])
        np.minimum(spread[:, :-1], labels[:, 1:], out=spread[:, :-1])
        spread = np.where(mask, spread, none)
        lookup = np.append(spread.ravel(), none)  # index `none` -> `none`
        for _ in range(4):
            spread = lookup[spread]
            lookup = np.append(spread.ravel(), none)
        if np.array_equal(spread, labels):
            break
        labels = spread
    roots, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(height, width) + 1
    if roots[-1] == none:  # the "not in the mask" label sorts last: make it 0
        dense[labels == none] = 0
    return dense, int((roots != none).sum())


def _hull_area(box: np.ndarray) -> float:
    """Area of the convex hull of the pixel squares of a component (its bounding-box crop),
    by Andrew's monotone chain over the outer corners of each row's extreme pixels."""
    rows = np.nonzero(box.any(axis=1))[0]
    first = box[rows].argmax(axis=1)
    last = box.shape[1] - box[rows][:, ::-1].argmax(axis=1)
    points = sorted({(float(x), float(y)) for r, a, b in zip(rows, first, last)
                     for x in (a, b) for y in (r, r + 1)})
    if len(points) < 3:
        return float(box.sum())

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in points:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(points):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = lower[:-1] + upper[:-1]
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(hull, hull[1:] + hull[:1])))


def _check_image(image) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise TypeError(f"image must be a numpy uint8 array (H, W, 3), got "
                        f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}")
    if min(image.shape[:2]) < 16:
        raise ValueError(f"image must be at least 16x16 pixels, got {image.shape[1]}x{image.shape[0]}")
