"""Deterministic analyser for images of the synthetic shapes world (used to score generations).

Given an RGB image (PIL or uint8 array, any size) with one shape on a light plain background,
:func:`analyze_shape` reports the shape's colour, kind and position:

* background = per-channel median of the 1-pixel border; the foreground blob = the largest
  8-connected component of pixels farther from it than a noise floor (isolated noise specks drop out),
  grown by 2 pixels to take in anti-aliased / blurred edges;
* soft coverage = each pixel's projection onto the background -> blob-colour direction (0 on the
  background, 1 on the shape colour), linear and unclipped so blur keeps the area and zero-mean
  noise averages out; ``foreground_fraction`` = its sum / image area;
* colour = majority vote of the blob's fully covered pixels, each classified to the nearest palette
  colour (nearest RGB);
* position = nearest anchor (left / right / top / bottom / center) to the coverage centroid;
* shape = rotation-invariant harmonic moments about the centroid (:func:`shape_features`): a strong
  3-fold harmonic means triangle, else a strong 4-fold harmonic means square, else circle. (The bounding
  box fill ratio, pi/4 vs 1 vs 1/2, separates the clean shapes too, but its extents are biased by noise.)

Everything is ``"none"`` when the foreground is tiny (``foreground_fraction < MIN_FOREGROUND``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
from PIL import Image

# The world's colours and shape centres (x, y as fractions of the side, before jitter): the world draws with
# these and the analyser judges against them.
PALETTE = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
ANCHORS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5)}
#: Decision rule on :func:`shape_features`: triangle if tri > TRIANGLE_HARMONIC (clean world triangles
#: ~0.78, circles / squares ~0), else square if sq > SQUARE_HARMONIC (clean squares ~0.42, circles ~0).
TRIANGLE_HARMONIC = 0.25
SQUARE_HARMONIC = 0.2
NOISE_FLOOR = 48.0  # RGB distance below which a pixel is background (about 3 sigma of sigma=10 noise, x sqrt 3)
MIN_FOREGROUND = 0.003  # fraction of the image; the smallest world shape covers ~0.045

ImageLike = Union[Image.Image, np.ndarray]


@dataclass(frozen=True)
class ShapeReport:
    color: str  # a palette colour name or "none"
    shape: str  # "circle" | "square" | "triangle" | "none"
    position: str  # "left" | "right" | "top" | "bottom" | "center" | "none"
    foreground_fraction: float  # soft foreground area / image area

    @property
    def attributes(self) -> dict[str, str]:
        """``{"color", "shape", "position"}``, comparable with ``shapes_world.synthetic_world.Scene.attributes``."""
        return {"color": self.color, "shape": self.shape, "position": self.position}


NONE = "none"


def _to_array(image: ImageLike) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or min(arr.shape[:2]) < 4:
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 array, got {arr.dtype}")
    return arr[..., :3].astype(np.float64)


def _max3x3(a: np.ndarray) -> np.ndarray:
    """3x3 maximum filter (zero outside the image); for booleans a 3x3 dilation."""
    b = a.copy()
    b[1:] = np.maximum(b[1:], a[:-1])
    b[:-1] = np.maximum(b[:-1], a[1:])
    c = b.copy()
    c[:, 1:] = np.maximum(c[:, 1:], b[:, :-1])
    c[:, :-1] = np.maximum(c[:, :-1], b[:, 1:])
    return c


def _spread_runs(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Give every horizontal run of ``mask`` the largest label found in it."""
    h, w = mask.shape
    m = np.zeros((h, w + 1), bool)  # the extra column ends runs at row ends
    m[:, :w] = mask
    m = m.ravel()
    values = np.zeros((h, w + 1), labels.dtype)
    values[:, :w] = labels
    starts = (m & ~np.r_[False, m[:-1]])[m]  # first pixel of each run, among the mask pixels
    out = np.zeros(m.size, labels.dtype)
    out[m] = np.maximum.reduceat(values.ravel()[m], np.flatnonzero(starts))[np.cumsum(starts) - 1]
    return out.reshape(h, w + 1)[:, :w]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of ``mask``: labels spread along rows, columns and a 3x3
    neighbourhood (for diagonal links) until stable; a few passes for compact blobs."""
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        grown = _spread_runs(_spread_runs(labels, mask).T, mask.T).T
        grown = np.where(mask, _max3x3(grown), 0)
        if np.array_equal(grown, labels):
            break
        labels = grown
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == counts.argmax()


def _coverage(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Soft coverage (~0 to ~1) of the dominant blob and the mask of its fully covered pixels.

    The blob is the largest connected component of pixels farther than the noise floor from the
    background (isolated noise specks drop out), grown by 2 pixels to include anti-aliased / blurred
    edges. Coverage is linear in the pixel's projection onto the blob's colour direction, so blur
    preserves the area and zero-mean noise adds no bias."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0)
    dist = np.linalg.norm(rgb - background, axis=-1)
    # noise floor: fixed, raised for noisy backgrounds (median of a chi_3 distance is ~1.5 sigma)
    floor = max(NOISE_FLOOR, 3.0 * float(np.median(np.linalg.norm(border - background, axis=-1))))
    mask = dist > floor
    if not mask.any():
        return np.zeros(dist.shape), mask
    blob = _largest_component(mask)
    contrast = float(np.percentile(dist[blob], 90))
    core = blob & (dist >= 0.8 * contrast)
    direction = background - np.median(rgb[core], axis=0)
    length = max(float(np.linalg.norm(direction)), 1e-6)
    signed = ((background - rgb) @ direction) / length**2  # 0 on background, 1 on the shape colour
    cov = signed * _max3x3(_max3x3(blob))  # unclipped: noise averages out in sums
    return cov, core & (signed >= 0.8)


def _classify_color(rgb: np.ndarray, core: np.ndarray) -> str:
    pixels = rgb[core]
    if pixels.size == 0:
        return NONE
    names = list(PALETTE)
    palette = np.array([PALETTE[n] for n in names], dtype=np.float64)
    nearest = np.argmin(((pixels[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
    return names[int(np.bincount(nearest, minlength=len(names)).argmax())]


def shape_features(cov: np.ndarray) -> tuple[float, float]:
    """Rotation-invariant harmonic moments of a coverage map about its centroid, with z = x + iy:
    ``tri = |E[z^3]| / E[|z|^2]^1.5`` (3-fold harmonic: 0 for circles and squares, ~0.78 for the
    world's triangles) and ``sq = |E[z^4]| / E[|z|^4]`` (4-fold harmonic: 0 for circles, ~0.43 for
    squares, small for the near-3-fold-symmetric triangles). Both are linear in the coverage, so zero-mean noise averages
    out, and isotropic blur keeps a circle at 0."""
    h, w = cov.shape
    area = float(cov.sum())
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    z = (x - (cov * x).sum() / area) + 1j * (y - (cov * y).sum() / area)
    r2 = (z * z.conj()).real
    tri = abs((cov * z**3).sum() / area) / max((cov * r2).sum() / area, 1e-9) ** 1.5
    sq = abs((cov * z**4).sum()) / max(float((cov * r2**2).sum()), 1e-9)
    return float(tri), float(sq)


def _classify_shape(cov: np.ndarray) -> str:
    tri, sq = shape_features(cov)
    if tri > TRIANGLE_HARMONIC:
        return "triangle"
    return "square" if sq > SQUARE_HARMONIC else "circle"


def _classify_position(cov: np.ndarray, area: float) -> str:
    h, w = cov.shape
    cy = ((cov.sum(axis=1) * (np.arange(h) + 0.5)).sum() / area) / h
    cx = ((cov.sum(axis=0) * (np.arange(w) + 0.5)).sum() / area) / w
    return min(ANCHORS, key=lambda k: (ANCHORS[k][0] - cx) ** 2 + (ANCHORS[k][1] - cy) ** 2)


def analyze_shape(image: ImageLike) -> ShapeReport:
    """Classify colour, shape and position of the (single) shape in ``image``; see the module docstring."""
    rgb = _to_array(image)
    cov, core = _coverage(rgb)
    area = float(cov.sum())
    fraction = max(area, 0.0) / cov.size
    if fraction < MIN_FOREGROUND:
        return ShapeReport(NONE, NONE, NONE, fraction)
    return ShapeReport(_classify_color(rgb, core), _classify_shape(cov), _classify_position(cov, area), fraction)
