"""Built-in demo data: procedurally drawn face-like identities, written in the real formats.

Every identity is a fixed set of shape and colour parameters (face oval, jaw, skin tone, hair shape
and colour, eye spacing/size/colour, eyebrows, nose, mouth, beard, moles, ...). Every image of it
redraws those with a new pose (in-plane rotation, translation, scale, a yaw-like shift of the inner
features), expression (smile, open mouth, eye openness, raised brows), lighting (direction,
brightness, colour cast), background, occasional occluders, noise, blur and JPEG quality.

Drawing is vectorised with numpy over a pixel grid and a batch of images: every part is an implicit
shape (a soft mask from an approximate signed distance) drawn upright in face coordinates, then the
whole face is warped into the image by its pose. The defaults (14k images) take ~20 s on one core.

The training identities go to a RecordIO folder (via :class:`~timmface.data.recordio.RecordIOWriter`);
held-out identities (never in training) make a ``demo_val.bin`` of pairs, half same and half
different, like ``lfw.bin``. ``difficulty`` scales the within-identity variation up and the spread
between identities down. At the defaults (250 training identities x 40 images, 2000 pairs of 200
held-out identities, difficulty 1.0) a small timm backbone trained from scratch with CosFace for
~1000 steps of batch 64 (a few CPU minutes) reaches about 0.94 (``lcnet_050``) to 0.96
(``mobilenetv3_small_050``) pair accuracy: learnable, with room left for distillation
(``benchmarks/calibrate_demo.py``). Fewer images per identity and more identities make it harder.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from timmface.errors import ConfigError, DataError

FORMAT_VERSION = 3
"""Bump when the drawing changes, so cached demo sets are regenerated."""

# Calibrated with benchmarks/calibrate_demo.py (250 identities x 40 images, CosFace s=64 m=0.4, AdamW,
# 1000 steps of batch 64 from scratch, held-out pairs of demo_val.bin, flip TTA, 10-fold accuracy):
# internal scale 1.0: lcnet_050 0.86; 0.6: lcnet_050 0.95, mobilenetv3_small_050 0.98;
# 0.75 (= difficulty 1.0): lcnet_050 0.94, mobilenetv3_small_050 0.96.
_DIFFICULTY_SCALE = 0.75
_BATCH = 32  # images drawn at once: big enough to amortise numpy overhead, small enough to stay in cache


@dataclass(frozen=True)
class DemoKnobs:
    """Fine controls beyond ``difficulty`` (each multiplies the difficulty-scaled default)."""

    pose: float = 1.0
    """In-plane rotation, translation, scale and yaw."""
    expression: float = 1.0
    """Smile/frown, open mouth, eye openness, brow raise."""
    lighting: float = 1.0
    """Light direction strength, brightness, colour cast."""
    degradation: float = 1.0
    """Noise, blur and low JPEG quality."""
    occlusion: float = 1.0
    """Probability of a random occluder (sunglasses, mask, blob)."""
    identity_spread: float = 1.0
    """How different identities are (> 1: easier to tell apart)."""


# ------------------------------------------------------------------------------------------ parameters

_SKIN_LIGHT = np.array([0.96, 0.80, 0.69], np.float32)
_SKIN_DARK = np.array([0.34, 0.22, 0.15], np.float32)
_HAIR = np.array(
    [
        [0.07, 0.06, 0.06],
        [0.22, 0.14, 0.09],
        [0.42, 0.28, 0.16],
        [0.80, 0.66, 0.42],
        [0.58, 0.24, 0.12],
        [0.62, 0.62, 0.62],
    ],
    np.float32,
)
_IRIS = np.array(
    [[0.30, 0.18, 0.10], [0.12, 0.08, 0.06], [0.28, 0.45, 0.70], [0.30, 0.50, 0.32], [0.45, 0.48, 0.50]], np.float32
)


def _identity_params(rng: np.random.Generator, n: int, spread: float) -> dict[str, np.ndarray]:
    """Shape and colour parameters of ``n`` identities; ``spread`` scales how much they differ."""

    def normal(mean: float, std: float, lo: float | None = None, hi: float | None = None) -> np.ndarray:
        x = mean + spread * std * rng.standard_normal(n)
        return np.clip(x, lo if lo is not None else -np.inf, hi if hi is not None else np.inf).astype(np.float32)

    def mix(base: np.ndarray, std: float) -> np.ndarray:
        return np.clip(base + spread * std * rng.standard_normal((n, 3)), 0, 1).astype(np.float32)

    # Colours: categorical choice + continuous jitter; the spread shrinks the jitter but not the palette,
    # so that difficulty never merges e.g. all hair colours.
    tone = np.clip(0.5 + 0.5 * spread * (rng.random(n) - 0.5) * 2, 0, 1)[:, None]
    skin = mix(_SKIN_LIGHT * (1 - tone) + _SKIN_DARK * tone, 0.025)
    hair = mix(_HAIR[rng.choice(len(_HAIR), n, p=[0.3, 0.25, 0.18, 0.12, 0.07, 0.08])], 0.05)
    iris = mix(_IRIS[rng.choice(len(_IRIS), n)], 0.05)
    lip = np.clip(
        skin * 0.65 + np.array([0.25, 0.02, 0.04], np.float32) + 0.04 * spread * rng.standard_normal((n, 3)), 0, 1
    )
    bald = rng.random(n) < 0.08
    beard = (rng.random(n) < 0.22) * rng.uniform(0.4, 0.9, n)
    eye_y = normal(-0.10, 0.04, -0.2, 0.0)
    nose_len = normal(0.34, 0.05, 0.22, 0.46)
    p = {
        "skin": skin,
        "hair": hair,
        "iris": iris,
        "lip": lip.astype(np.float32),
        "face_w": normal(0.84, 0.06, 0.68, 1.0),
        "face_h": normal(1.05, 0.07, 0.85, 1.25),
        "jaw": normal(0.3, 0.12, 0.0, 0.6),
        "hairline": np.where(bald, -2.0, normal(-0.6, 0.12, -0.85, -0.35)).astype(np.float32),
        "hair_volume": normal(0.10, 0.06, 0.0, 0.25),
        "hair_length": normal(0.2, 0.4, -0.4, 1.2),
        "fringe": normal(0.5, 0.3, 0.0, 1.0),
        "fringe_phase": rng.uniform(0, 2 * np.pi, n).astype(np.float32),
        "eye_dx": normal(0.31, 0.03, 0.23, 0.39),
        "eye_y": eye_y,
        "eye_w": normal(0.12, 0.015, 0.08, 0.16),
        "eye_h": normal(0.055, 0.01, 0.035, 0.08),
        "iris_r": normal(0.62, 0.07, 0.45, 0.8),
        "brow_gap": normal(0.10, 0.025, 0.05, 0.16),
        "brow_thick": normal(0.03, 0.009, 0.014, 0.05),
        "brow_slope": normal(0.0, 0.3, -0.6, 0.6),
        "brow_arch": normal(0.5, 0.4, -0.3, 1.3),
        "brow_len": normal(1.25, 0.18, 0.9, 1.7),
        "nose_len": nose_len,
        "nose_w": normal(0.08, 0.015, 0.05, 0.12),
        "mouth_y": eye_y + nose_len + normal(0.30, 0.05, 0.18, 0.42),
        "mouth_w": normal(0.22, 0.03, 0.15, 0.30),
        "lip_t": normal(0.03, 0.008, 0.015, 0.05),
        "beard": beard.astype(np.float32),
        "moustache": ((rng.random(n) < 0.5) * beard).astype(np.float32),
        "mole_u": rng.uniform(-0.6, 0.6, n).astype(np.float32),
        "mole_v": rng.uniform(-0.3, 0.8, n).astype(np.float32),
        "mole_r": ((rng.random(n) < 0.35) * rng.uniform(0.015, 0.03, n)).astype(np.float32),
        "blush": normal(0.15, 0.1, 0.0, 0.4),
        "ear": normal(0.16, 0.03, 0.1, 0.22),
    }
    return p


def _sample_params(rng: np.random.Generator, n: int, scale: dict[str, float]) -> dict[str, np.ndarray]:
    """Per-image nuisance: pose, expression, lighting, background, occluders, degradation."""
    po, ex, li, de, oc = (scale[k] for k in ("pose", "expression", "lighting", "degradation", "occlusion"))

    def f32(x: Any) -> np.ndarray:
        return np.asarray(x, np.float32)

    occluder = np.where(rng.random(n) < min(0.2 * oc, 0.9), rng.integers(1, 4, n), 0)
    return {
        "rot": f32(rng.normal(0, np.deg2rad(7) * po, n)),
        "tx": f32(rng.normal(0, 0.045 * po, n)),
        "ty": f32(rng.normal(0.02, 0.04 * po, n)),
        "scale": f32(np.exp(rng.normal(0, 0.07 * po, n))),
        "yaw": f32(np.clip(rng.normal(0, 0.45 * po, n), -1, 1)),
        "pitch": f32(rng.normal(0, 0.025 * po, n)),
        "smile": f32(rng.normal(0, 0.6 * ex, n)),
        "mouth_open": f32(np.clip(rng.normal(0, 0.5 * ex, n), 0, 1)),
        "eye_open": f32(np.clip(1 - 0.45 * ex * rng.random(n) ** 2 - (rng.random(n) < 0.04 * ex), 0.08, 1)),
        "brow_raise": f32(rng.normal(0, 0.012 * ex, n)),
        "gaze": f32(rng.normal(0, 0.25 * ex, n)),
        "light_dir": f32(rng.uniform(0, 2 * np.pi, n)),
        "light_amp": f32(rng.uniform(0, 0.4 * li, n)),
        "bright": f32(np.exp(rng.normal(0, 0.15 * li, n))),
        "cast": f32(rng.normal(0, 0.035 * li, (n, 3))),
        "bg": f32(rng.random((n, 3)) * 0.8 + 0.1),
        "bg2": f32(rng.random((n, 3)) * 0.8 + 0.1),
        "bg_dir": f32(rng.uniform(0, 2 * np.pi, n)),
        "occluder": occluder.astype(np.int32),
        "occ_color": f32(rng.random((n, 3)) * 0.6),
        "occ_u": f32(rng.uniform(-0.5, 0.5, n)),
        "occ_v": f32(rng.uniform(-0.3, 0.6, n)),
        "noise": f32(rng.uniform(0, 0.035 * de, n)),
        "blur": f32(np.clip(rng.uniform(-1.0, 1.0, n) * de, 0, 1)),
        "quality": np.clip(95 - rng.uniform(0, 45 * de, n), 20, 95).astype(np.int32),
    }


# --------------------------------------------------------------------------------------------- drawing

_ALL = slice(None)
_EXTENT = 1.2  # the canonical canvas covers [-1.2, 1.2]^2 so that zooming out and turning never show its edge


def _v(x: np.ndarray) -> np.ndarray:
    """Per-image scalars (B,) as (B, 1, 1) for broadcasting over a (B, rows, cols) grid."""
    return np.asarray(x, np.float32).reshape(-1, 1, 1)


@dataclass(frozen=True)
class _Region:
    """A window of the canonical grid: images ``idx``, rows and columns."""

    idx: slice
    rows: slice
    cols: slice


class _Layer:
    """The face drawn upright in canonical coordinates (u right, v down; eyes near v = -0.1, mouth
    near v = 0.6, like an ArcFace-aligned crop), as premultiplied colour ``P`` (3, B, S, S) and alpha
    ``A`` (B, S, S), later warped into the image by each image's pose.

    Upright shapes are separable: an ellipse's ``(u/a)^2`` depends on the column only and ``(v/b)^2``
    on the row only, so each costs two operations on the grid; and every feature is drawn only on
    the window of rows and columns it can occupy in this batch (or in its one image).
    """

    def __init__(self, n: int, size: int, squeeze: np.ndarray) -> None:
        self.size = int(round(size * _EXTENT))
        self.g = ((np.arange(self.size, dtype=np.float32) + 0.5) / self.size * 2 - 1) * _EXTENT
        self.squeeze = np.asarray(squeeze, np.float32)
        self.u = self.g[None, None, :] / _v(self.squeeze)  # (B, 1, S): yaw squeezes the face horizontally
        self.v = self.g[None, :, None]  # (1, S, 1)
        self.px = np.float32(2.0 / size)  # one output pixel in canonical units: the anti-aliasing width
        self.layer = np.zeros((4, n, self.size, self.size), np.float32)  # one block: no copy before warping
        self.P, self.A = self.layer[:3], self.layer[3]

    def _span(self, lo: float, hi: float) -> slice:
        to_index = lambda t: (t / _EXTENT + 1) / 2 * self.size  # noqa: E731
        i0 = int(np.clip(np.floor(to_index(lo - 3 * self.px)), 0, self.size))
        i1 = int(np.clip(np.ceil(to_index(hi + 3 * self.px)), 0, self.size))
        return slice(i0, max(i0, i1))

    def region(self, u_lo: Any, u_hi: Any, v_lo: Any, v_hi: Any, idx: slice = _ALL) -> _Region:
        """The window holding ``u in [u_lo, u_hi]``, ``v in [v_lo, v_hi]`` for every image of ``idx``."""
        sq = self.squeeze[idx]
        g_lo = float(np.min(np.asarray(u_lo) * sq))  # column j holds u = g_j / squeeze
        g_hi = float(np.max(np.asarray(u_hi) * sq))
        return _Region(idx, self._span(float(np.min(v_lo)), float(np.max(v_hi))), self._span(g_lo, g_hi))

    def U(self, r: _Region) -> np.ndarray:
        return self.u[r.idx, :, r.cols]  # (b, 1, C)

    def V(self, r: _Region) -> np.ndarray:
        return self.v[:, r.rows]  # (1, R, 1)

    def soft(self, d: np.ndarray) -> np.ndarray:
        """Coverage from a signed distance (negative inside), anti-aliased over one pixel."""
        return np.clip(0.5 - d / self.px, 0.0, 1.0)

    def ellipse(self, r: _Region, cu: Any, cv: Any, a: Any, b: Any) -> np.ndarray:
        """Soft mask (b, R, C) of axis-aligned ellipses; arguments per image of the region, or scalars."""
        u = self.U(r)
        cu, cv, a, b = (_v(np.broadcast_to(x, (u.shape[0],))) for x in (cu, cv, a, b))
        # near the boundary, (r^2 - 1) / 2 * min(a, b) approximates the signed distance
        k = 0.5 * np.minimum(a, b) / self.px
        du = ((u - cu) / a) ** 2 * k
        dv = (k + 0.5) - ((self.V(r) - cv) / b) ** 2 * k
        m = dv - du
        return np.clip(m, 0.0, 1.0, out=m)

    def paint(self, r: _Region, mask: np.ndarray, color: Any) -> None:
        """Premultiplied "over": ``P += m (c - P)``, ``A += m (1 - A)``; color (b, 3) or (3,)."""
        A = self.A[r.idx, r.rows, r.cols]
        color = np.broadcast_to(np.asarray(color, np.float32), (A.shape[0], 3))
        tmp = np.empty(A.shape, np.float32)
        for ch in range(3):  # per channel, in place: much less memory traffic than one big expression
            P = self.P[ch, r.idx, r.rows, r.cols]
            np.subtract(_v(color[:, ch]), P, out=tmp)
            tmp *= mask
            P += tmp
        np.subtract(1.0, A, out=tmp)
        tmp *= mask
        A += tmp


def _draw_face(ident: dict[str, np.ndarray], samp: dict[str, np.ndarray], size: int) -> _Layer:
    """Every identity feature and the expression, upright; returns the layer."""
    p = {**ident, **samp}
    n = len(samp["rot"])
    yaw = p["yaw"]
    L = _Layer(n, size, 1 - 0.12 * np.abs(yaw))
    px, E = L.px, _EXTENT
    shift = 0.12 * yaw  # inner features slide towards the turned side (a 2.5-D yaw), the nose a bit more
    pitch = p["pitch"]
    fw, fh, jaw, cv = p["face_w"], p["face_h"], p["jaw"], np.float32(0.08)
    skin, hair = p["skin"], p["hair"]

    # hair behind the head: the head ellipse grown by the hair volume, plus long hair down the sides
    vol, hl = p["hair_volume"], p["hair_length"]
    hairy = np.flatnonzero(p["hairline"] > -1.5)
    full = L.region(-E, E, -E, E)
    head = L.ellipse(full, 0.0, cv - 0.03, fw + 0.04 + vol, fh + 0.04 + vol)
    if hairy.size:
        sides = L.soft(np.abs(L.u) - _v(fw + 0.05 + 0.6 * vol)) * L.soft(np.maximum(L.v - _v(hl), -0.2 - L.v))
        sides *= _v(hl > 0.0)
        back = np.maximum(head, sides, out=sides)
        back *= _v(p["hairline"] > -1.5)
        for ch in range(3):  # the layer is still empty: painting is a plain write
            np.multiply(back, _v(hair[:, ch]), out=L.P[ch])
        L.A[:] = back
    # ears
    for side in (-1.0, 1.0):
        cu = side * fw * 0.97 + 0.3 * shift
        r = L.region(cu - p["ear"], cu + p["ear"], 0.05 - p["ear"], 0.05 + p["ear"])
        L.paint(r, L.ellipse(r, cu, 0.05, p["ear"] * 0.5, p["ear"]), skin * 0.88)
    # face oval narrowing towards the chin by `jaw`, shaded towards its border so it reads as a volume
    t = np.clip((L.v - _v(cv)) / _v(fh), 0.0, 1.0)
    width = _v(fw) * (1 - _v(jaw) * t**2)  # (B, S, 1)
    r2 = (L.u / width) ** 2
    r2 += ((L.v - _v(cv)) / _v(fh)) ** 2
    k = 0.5 * width / px
    face = np.clip((0.5 + k) - r2 * k, 0.0, 1.0)
    np.minimum(r2, 1.0, out=r2)
    shade = 1.0 - 0.25 * r2 * r2
    tmp = np.empty_like(face)
    for ch in range(3):
        np.multiply(shade, _v(skin[:, ch]), out=tmp)
        tmp -= L.P[ch]
        tmp *= face
        L.P[ch] += tmp
    np.subtract(1.0, L.A, out=tmp)
    tmp *= face
    L.A += tmp

    # cheeks
    for side in (-1.0, 1.0):
        r = L.region(side * 0.42 + shift - 0.16, side * 0.42 + shift + 0.16, 0.14 + pitch, 0.36 + pitch)
        m = L.ellipse(r, side * 0.42 + shift, 0.25 + pitch, 0.15, 0.1) * _v(p["blush"])
        L.paint(r, m * face[:, r.rows, r.cols], [0.85, 0.35, 0.35])
    # beard below the mouth line, moustache above the lips (drawn one image at a time: few have them)
    my, mw, lt = p["mouth_y"] + pitch, p["mouth_w"], p["lip_t"]
    for i in np.flatnonzero(p["beard"] > 0):
        one = slice(i, i + 1)
        r = L.region(-fw[i], fw[i], my[i] - 0.15, E, one)
        m = L.soft(my[i] - 0.1 - L.V(r)) * face[one, r.rows, r.cols] * p["beard"][i]
        L.paint(r, m, hair[one] * 0.8)
        if p["moustache"][i] > 0:
            cu, cv_m, a = shift[i], my[i] - lt[i] - 0.045, mw[i] * 1.1
            r = L.region(cu - a, cu + a, cv_m - 0.05, cv_m + 0.05, one)
            L.paint(r, L.ellipse(r, cu, cv_m, a, 0.045) * p["moustache"][i], hair[one] * 0.8)
    # nose: a ridge shadow on the side away from the light, the tip and the nostrils
    ey = p["eye_y"] + pitch
    nl, nw = p["nose_len"], p["nose_w"]
    nu = shift + 0.06 * yaw
    r = L.region(nu - 1.2 * nw, nu + 1.2 * nw, ey + 0.05, ey + nl + nw)
    U, V = L.U(r), L.V(r)
    away = np.sign(np.cos(p["light_dir"]) + 1e-3)
    ridge = L.soft(np.abs(U - _v(nu + 0.6 * nw * away)) - 0.018)
    ridge = ridge * L.soft(np.maximum(V - _v(ey + nl), _v(ey + 0.08) - V)) * 0.3
    L.paint(r, ridge, skin * 0.7)
    L.paint(r, L.ellipse(r, nu, ey + nl, nw, nw * 0.55) * 0.5, skin * 0.8)
    for side in (-1.0, 1.0):
        L.paint(r, L.ellipse(r, nu + side * nw * 0.6, ey + nl + nw * 0.3, nw * 0.32, nw * 0.2), skin * 0.35)
    # mouth: lips around a parabola whose curvature is the expression; an open mouth shows a dark gap
    r = L.region(shift - mw, shift + mw, my - 0.13, my + 0.13)
    U, V = L.U(r), L.V(r)
    q = np.clip((U - _v(shift)) / _v(mw), -1.0, 1.0)
    env = np.sqrt(1.0 - q**2)
    curve = _v(my) - _v(p["smile"]) * 0.07 * (1.0 - q**2)
    opening = _v(p["mouth_open"]) * 0.07 * env
    inside = L.soft(np.abs(U - _v(shift)) - _v(mw))
    dist = np.abs(V - curve)
    L.paint(r, L.soft(dist - (_v(lt) + opening) * env) * inside, p["lip"])
    if np.any(p["mouth_open"] > 0.05):
        L.paint(r, L.soft(dist - opening * 0.8) * inside * (opening > 0.003), [0.18, 0.05, 0.06])
    # eyes (white, iris with gaze, pupil, upper lid) and eyebrows
    ew, eh = p["eye_w"], p["eye_h"] * p["eye_open"]
    brow_v = ey - p["eye_h"] - p["brow_gap"] - p["brow_raise"]
    bl = ew * p["brow_len"]
    for side in (-1.0, 1.0):
        ex = side * p["eye_dx"] + shift
        r = L.region(ex - ew, ex + ew, ey - eh, ey + eh)
        white = L.ellipse(r, ex, ey, ew, eh)
        L.paint(r, white, [0.95, 0.94, 0.92])
        ir = p["eye_h"] * p["iris_r"] * 1.3
        iu = ex + p["gaze"] * ew * 0.4
        L.paint(r, L.ellipse(r, iu, ey, ir, ir) * white, p["iris"])
        L.paint(r, L.ellipse(r, iu, ey, ir * 0.45, ir * 0.45) * white, [0.02, 0.02, 0.02])
        lid = L.ellipse(r, ex, ey, ew + 1.5 * px, eh + 1.5 * px) - white
        L.paint(r, lid * (L.V(r) < _v(ey)) * 0.8, skin * 0.35)
        r = L.region(ex - bl, ex + bl, brow_v - 0.1, brow_v + 0.1)
        U, V = L.U(r), L.V(r)
        bq = np.clip((U - _v(ex)) / _v(bl), -1.0, 1.0)
        bv = _v(brow_v) - _v(p["brow_arch"]) * 0.03 * (1 - bq**2) + _v(p["brow_slope"]) * 0.04 * bq * side
        brow = L.soft(np.abs(V - bv) - _v(p["brow_thick"]) * (1 - 0.5 * bq**2))
        L.paint(r, brow * L.soft(np.abs(U - _v(ex)) - _v(bl)) * 0.9, hair * 0.7)
    # mole
    for i in np.flatnonzero(p["mole_r"] > 0):
        one, mr, mu, mv = slice(i, i + 1), p["mole_r"][i], p["mole_u"][i] + shift[i], p["mole_v"][i] + pitch[i]
        r = L.region(mu - mr, mu + mr, mv - mr, mv + mr, one)
        L.paint(r, L.ellipse(r, mu, mv, mr, mr) * face[one, r.rows, r.cols], skin[one] * 0.4)
    # hair over the forehead: the grown head ellipse above a wavy hairline
    if hairy.size:
        hline = _v(p["hairline"]) + 0.06 * _v(p["fringe"]) * np.sin(6 * L.u + _v(p["fringe_phase"]))
        hline += 0.3 * np.clip(np.abs(L.u) / _v(fw) - 0.6, 0, 1) * _v(hl + 0.4)
        r = L.region(-E, E, -E, float(np.max(hline)) + 0.05)
        m = head[:, r.rows] * L.soft(L.V(r) - hline) * _v(p["hairline"] > -1.5)
        L.paint(r, m, hair)
    # occluders attached to the face: 1 sunglasses, 2 a face mask, 3 a blob
    for i in np.flatnonzero(p["occluder"] > 0):
        one, kind, color = slice(i, i + 1), p["occluder"][i], p["occ_color"][i]
        if kind == 1:
            half = p["eye_dx"][i] + 0.2
            r = L.region(shift[i] - half, shift[i] + half, ey[i] - 0.1, ey[i] + 0.1, one)
            band = L.soft(np.abs(L.V(r) - ey[i]) - 0.09) * L.soft(np.abs(L.U(r) - shift[i]) - half)
            L.paint(r, band, color)
        elif kind == 2:
            r = L.region(-fw[i], fw[i], ey[i] + nl[i] - 0.06, E, one)
            cover = L.soft(np.abs(L.U(r)) - fw[i] * 0.95) * L.soft(ey[i] + nl[i] - 0.05 - L.V(r))
            L.paint(r, cover * face[one, r.rows, r.cols], color)
        else:
            cu, cv_o = p["occ_u"][i], p["occ_v"][i]
            r = L.region(cu - 0.3, cu + 0.3, cv_o - 0.22, cv_o + 0.22, one)
            L.paint(r, L.ellipse(r, cu, cv_o, 0.3, 0.22), color)
    return L


def _render(ident: dict[str, np.ndarray], samp: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Draw a batch: per-image identity and nuisance parameters -> float32 (3, B, H, W) in [0, 255]
    (before noise and clipping)."""
    import torch.nn.functional as F

    n = len(samp["rot"])
    L = _draw_face(ident, samp, size)
    g = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    gx, gy = g[None, None, :], g[None, :, None]
    # pose: image coords -> canonical coords in grid_sample's [-1, 1] units (undo translation, rotation, scale)
    c, s, sc = np.cos(samp["rot"]), np.sin(samp["rot"]), samp["scale"] * _EXTENT
    x, y = gx - _v(samp["tx"]), gy - _v(samp["ty"])
    grid = np.empty((n, size, size, 2), np.float32)
    grid[..., 0] = _v(c / sc) * x + _v(s / sc) * y
    grid[..., 1] = _v(-s / sc) * x + _v(c / sc) * y
    layer = torch.from_numpy(L.layer).permute(1, 0, 2, 3)
    warped = F.grid_sample(layer, torch.from_numpy(grid), mode="bilinear", padding_mode="zeros", align_corners=False)
    warped = warped.numpy()  # (B, 4, H, W)

    # background (a two-colour gradient) under the face, then the light: a directional gradient,
    # brightness and a colour cast; 255 is folded into the light
    bd, ld = samp["bg_dir"], samp["light_dir"]
    clear = 1.0 - warped[:, 3]
    ramp = np.clip(0.5 + 0.5 * (_v(np.cos(bd)) * gx + _v(np.sin(bd)) * gy), 0, 1)
    ramp *= clear
    light = (1 + _v(samp["light_amp"]) * (_v(np.cos(ld)) * gx + _v(np.sin(ld)) * gy)) * _v(255 * samp["bright"])
    img = np.empty((3, n, size, size), np.float32)
    for ch in range(3):
        bg0, bg1 = samp["bg"][:, ch], samp["bg2"][:, ch]
        out = img[ch]
        np.multiply(clear, _v(bg0), out=out)  # (1 - A) (bg0 + ramp (bg1 - bg0)) + P
        out += ramp * _v(bg1 - bg0)
        out += warped[:, ch]
        out *= light
        out *= _v(1 + samp["cast"][:, ch])
    # blur: a separable 3-tap box, mixed in per image (only the images that have some)
    blurred = np.flatnonzero(samp["blur"] > 0)
    if blurred.size:
        sub = img[:, blurred]
        sm = sub.copy()
        sm[:, :, 1:-1] += sub[:, :, :-2]
        sm[:, :, 1:-1] += sub[:, :, 2:]
        sm2 = sm.copy()
        sm2[..., 1:-1] += sm[..., :-2]
        sm2[..., 1:-1] += sm[..., 2:]
        sm2 *= np.float32(1 / 9)  # the border rows/columns are only approximately normalised; they are background
        sm2 -= sub
        sm2 *= samp["blur"][blurred][None, :, None, None]
        img[:, blurred] = sub + sm2
    return img


