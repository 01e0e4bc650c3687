"""Five-point face alignment to the ArcFace 112x112 crop, in numpy + torch (no OpenCV / scikit-image).

The reference pipeline (insightface ``python-package/insightface/utils/face_align.py``, and the IJB scripts
``recognition/arcface_torch/eval_ijbc.py`` / AdaFace ``validation_mixed/insightface_ijb_helper/dataloader.py``)
estimates a similarity transform from the detected landmarks to :data:`ARCFACE_REF_112` with
``skimage.transform.SimilarityTransform.estimate`` (Umeyama's least squares) and resamples with
``cv2.warpAffine(img, M, (112, 112), borderValue=0)`` (bilinear, constant-zero border). This module does the same:

* :func:`estimate_similarity` is Umeyama (1991) with the reflection correction, i.e. it always returns a proper
  rotation + uniform scale + translation, as skimage does.
* :func:`warp_affine` follows OpenCV's pixel convention: pixel ``(x, y)`` has its centre at integer coordinates, and
  output pixel ``(x, y)`` samples the input at ``M^-1 (x, y, 1)``. Values outside the input blend with 0. OpenCV
  quantises coordinates to 1/32 px and weights to 15 bits, so results can differ from it by a grey level or so.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

# (x, y) of left eye, right eye, nose tip, left and right mouth corner in the 112x112 ArcFace crop: insightface's
# `arcface_src`; the IJB scripts write the same points as the 96x112 template plus 8 px in x.
ARCFACE_REF_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (scale, rotation, translation) that maps ``src`` onto ``dst``.

    Args:
        src: (K, 2) points, K >= 2, e.g. detected landmarks in the loose crop.
        dst: (K, 2) target points, e.g. :data:`ARCFACE_REF_112`.

    Returns:
        (2, 3) float64 matrix ``M`` with ``dst ~ M @ [x, y, 1]``; it never contains a reflection (Umeyama's
        correction flips the sign of the smallest singular direction instead). Degenerate input (all ``src`` points
        equal) gives a matrix of NaNs, as skimage does.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"estimate_similarity needs two (K, 2) arrays with K >= 2, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var == 0:
        return np.full((2, 3), np.nan)

    # Umeyama, "Least-squares estimation of transformation parameters between two point patterns", eqs. 38-43.
    cov = dst_c.T @ src_c / len(src)
    u, sing, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0  # the best orthogonal map would be a reflection: take the best rotation instead
    rot = u @ np.diag(d) @ vt
    scale = (sing * d).sum() / src_var
    m = np.empty((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = dst_mean - m[:, :2] @ src_mean
    return m


def _invert_affine(m: torch.Tensor) -> torch.Tensor:
    """(..., 2, 3) affine maps -> their (..., 2, 3) inverses."""
    lin, t = m[..., :2], m[..., 2:]
    inv = torch.linalg.inv(lin)
    return torch.cat([inv, -inv @ t], dim=-1)


def warp_affine(
    image: torch.Tensor,
    m: np.ndarray | torch.Tensor,
    out_size: tuple[int, int] = (112, 112),
    mode: Literal["bilinear", "bicubic"] = "bilinear",
) -> torch.Tensor:
    """Affine warp with OpenCV ``warpAffine`` semantics (``INTER_LINEAR`` / ``INTER_CUBIC``, constant 0 border).

    Args:
        image: uint8 (C, H, W) or (N, C, H, W).
        m: (2, 3) or (N, 2, 3) forward map from input pixel coordinates to output pixel coordinates (the matrix
            ``cv2.warpAffine`` takes without ``WARP_INVERSE_MAP``).
        out_size: (height, width) of the output.
        mode: "bilinear" (the insightface / AdaFace scripts) or "bicubic" (timm-face's ``test_ijb.py``; grid_sample's
            cubic kernel has OpenCV's a = -0.75).

    Returns:
        uint8 (C, out_h, out_w) or (N, C, out_h, out_w), rounded to nearest.
    """
    if image.dtype != torch.uint8 or image.ndim not in (3, 4):
        raise ValueError(
            f"warp_affine needs a uint8 (C, H, W) or (N, C, H, W) tensor, got {image.dtype} {tuple(image.shape)}"
        )
    batched = image.ndim == 4
    x = image if batched else image[None]
    n, _, h, w = x.shape
    out_h, out_w = out_size

    # Geometry in float64 so integer shifts and quarter turns land exactly on pixel centres.
    m = torch.as_tensor(m, dtype=torch.float64, device="cpu").reshape(-1, 2, 3).expand(n, 2, 3)
    inv = _invert_affine(m)
    ys, xs = torch.meshgrid(
        torch.arange(out_h, dtype=torch.float64), torch.arange(out_w, dtype=torch.float64), indexing="ij"
    )
    dst = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(1, -1, 3)  # (1, out_h*out_w, 3)
    src = dst @ inv.transpose(1, 2)  # (N, out_h*out_w, 2) input coordinates, pixel centres at integers

    # Convert only the part of the input the samples can reach (a bicubic tap reaches floor(x)-1 .. floor(x)+2): big
    # loose crops then cost no more than small ones, and zero padding is unchanged.
    lo = (src.amin(dim=(0, 1)).floor() - 2).clamp(min=0)
    hi = (src.amax(dim=(0, 1)).ceil() + 3).clamp(max=torch.tensor([w, h], dtype=torch.float64))
    x0, y0, x1, y1 = int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1])
    if x1 <= x0 or y1 <= y0:  # every sample falls outside the input
        out = torch.zeros(n, x.shape[1], out_h, out_w, dtype=torch.uint8, device=x.device)
        return out if batched else out[0]
    x, src = x[:, :, y0:y1, x0:x1], src - torch.tensor([x0, y0], dtype=torch.float64)
    h, w = y1 - y0, x1 - x0
    # grid_sample with align_corners=False puts -1 / +1 on the outer pixel *edges*, so centre x maps to (2x+1)/W-1.
    size = torch.tensor([w, h], dtype=torch.float64)
    grid = ((2 * src + 1) / size - 1).reshape(n, out_h, out_w, 2).to(torch.float32)
    out = F.grid_sample(
        x.to(torch.float32),
        grid.to(x.device),
        mode=mode,
        padding_mode="zeros",
        align_corners=False,
    )
    out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out if batched else out[0]


def align_face(
    image: torch.Tensor, landmarks5: np.ndarray | torch.Tensor, mode: Literal["bilinear", "bicubic"] = "bilinear"
) -> torch.Tensor:
    """Warp a loose face crop to the 112x112 ArcFace crop given its five landmarks.

    Args:
        image: uint8 (3, H, W) RGB.
        landmarks5: (5, 2) (x, y) pixel coordinates in ``image``, ordered as :data:`ARCFACE_REF_112`.
        mode: resampling, see :func:`warp_affine`.

    Returns:
        uint8 (3, 112, 112).

    Raises:
        ValueError: landmarks that admit no transform (all five at one point).
    """
    lmk = np.asarray(landmarks5, dtype=np.float64).reshape(5, 2)
    m = estimate_similarity(lmk, ARCFACE_REF_112)
    if not np.isfinite(m).all() or abs(np.linalg.det(m[:, :2])) < 1e-12:
        raise ValueError(f"degenerate landmarks {lmk.tolist()}: no similarity transform")
    return warp_affine(image, m, (112, 112), mode)
