"""Render small RGB images of coloured shapes on textured backgrounds, vectorised with NumPy.

A *scene* is a dict of per-image parameter arrays (struct of arrays); :func:`render` turns scenes
into uint8 images and object masks. Everything random is drawn from a ``numpy.random.Generator``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SHAPE_NAMES = ("circle", "square", "triangle", "cross", "ring", "star")
PATCH_COLOR = (1.0, 0.0, 1.0)  # magenta; object hues avoid it
_PATCH_HUE = 300.0
Scene = dict[str, np.ndarray]


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Return ``[N, 3]`` RGB from hue in degrees, saturation and value in [0, 1]."""
    k = np.stack([(5 + h / 60) % 6, (3 + h / 60) % 6, (1 + h / 60) % 6], axis=-1)
    f = np.clip(np.minimum(k, 4 - k), 0, 1)
    return v[:, None] - v[:, None] * s[:, None] * f


def _object_colors(rng: np.random.Generator, n: int) -> np.ndarray:
    """Return saturated, bright colours whose hue stays away from the patch colour."""
    hue = (_PATCH_HUE + 40 + rng.uniform(0, 280, n)) % 360
    return _hsv_to_rgb(hue, rng.uniform(0.65, 1.0, n), rng.uniform(0.75, 1.0, n))


