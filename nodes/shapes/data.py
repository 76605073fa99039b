"""Procedural "shapes" text-to-image data: captions, specs, layouts, images.

Everything here is pure numpy (plus an optional torch helper) and fully
deterministic per seed.

Images
------
* Canvas ``CANVAS`` x ``CANVAS`` (64 x 64) RGB, ``uint8``.
* Background: near black.  Each image gets a random dark tint (per channel
  0..24) plus uniform per-pixel noise of a random amplitude (0..8); every
  background channel value is ``<= BACKGROUND_MAX`` (40), in practice <= 32.
* 1 or 2 objects, each filled with exactly one ``PALETTE`` colour (no
  anti-aliasing: every object pixel is exactly its palette colour).  Objects
  never overlap: their pixel bounding boxes are separated by at least ``GAP``
  (4) background rows or columns, and keep ``MARGIN`` (2) pixels from the
  canvas border.
* Shapes (``SHAPES``): ``circle``; ``square`` (axis aligned); ``triangle``
  (isosceles, upright, apex at the top, base width == height == side).
* Sizes (``SIZES``): ``small`` side/diameter 13 px (jitter 12..14), ``large``
  26 px (jitter 24..28).
* Coordinates: pixel ``(row y, col x)`` has its centre at ``(x + 0.5, y + 0.5)``;
  an object's centroid ``(cx, cy)`` is the mean of its pixel centres, so it
  lives in the continuous range ``[0, 64]``.
* Positions (``POSITIONS``), on the centroid: ``left`` / ``right`` = cx in the
  left / right third; ``top`` / ``bottom`` = cy in the top / bottom third;
  ``center`` = cx and cy both in the middle third.  The generator keeps the
  centroid at least ``POSITION_MARGIN`` (1.5 px, analytically; >= 1 px
  verified on pixels) inside the stated third.

Captions (lower case)
---------------------
Template names (``TEMPLATES``) and grammar::

    single   a [small |large ]<color> <shape>[ on the left| on the right|
                                              at the top| at the bottom|
                                              in the center]
    and      a <color> <shape> and a <color> <shape>
    left_of  a <color> <shape> left of a <color> <shape>
    above    a <color> <shape> above a <color> <shape>
    two      two <color> <shape>s

``left_of``: centroid x of the first object is at least
``RELATION_MIN_DELTA`` (10 px) smaller than the second's; ``above``: same for
y.  In generated ``and`` / ``left_of`` / ``above`` captions the two objects
differ in colour or shape (``parse_caption`` / ``render`` accept identical
ones too); ``two`` draws two objects of the same colour and shape (sizes drawn
independently).  Unstated size and position are drawn at random.

``sample_caption`` template distribution (``TEMPLATE_WEIGHTS``): 50 % single
(size stated with p=0.4, position stated with p=0.5, independently: 20 % both,
20 % size only, 30 % position only, 30 % neither), 12.5 % each of ``and``,
``left_of``, ``above``, ``two``.  Colours and shapes are uniform.

Specs
-----
``parse_caption(caption)`` returns ``{"template": str, "objects": [obj, ...]}``
with each ``obj = {"color", "shape", "size" (or None), "position" (or None)}``
(``two``: two identical entries; ``left_of``/``above``: objects[0] is the
left/upper one), or ``None`` if the caption is not in the grammar.
``caption_from_spec`` is its exact inverse on canonical captions.

Placed objects (``Sample.objects``) are dicts::

    {"color", "shape", "size": "small"|"large", "side": int,
     "x0": int, "y0": int,            # nominal drawing square (top-left)
     "cx": float, "cy": float,        # pixel centroid (see above)
     "bbox": (x0, y0, x1, y1),        # pixel bbox, x1/y1 exclusive
     "area": int, "position": stated position or None}

Public API
----------
``sample(seed) -> Sample``; ``batch(seed, n) -> (images, captions, objects)``;
``render(spec, seed=0) -> image``; ``realize(spec, rng) -> (image, objects)``;
``parse_caption``; ``caption_from_spec``; ``sample_spec(rng)``;
``sample_caption(rng)``; ``shape_mask``; ``to_tensor`` / ``from_tensor``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "CANVAS", "PALETTE", "COLORS", "SHAPES", "SIZES", "SIZE_RANGES", "POSITIONS",
    "TEMPLATES", "TEMPLATE_WEIGHTS", "BACKGROUND_MAX", "MARGIN", "GAP",
    "POSITION_MARGIN", "RELATION_MIN_DELTA", "Sample", "sample", "batch",
    "render", "realize", "layout", "draw", "shape_mask", "parse_caption",
    "caption_from_spec", "sample_spec", "sample_caption", "in_position",
    "to_tensor", "from_tensor",
]

CANVAS = 64
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 50),
    "purple": (160, 70, 210),
    "white": (240, 240, 240),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: nominal side / diameter in pixels
SIZES: dict[str, int] = {"small": 13, "large": 26}
#: inclusive jitter range of the side per size class
SIZE_RANGES: dict[str, tuple[int, int]] = {"small": (12, 14), "large": (24, 28)}
#: position name -> caption phrase
POSITIONS: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
TEMPLATES: tuple[str, ...] = ("single", "and", "left_of", "above", "two")
TEMPLATE_WEIGHTS: dict[str, float] = {
    "single": 0.5, "and": 0.125, "left_of": 0.125, "above": 0.125, "two": 0.125,
}
P_SINGLE_SIZE = 0.4
P_SINGLE_POSITION = 0.5

BACKGROUND_MAX = 40
MARGIN = 2              # min distance (px) between an object and the canvas edge
GAP = 4                 # min background rows/cols between two objects' bboxes
POSITION_MARGIN = 1.5   # centroid kept this far inside a stated third
RELATION_MIN_DELTA = 10.0  # left_of / above: min centroid difference (px)

_RELATION_WORDS = {"and": "and", "left_of": "left of", "above": "above"}
_PHRASE_TO_POSITION = {v: k for k, v in POSITIONS.items()}
_WORDS_TO_RELATION = {v: k for k, v in _RELATION_WORDS.items()}

# ----------------------------------------------------------------------------
# captions <-> specs
# ----------------------------------------------------------------------------
_C = "(" + "|".join(COLORS) + ")"
_S = "(" + "|".join(SHAPES) + ")"
_SINGLE_RE = re.compile(
    r"a (?:(small|large) )?" + _C + " " + _S
    + r"(?: (" + "|".join(POSITIONS.values()) + "))?"
)
_PAIR_RE = re.compile(r"a " + _C + " " + _S + r" (and|left of|above) a " + _C + " " + _S)
_TWO_RE = re.compile(r"two " + _C + " " + _S + "s")


def _normalize(caption: str) -> str:
    text = " ".join(caption.lower().split())
    return text.rstrip(".").strip()


def _obj(color: str, shape: str, size: str | None = None,
         position: str | None = None) -> dict[str, Any]:
    return {"color": color, "shape": shape, "size": size, "position": position}


def parse_caption(caption: Any) -> dict[str, Any] | None:
    """Parse a grammar caption into a spec; ``None`` if it is not in the grammar.

    Case, surrounding/duplicate whitespace and one trailing ``.`` are ignored.
    Never raises.
    """
    if not isinstance(caption, str):
        return None
    try:
        text = _normalize(caption)
    except Exception:  # pragma: no cover - defensive
        return None
    m = _SINGLE_RE.fullmatch(text)
    if m:
        size, color, shape, phrase = m.groups()
        pos = _PHRASE_TO_POSITION[phrase] if phrase else None
        return {"template": "single", "objects": [_obj(color, shape, size, pos)]}
    m = _PAIR_RE.fullmatch(text)
    if m:
        c1, s1, rel, c2, s2 = m.groups()
        return {"template": _WORDS_TO_RELATION[rel],
                "objects": [_obj(c1, s1), _obj(c2, s2)]}
    m = _TWO_RE.fullmatch(text)
    if m:
        c, s = m.groups()
        return {"template": "two", "objects": [_obj(c, s), _obj(c, s)]}
    return None


def caption_from_spec(spec: dict[str, Any]) -> str:
    """Canonical caption of a spec (inverse of :func:`parse_caption`)."""
    template = spec["template"]
    objs = spec["objects"]
    if template == "single":
        o = objs[0]
        words = ["a"]
        if o.get("size"):
            words.append(o["size"])
        words += [o["color"], o["shape"]]
        if o.get("position"):
            words.append(POSITIONS[o["position"]])
        return " ".join(words)
    if template in _RELATION_WORDS:
        a, b = objs
        return (f"a {a['color']} {a['shape']} {_RELATION_WORDS[template]} "
                f"a {b['color']} {b['shape']}")
    if template == "two":
        return f"two {objs[0]['color']} {objs[0]['shape']}s"
    raise ValueError(f"unknown template {template!r}")


def _choice(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def sample_spec(rng: np.random.Generator, weights: dict[str, float] | None = None,
                p_position: float = P_SINGLE_POSITION) -> dict[str, Any]:
    """Draw a caption spec from the grammar.

    ``weights`` (default ``TEMPLATE_WEIGHTS``) gives the template balance and ``p_position`` the chance that a
    single object's caption states a position; a training set may lean on the harder templates with these.
    """
    weights = TEMPLATE_WEIGHTS if weights is None else weights
    unknown = set(weights) - set(TEMPLATES)
    if unknown:
        raise ValueError(f"unknown templates {sorted(unknown)}; known: {list(TEMPLATES)}")
    names = list(weights)
    probs = np.array([weights[t] for t in names], dtype=float)
    template = names[int(rng.choice(len(names), p=probs / probs.sum()))]
    if template == "single":
        color, shape = _choice(rng, COLORS), _choice(rng, SHAPES)
        size = _choice(rng, tuple(SIZES)) if rng.random() < P_SINGLE_SIZE else None
        pos = _choice(rng, tuple(POSITIONS)) if rng.random() < p_position else None
        return {"template": "single", "objects": [_obj(color, shape, size, pos)]}
    if template == "two":
        color, shape = _choice(rng, COLORS), _choice(rng, SHAPES)
        return {"template": "two", "objects": [_obj(color, shape), _obj(color, shape)]}
    a = (_choice(rng, COLORS), _choice(rng, SHAPES))
    while True:
        b = (_choice(rng, COLORS), _choice(rng, SHAPES))
        if b != a:
            break
    return {"template": template, "objects": [_obj(*a), _obj(*b)]}


def sample_caption(rng: np.random.Generator) -> str:
    """Draw a caption from the grammar (see module docstring for the balance)."""
    return caption_from_spec(sample_spec(rng))


# ----------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------
def _grid(canvas: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:canvas, 0:canvas].astype(np.float64)
    return xs + 0.5, ys + 0.5


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def shape_mask(shape: str, x0: float, y0: float, side: float,
               canvas: int = CANVAS) -> np.ndarray:
    """Boolean (canvas, canvas) mask of a shape drawn in the square
    ``[x0, x0+side) x [y0, y0+side)`` (pixel-centre sampling, no anti-aliasing)."""
    if canvas not in _GRIDS:
        _GRIDS[canvas] = _grid(canvas)
    xs, ys = _GRIDS[canvas]
    if shape == "circle":
        r = side / 2.0
        return (xs - (x0 + r)) ** 2 + (ys - (y0 + r)) ** 2 <= r * r
    if shape == "square":
        return (xs >= x0) & (xs < x0 + side) & (ys >= y0) & (ys < y0 + side)
    if shape == "triangle":
        t = (ys - y0) / side
        return (t >= 0) & (t <= 1) & (np.abs(xs - (x0 + side / 2.0)) <= t * side / 2.0)
    raise ValueError(f"unknown shape {shape!r}")


def in_position(cx: float, cy: float, position: str | None,
                width: float = CANVAS, height: float = CANVAS,
                margin: float = 0.0) -> bool:
    """Whether a centroid lies in the region named by ``position`` (thirds of
    the canvas), at least ``margin`` px inside it.  ``None`` -> True."""
    if position is None:
        return True
    w3, h3 = width / 3.0, height / 3.0
    if position == "left":
        return cx <= w3 - margin
    if position == "right":
        return cx >= 2 * w3 + margin
    if position == "top":
        return cy <= h3 - margin
    if position == "bottom":
        return cy >= 2 * h3 + margin
    if position == "center":
        return (w3 + margin <= cx <= 2 * w3 - margin
                and h3 + margin <= cy <= 2 * h3 - margin)
    raise ValueError(f"unknown position {position!r}")


def _centroid_range(position: str | None, axis: str, side: int) -> tuple[float, float]:
    """Allowed analytic-centroid interval along ``axis`` ('x' or 'y')."""
    third = CANVAS / 3.0
    pm = POSITION_MARGIN
    lo, hi = -math.inf, math.inf
    if axis == "x":
        if position == "left":
            hi = third - pm
        elif position == "right":
            lo = 2 * third + pm
        elif position == "center":
            lo, hi = third + pm, 2 * third - pm
    else:
        if position == "top":
            hi = third - pm
        elif position == "bottom":
            lo = 2 * third + pm
        elif position == "center":
            lo, hi = third + pm, 2 * third - pm
    return lo, hi


def _place_one(rng: np.random.Generator, obj: dict[str, Any], size: str,
               side: int) -> dict[str, Any] | None:
    """Place one object (random origin honouring its stated position)."""
    pos = obj.get("position")
    offsets = {"x": side / 2.0,
               "y": (2.0 * side / 3.0) if obj["shape"] == "triangle" else side / 2.0}
    origin = {}
    for axis in ("x", "y"):
        lo, hi = _centroid_range(pos, axis, side)
        a, b = MARGIN, CANVAS - MARGIN - side
        if math.isfinite(lo):
            a = max(a, math.ceil(lo - offsets[axis]))
        if math.isfinite(hi):
            b = min(b, math.floor(hi - offsets[axis]))
        if a > b:
            return None
        origin[axis] = int(rng.integers(a, b + 1))
    return _materialize(obj, size, side, origin["x"], origin["y"])


def _materialize(obj: dict[str, Any], size: str, side: int, x0: int,
                 y0: int) -> dict[str, Any] | None:
    mask = shape_mask(obj["shape"], x0, y0, side)
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return {
        "color": obj["color"], "shape": obj["shape"], "size": size,
        "side": int(side), "x0": int(x0), "y0": int(y0),
        "cx": float(xs.mean() + 0.5), "cy": float(ys.mean() + 0.5),
        "bbox": (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
        "area": int(len(xs)), "position": obj.get("position"),
    }


def _gap(a: dict[str, Any], b: dict[str, Any]) -> int:
    ax0, ay0, ax1, ay1 = a["bbox"]
    bx0, by0, bx1, by1 = b["bbox"]
    return max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)


def _pair_ok(template: str, a: dict[str, Any], b: dict[str, Any]) -> bool:
    if _gap(a, b) < GAP:
        return False
    if template == "left_of":
        return b["cx"] - a["cx"] >= RELATION_MIN_DELTA
    if template == "above":
        return b["cy"] - a["cy"] >= RELATION_MIN_DELTA
    return True


def layout(spec: dict[str, Any], rng: np.random.Generator) -> list[dict[str, Any]]:
    """Choose sizes (when unstated) and positions for a spec's objects."""
    objs = spec["objects"]
    template = spec.get("template", "single" if len(objs) == 1 else "and")
    sizes = [o.get("size") or _choice(rng, tuple(SIZES)) for o in objs]
    for size in sizes:
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}")
    for o in objs:
        if o["color"] not in PALETTE or o["shape"] not in SHAPES:
            raise ValueError(f"bad object {o!r}")
        if o.get("position") is not None and o["position"] not in POSITIONS:
            raise ValueError(f"unknown position {o['position']!r}")
    for round_ in range(40):
        # jittered sides; after many failures fall back toward the nominal side
        sides = []
        for size in sizes:
            lo, hi = SIZE_RANGES[size]
            if round_ >= 20:
                lo = hi = SIZES[size]
            sides.append(int(rng.integers(lo, hi + 1)))
        for _ in range(50):
            placed = []
            for o, size, side in zip(objs, sizes, sides):
                p = _place_one(rng, o, size, side)
                if p is None or not in_position(p["cx"], p["cy"], o.get("position"),
                                                 margin=1.0):
                    break
                placed.append(p)
            else:
                if len(placed) == 1 or (len(placed) == 2
                                        and _pair_ok(template, placed[0], placed[1])):
                    return placed
                if len(placed) > 2 and all(
                        _gap(placed[i], placed[j]) >= GAP
                        for i in range(len(placed)) for j in range(i + 1, len(placed))):
                    return placed
    raise RuntimeError(f"could not lay out spec {spec!r}")


