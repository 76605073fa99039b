"""GenEval-style evaluation of shapes images against their captions.

Pure numpy.  ``detect`` finds coloured objects in an image; ``score`` checks
one image against one caption; ``aggregate`` turns many ``score`` results into
accuracies.

Detector (``detect``)
---------------------
1. Background level: per-channel median of the dark pixels (max channel < 100;
   falls back to the 10th percentile when fewer than 5 % are dark).
2. Per pixel and per palette colour ``k``, the pixel is modelled as a mix
   ``bg + a * (P_k - bg)``: ``a`` is the least-squares mixing coefficient
   (clipped at 0) and the residual the distance to that line.  The pixel's
   colour label is the ``k`` with the smallest residual and its coverage ``a``
   that ``k``'s coefficient.  Foreground = coverage >= 0.5, i.e. "at least
   half way from background to a palette colour", which keeps blurred edges at
   their true position and ignores background noise.
3. Foreground is split into 4-connected components; components smaller than
   ``MIN_AREA_FRAC`` of the canvas (24 px on 64 x 64) are noise and dropped.
4. Colour of a component: majority label among its core pixels (coverage >=
   0.75).  If a second colour holds >= 30 % of the core (two touching objects
   of different colours), the component is split per colour.
5. Shape from the mask inside its bbox: ``fill`` = area / bbox area (square
   ~1, circle ~0.785, triangle ~0.5) and the row-width profile -- mean width
   of the top and bottom quarter of rows relative to the widest row (square
   ~1/~1, circle ~0.62/~0.62, triangle ~0.15/~0.85), summarised as ``ends``
   (their mean) and ``asym`` (bottom - top; ~0.73 only for the upright
   triangle) -- classified by the nearest prototype (``SHAPE_PROTOTYPES``,
   weighted distance).  Features are measured on the raw mask and on its 3x3
   morphological opening (which strips thin attached stray pixels); the
   answer closer to its prototype wins (``fill``/``top``/``bottom`` in the
   detection come from the winning mask).
6. Size class: ``large`` when the larger bbox side >= 19.5 px (scaled with
   the image; small objects are ~13 px, large ~26 px), else ``small``.
   Position/relation thresholds likewise scale with the image size, so
   non-64 px images work too.
7. Centroid ``(cx, cy)``: mean of the mask's pixel centres (pixel ``x`` spans
   ``[x, x+1)``), as in ``data``.

Each detection is a dict ``{color, shape, size, cx, cy, bbox (x0, y0, x1, y1
exclusive), area, fill, top, bottom, mean_rgb}``, sorted by area (largest
first).

Scoring (``score``)
-------------------
The caption is parsed with ``data.parse_caption``.  A detection *matches* a
named object when both its colour and its shape are equal.  Result keys:

* ``parsed`` -- caption in the grammar.  If False, every check is None,
  ``category`` is None and ``correct`` is False (``score`` never raises on a
  caption).
* ``caption``, ``template`` (``single``/``and``/``left_of``/``above``/``two``)
  and ``category``: ``single`` (one-object captions), ``two``
  (``and``), ``relation`` (``left_of``, ``above``), ``count`` (``two``).
* ``color_shape`` -- every object the caption names has at least one matching
  detection (all categories).
* ``size`` -- single only, when a size is stated (else None): some matching
  detection has that size class.
* ``position`` -- single only, when a position is stated (else None): some
  matching detection has its centroid in the stated third (left / right: cx
  in the left / right third of the width; top / bottom: cy in the top /
  bottom third of the height; center: both in the middle third).
* ``both_present`` -- two and relation: the two named objects match two
  *distinct* detections (else None).
* ``relation`` -- relation only: some such pair satisfies the relation:
  ``left of``: ``cx_first < cx_second - tol``; ``above``: ``cy_first <
  cy_second - tol`` with ``tol = RELATION_TOL_FRAC * width/height`` (~3 px on
  64; the generator uses >= 10 px) (else None).
* ``count`` -- count only: exactly two detections match (else None).
* ``correct`` -- the GenEval verdict for the category: single ->
  some matching detection satisfies all stated constraints (size and
  position); two -> ``both_present``; relation -> ``relation``; count ->
  ``count``.  Extra unrelated objects are ignored (as in GenEval).
* ``n_detected`` and ``detections`` (the ``detect`` output).

Aggregation (``aggregate``)
---------------------------
``{"n", "n_parsed", "n_unparsed", "overall": {"accuracy", "n"},
"mean_category_accuracy", "categories": {cat: {"accuracy", "n", "checks":
{check: {"accuracy", "n"}}}}, "checks": {check: {"accuracy", "n"}}}``.
``overall`` and category accuracies use ``correct`` over parsed captions;
unparsed ones are only counted in ``n_unparsed``.  A check's accuracy is over
the results where it is not None.  ``mean_category_accuracy`` is the mean over
the categories present (GenEval's overall score).
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from .data import CANVAS, PALETTE, in_position, parse_caption

__all__ = [
    "CATEGORY_OF_TEMPLATE", "CATEGORIES", "CHECKS", "SHAPE_PROTOTYPES",
    "detect", "classify_shape", "shape_features", "score", "aggregate",
]

CATEGORY_OF_TEMPLATE = {
    "single": "single", "and": "two", "left_of": "relation", "above": "relation",
    "two": "count",
}
CATEGORIES = ("single", "two", "relation", "count")
CHECKS = ("color_shape", "size", "position", "both_present", "relation", "count")

MIN_AREA_FRAC = 24 / (CANVAS * CANVAS)
LARGE_SIDE_FRAC = 19.5 / CANVAS
RELATION_TOL_FRAC = 0.05
FG_COVERAGE = 0.5
CORE_COVERAGE = 0.75
SPLIT_FRACTION = 0.3

#: shape -> (fill, ends, asym) prototype features (see ``shape_features``)
SHAPE_PROTOTYPES: dict[str, tuple[float, float, float]] = {
    "square": (1.0, 1.0, 0.0),
    "circle": (0.785, 0.62, 0.0),
    "triangle": (0.5, 0.5, 0.73),
}
_FEATURE_WEIGHTS = np.array([1.0, 1.0, 1.5])

_COLOR_NAMES = tuple(PALETTE)
_PALETTE_ARR = np.array([PALETTE[c] for c in _COLOR_NAMES], dtype=np.float64)


# ----------------------------------------------------------------------------
# detection
# ----------------------------------------------------------------------------
def _as_rgb(image: Any) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    if arr.shape[2] == 4:
        arr = arr[..., :3]
    elif arr.shape[2] == 1:
        arr = np.concatenate([arr] * 3, axis=-1)
    if arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    out = arr.astype(np.float64)
    if np.issubdtype(arr.dtype, np.floating):
        out = np.nan_to_num(out)
        if out.max(initial=0.0) <= 1.0 + 1e-6:
            out = out * 255.0
    return np.clip(out, 0.0, 255.0)


def _background_level(img: np.ndarray) -> np.ndarray:
    flat = img.reshape(-1, 3)
    dark = flat[flat.max(axis=1) < 100]
    if len(dark) >= 0.05 * len(flat):
        return np.median(dark, axis=0)
    return np.percentile(flat, 10, axis=0)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as boolean masks."""
    if not mask.any():
        return []
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        new = lab.copy()
        np.minimum(new[1:, :], lab[:-1, :], out=new[1:, :])
        np.minimum(new[:-1, :], lab[1:, :], out=new[:-1, :])
        np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        new[~mask] = big
        # pointer jumping: follow labels to their own label (fast convergence)
        flat = new.ravel()
        inside = flat < big
        flat[inside] = np.minimum(flat[inside], flat[flat[inside]])
        if np.array_equal(new, lab):
            break
        lab = new
    return [lab == v for v in np.unique(lab[mask])]


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:, :] &= mask[:-1, :]
    out[:-1, :] &= mask[1:, :]
    tmp = out.copy()
    out[:, 1:] &= tmp[:, :-1]
    out[:, :-1] &= tmp[:, 1:]
    out[0, :] = out[-1, :] = False
    out[:, 0] = out[:, -1] = False
    return out


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:, :] |= mask[:-1, :]
    out[:-1, :] |= mask[1:, :]
    tmp = out.copy()
    out[:, 1:] |= tmp[:, :-1]
    out[:, :-1] |= tmp[:, 1:]
    return out