def _to_uint8(img: np.ndarray, noise: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add sensor-like noise (shared by the channels: a third of the random numbers) and quantise."""
    grain = rng.standard_normal(img.shape[1:], dtype=np.float32)
    grain *= _v(noise * 255)
    grain += 0.5
    img += grain
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


def _render_jpegs(
    ident: dict[str, np.ndarray], samp: dict[str, np.ndarray], size: int, rng: np.random.Generator
) -> list[bytes]:
    """Draw and JPEG-encode images (identity params already gathered per image), in batches."""
    from torchvision.io import encode_jpeg

    out: list[bytes] = []
    n = len(samp["rot"])
    for start in range(0, n, _BATCH):
        sl = slice(start, min(start + _BATCH, n))
        img = _render({k: a[sl] for k, a in ident.items()}, {k: a[sl] for k, a in samp.items()}, size)
        pixels = torch.from_numpy(_to_uint8(img, samp["noise"][sl], rng)).permute(1, 0, 2, 3)
        for x, q in zip(pixels, samp["quality"][sl]):
            out.append(bytes(encode_jpeg(x.contiguous(), quality=int(q)).numpy()))
    return out


# ------------------------------------------------------------------------------------------ generation


def _knob_scales(difficulty: float, knobs: dict[str, Any]) -> tuple[dict[str, float], float]:
    valid = {f.name for f in fields(DemoKnobs)}
    for key in knobs:
        if key not in valid:
            raise ConfigError(f"demo: unknown knob {key!r} (valid: {', '.join(sorted(valid))})")
    k = asdict(DemoKnobs(**{key: float(v) for key, v in knobs.items()}))
    if difficulty <= 0:
        raise ConfigError(f"demo: difficulty must be > 0, got {difficulty}")
    d = difficulty * _DIFFICULTY_SCALE
    scale = {name: d * k[name] for name in ("pose", "expression", "lighting", "degradation", "occlusion")}
    # between-identity spread shrinks as difficulty grows
    spread = k["identity_spread"] / (0.5 + 0.5 * d)
    return scale, spread


def _streams(seed: int) -> list[np.random.Generator]:
    # independent streams, so that e.g. the val set does not change when num_identities does
    return [np.random.default_rng([seed, FORMAT_VERSION, i]) for i in range(7)]


def identity_parameters(
    seed: int, num_identities: int, num_val_identities: int, difficulty: float = 1.0, **knobs: Any
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The shape and colour parameters of the training and of the held-out identities (one row each).

    The two sets come from separate random streams: no held-out identity is a training identity.
    """
    _, spread = _knob_scales(difficulty, knobs)
    streams = _streams(seed)
    return _identity_params(streams[0], num_identities, spread), _identity_params(
        streams[1], num_val_identities, spread
    )


def _gather(params: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in params.items()}


def generate_demo_dataset(
    out_dir: str | os.PathLike,
    num_identities: int = 250,
    images_per_identity: int = 40,
    num_val_identities: int = 200,
    num_val_pairs: int = 2000,
    image_size: int = 112,
    seed: int = 0,
    difficulty: float = 1.0,
    overwrite: bool = False,
    **knobs: Any,
) -> Path:
    """Write a demo face dataset to ``out_dir`` and return it.

    Contents: ``train.rec``/``train.idx``/``property`` (``num_identities`` x ``images_per_identity``
    images, labels grouped), ``demo_val.bin`` (``num_val_pairs`` pairs from ``num_val_identities``
    held-out identities, half same, half different, in shuffled order) and ``demo.json`` (the
    parameters). Byte-identical for the same arguments. Built in a temporary sibling folder and renamed
    at the end, so an interrupted run leaves nothing behind. ``knobs``: see :class:`DemoKnobs`.
    """
    from timmface.data.bin import write_bin
    from timmface.data.recordio import RecordIOWriter

    out = Path(out_dir)
    if num_identities < 2 or images_per_identity < 1:
        raise ConfigError("demo: need num_identities >= 2 and images_per_identity >= 1")
    if num_val_pairs > 0 and num_val_identities < 2:
        raise ConfigError("demo: num_val_pairs > 0 needs num_val_identities >= 2")
    if out.exists() and not overwrite:
        raise DataError(f"{out}: already exists (pass overwrite=True to replace it)")
    scale, spread = _knob_scales(difficulty, knobs)
    t0 = time.perf_counter()
    params = dict(
        num_identities=num_identities,
        images_per_identity=images_per_identity,
        num_val_identities=num_val_identities,
        num_val_pairs=num_val_pairs,
        image_size=image_size,
        seed=seed,
        difficulty=difficulty,
        knobs=asdict(DemoKnobs(**{k: float(v) for k, v in knobs.items()})),
        format_version=FORMAT_VERSION,
    )
    streams = _streams(seed)
    train_ids, val_ids = identity_parameters(seed, num_identities, num_val_identities, difficulty, **knobs)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    threads = torch.get_num_threads()
    # one thread: torch's intra-op threads only spin inside encode_jpeg/grid_sample on these small images
    torch.set_num_threads(1)
    try:
        labels = np.repeat(np.arange(num_identities), images_per_identity)
        with RecordIOWriter(tmp / "train", num_classes=num_identities, image_size=(image_size, image_size)) as w:
            for start in range(0, len(labels), 4096):  # bounded memory for big sets
                lab = labels[start : start + 4096]
                samp = _sample_params(streams[2], len(lab), scale)
                for jpeg, label in zip(_render_jpegs(_gather(train_ids, lab), samp, image_size, streams[3]), lab):
                    w.add(jpeg, int(label))
        for name in ("train.rec", "train.idx", "property"):
            os.replace(tmp / "train" / name, tmp / name)
        (tmp / "train").rmdir()
        if num_val_pairs > 0:
            left, right, issame = _val_pairs(streams[4], num_val_identities, num_val_pairs)
            order = np.stack([left, right], axis=1).ravel()
            samp = _sample_params(streams[5], len(order), scale)
            images = _render_jpegs(_gather(val_ids, order), samp, image_size, streams[6])
            write_bin(tmp / "demo_val.bin", images, issame.tolist())
        params["seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / "demo.json").write_text(json.dumps(params, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    return out


_GENERATE_SIGNATURE = inspect.signature(generate_demo_dataset)


def _val_pairs(rng: np.random.Generator, num_ids: int, num_pairs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(left identity, right identity, issame)`` for ``num_pairs`` pairs: half same (floor), the rest
    between two different identities, shuffled so every contiguous fold mixes both kinds."""
    n_same = num_pairs // 2
    n_diff = num_pairs - n_same
    same = rng.integers(0, num_ids, n_same)
    a = rng.integers(0, num_ids, n_diff)
    b = (a + rng.integers(1, num_ids, n_diff)) % num_ids  # never equal to a
    left = np.concatenate([same, a])
    right = np.concatenate([same, b])
    issame = np.concatenate([np.ones(n_same, bool), np.zeros(n_diff, bool)])
    perm = rng.permutation(num_pairs)
    return left[perm], right[perm], issame[perm]


def demo_key(**params: Any) -> str:
    """A short hash of the generation parameters (defaults filled in, so that spelling a default out
    does not change it) and the format version: the cache folder name."""
    bound = _GENERATE_SIGNATURE.bind("out", **params)
    bound.apply_defaults()
    _knob_scales(float(bound.arguments["difficulty"]), bound.arguments.get("knobs", {}))  # unknown knobs fail here
    full = {k: v for k, v in bound.arguments.items() if k not in ("out_dir", "overwrite", "knobs")}
    full.update(asdict(DemoKnobs(**{k: float(v) for k, v in bound.arguments.get("knobs", {}).items()})))
    blob = json.dumps({"format_version": FORMAT_VERSION, **full}, sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


def load_or_generate_demo(cache_dir: str | os.PathLike, **params: Any) -> Path:
    """The cached demo folder for ``params`` under ``cache_dir`` (``<cache_dir>/<hash>``), generated if
    missing. Safe when several processes call it at once: each generates into its own temporary
    folder and renames it into place; a process that loses the race uses the winner's folder."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / demo_key(**params)
    if (target / "demo.json").is_file():
        return target
    lock = cache / f".{target.name}.lock"
    with _file_lock(lock):
        if (target / "demo.json").is_file():  # another process finished while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".gen", dir=cache))
        try:
            built = generate_demo_dataset(staging / "ds", **params)
            try:
                os.rename(built, target)
            except OSError:
                if not (target / "demo.json").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Any:
    """An exclusive ``flock`` where available (POSIX); elsewhere the atomic rename alone protects us."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