def _background(rng: np.random.Generator, canvas: int = CANVAS) -> np.ndarray:
    base = rng.integers(0, 25, size=3)
    amp = int(rng.integers(0, 9))
    noise = rng.integers(-amp, amp + 1, size=(canvas, canvas, 3))
    return np.clip(base[None, None, :] + noise, 0, BACKGROUND_MAX).astype(np.uint8)


def draw(objects: list[dict[str, Any]], rng: np.random.Generator) -> np.ndarray:
    """Paint placed objects (dicts with color, shape, side, x0, y0) on a fresh
    random background."""
    img = _background(rng)
    for o in objects:
        mask = shape_mask(o["shape"], o["x0"], o["y0"], o["side"])
        img[mask] = PALETTE[o["color"]]
    return img


def realize(spec: dict[str, Any] | str, rng: np.random.Generator
            ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Lay out and draw a spec (or caption): returns ``(image, objects)``."""
    if isinstance(spec, str):
        parsed = parse_caption(spec)
        if parsed is None:
            raise ValueError(f"caption not in the grammar: {spec!r}")
        spec = parsed
    objs = spec["objects"]
    if objs and all(k in o for o in objs for k in ("x0", "y0", "side")):
        placed = [dict(o) for o in objs]
    else:
        placed = layout(spec, rng)
    return draw(placed, rng), placed


def render(spec: dict[str, Any] | str, seed: int = 0) -> np.ndarray:
    """Render a structured spec to a uint8 (64, 64, 3) image.

    ``spec`` is a :func:`parse_caption`-style dict (unstated sizes/positions
    drawn from ``seed``), a dict whose objects are already placed (carry
    ``x0``, ``y0``, ``side`` as in ``Sample.objects``: drawn as given), or a
    grammar caption string.
    """
    return realize(spec, np.random.default_rng(seed))[0]


# ----------------------------------------------------------------------------
# samples
# ----------------------------------------------------------------------------
@dataclass
class Sample:
    image: np.ndarray                      # uint8 (64, 64, 3)
    caption: str
    objects: list[dict[str, Any]]
    spec: dict[str, Any] = field(default_factory=dict)


def _sample_from_rng(rng: np.random.Generator, weights: dict[str, float] | None = None,
                     p_position: float = P_SINGLE_POSITION) -> Sample:
    spec = sample_spec(rng, weights, p_position)
    image, objects = realize(spec, rng)
    return Sample(image=image, caption=caption_from_spec(spec), objects=objects, spec=spec)


def sample(seed: int) -> Sample:
    """Deterministic sample for ``seed``."""
    return _sample_from_rng(np.random.default_rng(seed))


def batch(seed: int, n: int, weights: dict[str, float] | None = None, p_position: float = P_SINGLE_POSITION
          ) -> tuple[np.ndarray, list[str], list[list[dict[str, Any]]]]:
    """``n`` samples: ``(images uint8 (n,64,64,3), captions, objects)``.

    Item ``i`` is drawn from ``np.random.default_rng([seed, i])``, so
    ``batch(seed, k)`` is a prefix of ``batch(seed, n)`` for ``k <= n``.
    ``weights`` and ``p_position`` change the caption balance (see :func:`sample_spec`).
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    samples = [_sample_from_rng(np.random.default_rng([seed, i]), weights, p_position) for i in range(n)]
    images = (np.stack([s.image for s in samples]) if samples
              else np.zeros((0, CANVAS, CANVAS, 3), np.uint8))
    return images, [s.caption for s in samples], [s.objects for s in samples]


# ----------------------------------------------------------------------------
# torch helpers (torch imported lazily)
# ----------------------------------------------------------------------------
def to_tensor(images: np.ndarray):
    """uint8 (n,H,W,3) or (H,W,3) -> float32 torch tensor (n,3,H,W) in [-1, 1]."""
    import torch

    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
    return t / 127.5 - 1.0


def from_tensor(tensor) -> np.ndarray:
    """Inverse of :func:`to_tensor`: (n,3,H,W) in [-1,1] -> uint8 (n,H,W,3)."""
    t = tensor.detach().cpu().float()
    if t.ndim == 3:
        t = t[None]
    arr = ((t.clamp(-1, 1) + 1.0) * 127.5).round().permute(0, 2, 3, 1).numpy()
    return arr.astype(np.uint8)