def _open(mask: np.ndarray) -> np.ndarray:
    """3x3 morphological opening (drops spurs / blobs thinner than 3 px)."""
    padded = np.pad(mask, 1)
    return _dilate(_erode(padded))[1:-1, 1:-1] & mask


def shape_features(mask: np.ndarray, opened: bool = False) -> dict[str, float]:
    """Shape features of a boolean mask (see module docstring).

    ``fill`` = area / bbox area, ``top`` / ``bottom`` = mean row width of the
    top / bottom quarter of rows relative to the widest row, ``ends`` =
    (top + bottom) / 2, ``asym`` = bottom - top, ``height``/``width`` of the
    bbox.  ``opened=True`` measures the 3x3-opened mask instead (drops thin
    attached stray pixels; falls back to the raw mask when opening leaves less
    than half of it).
    """
    if opened:
        op = _open(mask)
        if op.sum() >= 0.5 * mask.sum():
            mask = op
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = mask[y0:y1, x0:x1]
    h, w = crop.shape
    fill = float(crop.sum()) / float(h * w)
    rows = crop.any(axis=1)
    first = np.argmax(crop, axis=1)
    last = w - 1 - np.argmax(crop[:, ::-1], axis=1)
    widths = np.where(rows, last - first + 1, 0).astype(np.float64)
    widths /= max(widths.max(), 1.0)
    q = max(1, int(round(h / 4.0)))
    top, bottom = float(widths[:q].mean()), float(widths[-q:].mean())
    return {"fill": fill, "top": top, "bottom": bottom, "ends": (top + bottom) / 2.0,
            "asym": bottom - top, "height": float(h), "width": float(w)}