def _shape_mask(cls: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Return ``[N, H, W]`` bool: inside the shape of class ``cls[n]`` (unit-radius coords)."""
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    au, av = np.abs(u), np.abs(v)
    inside = np.zeros(u.shape, dtype=bool)
    tests = (
        lambda: r <= 1.0,
        lambda: np.maximum(au, av) <= 0.8,
        lambda: (v >= -0.55) & (np.sqrt(3) * au + v <= 1.0),
        lambda: ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95)),
        lambda: (r >= 0.52) & (r <= 1.0),
        lambda: r <= 0.4 + 0.6 * ((1 + np.cos(5 * theta - np.pi / 2)) / 2) ** 2,
    )
    for c, test in enumerate(tests):
        sel = cls == c
        if sel.any():
            inside[sel] = test()[sel]
    return inside


def _place(rng: np.random.Generator, radius: np.ndarray, lo: np.ndarray, hi: np.ndarray, size: int):
    """Return centres uniform in ``[lo, hi]`` clipped so that a shape of ``radius`` stays inside."""
    c = rng.uniform(lo, hi)
    return np.clip(c, radius + 0.5, size - radius - 1.5)


def sample_objects(
    rng: np.random.Generator, cls: np.ndarray, size: int, small: bool = False
) -> Scene:
    """Return object parameters (class, centre, radius, angle, colour) for classes ``cls``."""
    n = len(cls)
    rmin, rmax = (0.14, 0.19) if small else (0.19, 0.32)
    radius = rng.uniform(rmin, rmax, n) * size
    cy = _place(rng, radius, np.full(n, 0.0), np.full(n, float(size)), size)
    cx = _place(rng, radius, np.full(n, 0.0), np.full(n, float(size)), size)
    return {
        "cls": cls.astype(np.int64),
        "cy": cy,
        "cx": cx,
        "radius": radius,
        "angle": rng.uniform(-0.4, 0.4, n),
        "color": _object_colors(rng, n),
    }


def sample_backgrounds(rng: np.random.Generator, n: int) -> Scene:
    """Return background parameters: texture style, two muted colours and texture settings."""
    hue = rng.uniform(0, 360, (2, n))
    c1 = _hsv_to_rgb(hue[0], rng.uniform(0.05, 0.45, n), rng.uniform(0.2, 0.65, n))
    c2 = _hsv_to_rgb(hue[1], rng.uniform(0.05, 0.45, n), rng.uniform(0.2, 0.65, n))
    return {
        "bg_style": rng.integers(0, 4, n),
        "bg_c1": c1,
        "bg_c2": c2,
        "bg_freq": rng.uniform(0.4, 1.2, n),
        "bg_theta": rng.uniform(0, np.pi, n),
        "bg_phase": rng.uniform(0, 2 * np.pi, n),
        "bg_cell": rng.integers(3, 7, n).astype(np.float64),
        "bg_grid": rng.uniform(0, 1, (n, 4, 4)),
    }


def _backgrounds(scene: Scene, size: int) -> np.ndarray:
    """Return ``[N, H, W, 3]`` float backgrounds: stripes, checks, blobs or a two-colour ramp."""
    n = len(scene["bg_style"])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    th = scene["bg_theta"][:, None, None]
    proj = xx * np.cos(th) + yy * np.sin(th)
    stripes = 0.5 + 0.5 * np.sin(
        scene["bg_freq"][:, None, None] * proj + scene["bg_phase"][:, None, None]
    )
    cell = scene["bg_cell"][:, None, None]
    checks = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float64)
    grid = torch.from_numpy(scene["bg_grid"]).unsqueeze(1)
    blobs = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)
    blobs = blobs.squeeze(1).clamp(0, 1).numpy()
    ramp = np.clip(proj / (size * 1.4) + 0.5 * (1 - np.cos(th)), 0, 1)
    style = scene["bg_style"][:, None, None]
    t = np.select([style == 0, style == 1, style == 2], [stripes, checks, blobs], ramp)
    t = t.reshape(n, size, size, 1)
    return scene["bg_c1"][:, None, None, :] * (1 - t) + scene["bg_c2"][:, None, None, :] * t


def _object_mask(scene: Scene, size: int, prefix: str = "") -> np.ndarray:
    """Return ``[N, H, W]`` bool masks of the objects whose parameters start with ``prefix``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    r = scene[prefix + "radius"][:, None, None]
    a = scene[prefix + "angle"][:, None, None]
    dx = (xx - scene[prefix + "cx"][:, None, None]) / r
    dy = (scene[prefix + "cy"][:, None, None] - yy) / r
    u = dx * np.cos(a) + dy * np.sin(a)
    v = -dx * np.sin(a) + dy * np.cos(a)
    return _shape_mask(scene[prefix + "cls"], u, v)


def render(
    scene: Scene, size: int, rng: np.random.Generator, noise: float = 0.03
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(images uint8 [N,H,W,3], masks [N,H,W], second_masks [N,H,W])`` of a scene.

    The second object (keys starting with ``"b_"``, drawn where ``scene["has_b"]``) is painted
    first, so the main object stays whole where they overlap.
    """
    img = _backgrounds(scene, size)
    n = len(img)
    second = np.zeros((n, size, size), dtype=bool)
    has_b = scene.get("has_b", np.zeros(n, dtype=bool))
    if has_b.any():
        sub = {k: v[has_b] for k, v in scene.items() if k.startswith("b_")}
        second[has_b] = _object_mask(sub, size, prefix="b_")
        img = np.where(second[..., None], scene["b_color"][:, None, None, :], img)
    mask = _object_mask(scene, size)
    img = np.where(mask[..., None], scene["color"][:, None, None, :], img)
    second &= ~mask
    img = img + rng.normal(0.0, noise, img.shape)
    images = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
    return images, mask, second


def paint_patches(images: np.ndarray, boxes: dict[int, tuple[int, int, int, int]]) -> None:
    """Paint the shortcut patch into ``images`` (in place) at ``{index: (y0, x0, y1, x1)}``."""
    color = np.round(np.array(PATCH_COLOR) * 255).astype(np.uint8)
    for i, (y0, x0, y1, x1) in boxes.items():
        images[i, y0:y1, x0:x1] = color


def patch_boxes(
    rng: np.random.Generator, masks: np.ndarray, indices: np.ndarray, patch: int
) -> dict[int, tuple[int, int, int, int]]:
    """Return a patch box per index, at a random spot that keeps clear of the object mask."""
    size = masks.shape[-1]
    boxes = {}
    for i in indices:
        occupied = masks[i]
        for _ in range(64):
            y0, x0 = (int(v) for v in rng.integers(1, size - patch, 2))
            if not occupied[max(y0 - 1, 0) : y0 + patch + 1, max(x0 - 1, 0) : x0 + patch + 1].any():
                break
        boxes[int(i)] = (y0, x0, y0 + patch, x0 + patch)
    return boxes


def jitter(rng: np.random.Generator, scene: Scene, copies: int, shift: float = 1.0) -> Scene:
    """Return ``copies`` near-duplicates of each image in ``scene`` (objects moved ~1 pixel)."""
    out = {k: np.repeat(v, copies, axis=0) for k, v in scene.items()}
    n = len(out["cls"])
    for prefix in ("", "b_"):
        if prefix + "cx" in out:
            out[prefix + "cx"] = out[prefix + "cx"] + rng.uniform(-shift, shift, n)
            out[prefix + "cy"] = out[prefix + "cy"] + rng.uniform(-shift, shift, n)
            out[prefix + "color"] = np.clip(
                out[prefix + "color"] + rng.normal(0, 0.02, (n, 3)), 0, 1
            )
    out["bg_phase"] = out["bg_phase"] + rng.normal(0, 0.1, n)
    return out


def concat(*scenes: Scene) -> Scene:
    """Return the scenes stacked; keys missing from a scene (second objects) are zero-filled."""
    keys = set().union(*scenes)
    out = {}
    for k in keys:
        ref = next(s[k] for s in scenes if k in s)
        parts = [
            s[k] if k in s else np.zeros((len(s["cls"]), *ref.shape[1:]), dtype=ref.dtype)
            for s in scenes
        ]
        out[k] = np.concatenate(parts)
    return out