def _nearest_shape(features: dict[str, float]) -> tuple[str, float]:
    f = np.array([features["fill"], features["ends"], features["asym"]])
    best, best_d = "circle", np.inf
    for name, proto in SHAPE_PROTOTYPES.items():
        d = float((((f - np.array(proto)) * _FEATURE_WEIGHTS) ** 2).sum())
        if d < best_d:
            best, best_d = name, d
    return best, best_d


def classify_shape(features: dict[str, float]) -> str:
    """Nearest :data:`SHAPE_PROTOTYPES` entry in weighted (fill, ends, asym)
    space."""
    return _nearest_shape(features)[0]


def _shape_of(mask: np.ndarray) -> tuple[str, dict[str, float]]:
    """Classify raw and 3x3-opened mask; keep the more confident answer."""
    raw = shape_features(mask)
    opened = shape_features(mask, opened=True)
    s_raw, d_raw = _nearest_shape(raw)
    s_open, d_open = _nearest_shape(opened)
    return (s_raw, raw) if d_raw <= d_open else (s_open, opened)


def detect(image: Any) -> list[dict[str, Any]]:
    """Detect palette-coloured objects in an HxWx3 image (uint8, or float in
    [0, 1] / [0, 255]).  See the module docstring for the method."""
    img = _as_rgb(image)
    h, w, _ = img.shape
    scale2 = (h * w) / float(CANVAS * CANVAS)
    min_area = max(4.0, MIN_AREA_FRAC * h * w)
    large_side = LARGE_SIDE_FRAC * np.sqrt(scale2) * CANVAS

    bg = _background_level(img)
    d = (img - bg).reshape(-1, 3)                         # (N, 3)
    v = _PALETTE_ARR - bg                                 # (K, 3)
    vv = np.maximum((v * v).sum(axis=1), 1e-6)            # (K,)
    alpha = np.clip((d @ v.T) / vv, 0.0, None)            # (N, K)
    resid = ((d[:, None, :] - alpha[:, :, None] * v[None]) ** 2).sum(axis=2)
    label = resid.argmin(axis=1)
    cover = alpha[np.arange(len(d)), label]
    label = label.reshape(h, w)
    cover = cover.reshape(h, w)
    fg = cover >= FG_COVERAGE

    masks: list[tuple[np.ndarray, int]] = []
    for comp in _components(fg):
        area = int(comp.sum())
        if area < min_area:
            continue
        core = comp & (cover >= CORE_COVERAGE)
        if core.sum() < 0.25 * area:
            core = comp
        counts = np.bincount(label[core], minlength=len(_COLOR_NAMES))
        order = np.argsort(counts)[::-1]
        second = counts[order[1]]
        if second >= max(min_area, SPLIT_FRACTION * counts.sum()):
            for k in order:
                if counts[k] < min_area:
                    break
                for sub in _components(comp & (label == k)):
                    if sub.sum() >= min_area:
                        masks.append((sub, int(k)))
        else:
            masks.append((comp, int(order[0])))

    dets = []
    for mask, k in masks:
        ys, xs = np.nonzero(mask)
        shape, feats = _shape_of(mask)
        side = max(float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1))
        dets.append({
            "color": _COLOR_NAMES[k],
            "shape": shape,
            "size": "large" if side >= large_side else "small",
            "cx": float(xs.mean() + 0.5), "cy": float(ys.mean() + 0.5),
            "bbox": (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
            "area": int(len(xs)),
            "fill": feats["fill"], "top": feats["top"], "bottom": feats["bottom"],
            "mean_rgb": tuple(float(c) for c in img[mask].mean(axis=0)),
        })
    dets.sort(key=lambda o: -o["area"])
    return dets


# ----------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------
def _empty_result(caption: Any) -> dict[str, Any]:
    res: dict[str, Any] = {"parsed": False, "caption": caption, "template": None,
                           "category": None, "correct": False}
    for c in CHECKS:
        res[c] = None
    res["n_detected"] = None
    res["detections"] = None
    return res


def _matches(det: dict[str, Any], obj: dict[str, Any]) -> bool:
    return det["color"] == obj["color"] and det["shape"] == obj["shape"]


def score(image: Any, caption: Any, detections: list[dict[str, Any]] | None = None
          ) -> dict[str, Any]:
    """Score one image against one caption (see module docstring).

    ``detections`` may be passed to reuse a previous :func:`detect` result.
    Never raises because of the caption; an unparseable caption gives a result
    with ``parsed: False`` (the image is then not looked at).  A malformed
    image (not HxW, HxWx1/3/4) raises ``ValueError``.
    """
    res = _empty_result(caption)
    spec = parse_caption(caption)
    if spec is None:
        return res
    if detections is None:
        detections = detect(image)
        h, w = np.asarray(image).shape[:2]
    else:
        arr = np.asarray(image) if image is not None else None
        h, w = (arr.shape[:2] if arr is not None and arr.ndim >= 2 else (CANVAS, CANVAS))
    template = spec["template"]
    category = CATEGORY_OF_TEMPLATE[template]
    objs = spec["objects"]
    res.update(parsed=True, template=template, category=category,
               n_detected=len(detections), detections=detections)
    res["color_shape"] = all(any(_matches(d, o) for d in detections) for o in objs)

    if category == "single":
        o = objs[0]
        cands = [d for d in detections if _matches(d, o)]
        size, pos = o["size"], o["position"]
        if size is not None:
            res["size"] = any(d["size"] == size for d in cands)
        if pos is not None:
            res["position"] = any(in_position(d["cx"], d["cy"], pos, w, h) for d in cands)
        res["correct"] = any(
            (size is None or d["size"] == size)
            and (pos is None or in_position(d["cx"], d["cy"], pos, w, h))
            for d in cands)
    elif category in ("two", "relation"):
        a, b = objs
        pairs = [(da, db) for i, da in enumerate(detections) if _matches(da, a)
                 for j, db in enumerate(detections) if j != i and _matches(db, b)]
        res["both_present"] = bool(pairs)
        if category == "relation":
            if template == "left_of":
                tol = RELATION_TOL_FRAC * w
                ok = any(da["cx"] < db["cx"] - tol for da, db in pairs)
            else:
                tol = RELATION_TOL_FRAC * h
                ok = any(da["cy"] < db["cy"] - tol for da, db in pairs)
            res["relation"] = ok
            res["correct"] = ok
        else:
            res["correct"] = res["both_present"]
    else:  # count
        n = sum(1 for d in detections if _matches(d, objs[0]))
        res["count"] = n == 2
        res["correct"] = res["count"]
    return res


def _acc(values: list[bool]) -> dict[str, Any]:
    n = len(values)
    return {"accuracy": (sum(bool(v) for v in values) / n) if n else None, "n": n}


def aggregate(results: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Accuracies per category and per check (see module docstring)."""
    results = list(results)
    parsed = [r for r in results if r.get("parsed")]
    out: dict[str, Any] = {
        "n": len(results), "n_parsed": len(parsed),
        "n_unparsed": len(results) - len(parsed),
        "overall": _acc([r["correct"] for r in parsed]),
        "categories": {}, "checks": {},
    }
    for cat in CATEGORIES:
        rs = [r for r in parsed if r["category"] == cat]
        if not rs:
            continue
        entry = _acc([r["correct"] for r in rs])
        entry["checks"] = {c: _acc([r[c] for r in rs if r.get(c) is not None])
                           for c in CHECKS if any(r.get(c) is not None for r in rs)}
        out["categories"][cat] = entry
    for c in CHECKS:
        vals = [r[c] for r in parsed if r.get(c) is not None]
        if vals:
            out["checks"][c] = _acc(vals)
    accs = [e["accuracy"] for e in out["categories"].values()]
    out["mean_category_accuracy"] = (sum(accs) / len(accs)) if accs else None
    return out
