"""IJB-B / IJB-C 1:1 template verification, following the insightface and AdaFace evaluation scripts.

Data layout (insightface ``IJB_release``; AdaFace and timm-face read the same files)::

    <root>/IJBC/loose_crop/1.jpg ... 469375.jpg
    <root>/IJBC/meta/ijbc_name_5pts_score.txt      "1.jpg x1 y1 ... x5 y5 score"  (one line per image)
    <root>/IJBC/meta/ijbc_face_tid_mid.txt         "1.jpg 1 69544"  image, template id, media id
    <root>/IJBC/meta/ijbc_template_pair_label.txt  "1 11065 1"      template 1, template 2, genuine (1) / impostor (0)

(``ijbb_`` for IJB-B; ``root`` may also be the ``IJBC`` folder itself, and ``meta_dir`` may point at the separately
released "updated meta" folder, which holds ``IJBC_meta/ijbc_*.txt``.) Landmarks are (x, y) pixels in the loose crop
in the order left eye, right eye, nose, left mouth corner, right mouth corner; the last column is the detector's
faceness score. IJB-C has 469,375 images, 23,124 templates, 15,658,489 pairs (19,557 genuine); IJB-B 227,630 images,
12,115 templates, 8,010,270 pairs (10,270 genuine).

Protocol (``recognition/arcface_torch/eval_ijbc.py`` and ``_evaluation_/ijb/ijb_onnx.py``; AdaFace
``validation_mixed/validate_IJB_BC.py`` with ``insightface_ijb_helper/eval_helper.py``):

1. align each loose crop to 112x112 with its five landmarks (:func:`~timmface.evaluation.align.align_face`);
2. embed it; with flip TTA the image feature is ``f(x) + f(flip(x))`` (insightface "F2", AdaFace's default
   ``pre_norm_vector_add``, which rebuilds the same sum from AdaFace's ``(x/|x|, |x|)`` output);
3. "norm fusion" keeps that feature unnormalised so its norm weights it in the pooling (insightface ``use_norm_score``
   "N1", AdaFace ``pre_norm_vector_add``); without it every image feature is L2-normalised first ("N0", and
   timm-face's ``test_ijb.py``);
4. optionally multiply by the faceness score (insightface ``use_detector_score`` "D1"; AdaFace and timm-face do not);
5. per template, average the features of each media (one video's frames, or one still), sum the media means, and
   L2-normalise (``image2template_feature``);
6. the score of a pair is the cosine of the two template features (``verification``);
7. ROC as ``sklearn.metrics.roc_curve(label, score)`` (default ``drop_intermediate=True``), and TAR@FAR as in
   ``write_result``: on the ROC points, the TPR of the point whose FPR is nearest the target, and among equally near
   points the one with the largest TPR (the scripts flip the arrays and take the first minimum, "select largest tpr
   at same fpr"). timm-face's ``np.argmin`` on the unflipped arrays takes the *smallest* TPR at a tied FPR instead.
   Both are reproduced by :func:`roc_curve` / :func:`tar_at_far` without scikit-learn.

This file is that one protocol, in pipeline order: protocol variants (:class:`IJBProtocol`), reading the metadata
(:func:`load_ijb_meta`), images -> embeddings (:func:`embed_ijb_images`), image -> template features -> pair scores
(:func:`pool_templates`, :func:`score_pairs`), ROC and TAR@FAR, and :func:`evaluate_ijb`, which runs them all.
Alignment is in :mod:`timmface.evaluation.align`.

The reference scripts stop on an unreadable image; here it is counted and its template pooled from the rest. A template
that loses every image has no feature: its pairs are excluded from the ROC and counted in
:attr:`IJBResult.n_pairs_excluded`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from timmface.errors import DataError
from timmface.evaluation.align import align_face

__all__ = [
    "FARS",
    "IJBAlignedDataset",
    "IJBMeta",
    "IJBProtocol",
    "IJBResult",
    "PROTOCOLS",
    "embed_ijb_images",
    "evaluate_ijb",
    "image_features",
    "load_ijb_meta",
    "make_embed_fn",
    "pick_scoring_method",
    "pool_templates",
    "roc_curve",
    "save_roc_png",
    "score_pairs",
    "tar_at_far",
    "verify_templates",
]

log = logging.getLogger(__name__)

IJB_SETS = ("IJBB", "IJBC")
FARS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # the columns of the reference TPR@FPR table

EmbedFn = Callable[[Tensor], Tensor]
"""uint8 ``N x 3 x 112 x 112`` RGB -> float ``N x D`` (any device)."""


# --------------------------------------------------------------------------------------------------
# Protocol variants
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IJBProtocol:
    """Which of the reference scripts' test-time options to use (see the module docstring)."""

    flip: bool = True
    """Image feature = embedding of the image + embedding of its horizontal mirror."""
    norm_fusion: bool = True
    """Keep image features unnormalised, so their norms weight the pooling; else L2-normalise each first."""
    detector_score: bool = True
    """Multiply each image feature by the detector's faceness score (last column of ``*_name_5pts_score.txt``)."""
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    """Alignment resampling: ``cv2.warpAffine``'s default bilinear (insightface, AdaFace) or bicubic (timm-face)."""

    def describe(self, set_name: str) -> str:
        """E.g. ``"IJBC 1:1, flip TTA, norm fusion, detector score"``."""
        parts = [
            f"{set_name} 1:1",
            "flip TTA" if self.flip else "no flip",
            "norm fusion" if self.norm_fusion else "L2-normalised images",
            "detector score" if self.detector_score else "no detector score",
        ]
        if self.interpolation != "bilinear":
            parts.append(f"{self.interpolation} alignment")
        return ", ".join(parts)


PROTOCOLS: dict[str, IJBProtocol] = {
    # eval_ijbc.py / ijb_onnx.py defaults: use_flip_test, use_norm_score, use_detector_score all True
    "insightface": IJBProtocol(flip=True, norm_fusion=True, detector_score=True),
    # validate_IJB_BC.py defaults: use_flip_test=True, fusion_method=pre_norm_vector_add; no faceness weighting
    "adaface": IJBProtocol(flip=True, norm_fusion=True, detector_score=False),
    # timm-face test_ijb.py (its published table): no flip, F.normalize per image, no faceness weighting, and
    # cv2.estimateAffinePartial2D (all points inliers: the same least-squares similarity) + INTER_CUBIC warp
    "timm-face": IJBProtocol(flip=False, norm_fusion=False, detector_score=False, interpolation="bicubic"),
}


def _protocol(protocol: IJBProtocol | str) -> IJBProtocol:
    if isinstance(protocol, IJBProtocol):
        return protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown IJB protocol {protocol!r}; choose one of {sorted(PROTOCOLS)} or pass an IJBProtocol")
    return PROTOCOLS[protocol]


# --------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------


@dataclass
class IJBMeta:
    """The parsed metadata of one IJB set; image arrays are in the order of ``*_name_5pts_score.txt``."""

    set_name: str
    image_dir: Path
    names: list[str]
    """N image file names relative to ``image_dir``."""
    landmarks: np.ndarray
    """float32 (N, 5, 2) (x, y) pixels in the loose crop."""
    faceness: np.ndarray
    """float32 (N,) detector scores."""
    templates: np.ndarray
    """int64 (N,) template id of each image."""
    medias: np.ndarray
    """int64 (N,) media id of each image."""
    pair_t1: np.ndarray
    """int64 (P,) first template id of each pair."""
    pair_t2: np.ndarray
    """int64 (P,) second template id of each pair."""
    labels: np.ndarray
    """bool (P,) True for a genuine (same subject) pair."""
    pair_file: Path = field(default=Path())


def _find_file(folders: Sequence[Path], filename: str) -> Path | None:
    """The first ``folder/filename`` that exists, matching the name case-insensitively (``ijbc_`` vs ``IJBC_``)."""
    for folder in folders:
        if not folder.is_dir():
            continue
        exact = folder / filename
        if exact.is_file():
            return exact
        for candidate in sorted(folder.iterdir()):
            if candidate.name.lower() == filename.lower() and candidate.is_file():
                return candidate
    return None


def _set_dir(root: Path, set_name: str) -> Path:
    """``root/IJBC`` when it exists, else ``root`` itself when it holds ``loose_crop`` (the set folder was given)."""
    for candidate in (root / set_name, root / set_name.lower(), root):
        if (candidate / "loose_crop").is_dir():
            return candidate
    raise DataError(f"{root}: no {set_name}/loose_crop folder (expected <root>/{set_name}/loose_crop/*.jpg)")


def _read_landmarks(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    names: list[str] = []
    values: list[list[float]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 12:
                raise DataError(
                    f"{path}:{lineno}: expected 12 fields (image, 10 landmark coordinates, score), got {len(fields)}"
                )
            try:
                values.append([float(v) for v in fields[1:]])
            except ValueError:
                raise DataError(f"{path}:{lineno}: landmark or score is not a number: {line.strip()!r}") from None
            names.append(fields[0])
    if not names:
        raise DataError(f"{path}: no landmark rows")
    arr = np.asarray(values, dtype=np.float32)
    return names, arr[:, :10].reshape(-1, 5, 2), arr[:, 10]


def _read_template_media(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    names: list[str] = []
    ids: list[tuple[int, int]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 3:
                raise DataError(f"{path}:{lineno}: expected 3 fields (image, template id, media id), got {len(fields)}")
            try:
                ids.append((int(fields[1]), int(fields[2])))
            except ValueError:
                raise DataError(f"{path}:{lineno}: template or media id is not an integer: {line.strip()!r}") from None
            names.append(fields[0])
    if not names:
        raise DataError(f"{path}: no image rows")
    arr = np.asarray(ids, dtype=np.int64)
    return names, arr[:, 0], arr[:, 1]


def _read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        # numpy's C parser reads IJB-C's 15.7M lines in ~2 s; it names the row when a line has another column count
        arr = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise DataError(f"{path}: {str(e).splitlines()[0]}") from None
    if arr.shape[0] == 0:
        raise DataError(f"{path}: no pairs")
    if arr.shape[1] != 3:
        raise DataError(f"{path}: expected 3 columns (template 1, template 2, label), got {arr.shape[1]}")
    bad = np.flatnonzero((arr[:, 2] != 0) & (arr[:, 2] != 1))
    if len(bad):
        raise DataError(f"{path}:{bad[0] + 1}: label must be 0 or 1, got {arr[bad[0], 2]}")
    return arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].astype(bool)


def load_ijb_meta(root: str | Path, set_name: str = "IJBC", meta_dir: str | Path | None = None) -> IJBMeta:
    """Read and cross-check the three metadata files of ``set_name`` ("IJBB" or "IJBC") under ``root``.

    Raises:
        DataError: a missing folder or file, a malformed line, image lists that disagree between the landmark and
            template files, or pairs that name a template no image belongs to. The message names the file.
    """
    set_name = set_name.upper()
    if set_name not in IJB_SETS:
        raise ValueError(f"set_name must be one of {IJB_SETS}, got {set_name!r}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: IJB folder does not exist")
    set_dir = _set_dir(root, set_name)
    folders = [set_dir / "meta"]
    if meta_dir is not None:
        folders = [Path(meta_dir), Path(meta_dir) / f"{set_name}_meta", Path(meta_dir) / set_name / "meta", *folders]
    prefix = set_name.lower()
    paths = {}
    for key in ("name_5pts_score", "face_tid_mid", "template_pair_label"):
        path = _find_file(folders, f"{prefix}_{key}.txt")
        if path is None:
            raise DataError(f"{folders[-1] / f'{prefix}_{key}.txt'}: missing IJB metadata file")
        paths[key] = path

    names, landmarks, faceness = _read_landmarks(paths["name_5pts_score"])
    tm_names, templates, medias = _read_template_media(paths["face_tid_mid"])
    if len(tm_names) != len(names):
        raise DataError(
            f"{paths['name_5pts_score']}: {len(names)} landmark rows, but {paths['face_tid_mid'].name} lists "
            f"{len(tm_names)} images"
        )
    if tm_names != names:
        # The release lists both files in the same order (the reference scripts rely on it); accept any order.
        index = {name: i for i, name in enumerate(tm_names)}
        missing = next((n for n in names if n not in index), None)
        if missing is not None or len(index) != len(tm_names):
            what = f"has no row for {missing}" if missing is not None else "lists an image twice"
            raise DataError(f"{paths['face_tid_mid']}: {what} (compared with {paths['name_5pts_score'].name})")
        order = np.array([index[n] for n in names])
        templates, medias = templates[order], medias[order]

    t1, t2, labels = _read_pairs(paths["template_pair_label"])
    known = np.unique(templates)
    for col in (t1, t2):
        unknown = col[~np.isin(col, known)]
        if len(unknown):
            raise DataError(
                f"{paths['template_pair_label']}: template {unknown[0]} has no image in {paths['face_tid_mid'].name}"
            )
    return IJBMeta(
        set_name=set_name,
        image_dir=set_dir / "loose_crop",
        names=names,
        landmarks=landmarks,
        faceness=faceness,
        templates=templates,
        medias=medias,
        pair_t1=t1,
        pair_t2=t2,
        labels=labels,
        pair_file=paths["template_pair_label"],
    )


# --------------------------------------------------------------------------------------------------
# Images -> embeddings
# --------------------------------------------------------------------------------------------------


class IJBAlignedDataset(Dataset):
    """Decodes and aligns loose crops; plain data only, so it pickles into DataLoader workers (fork or spawn).

    Item ``i``: ``(image, ok, i)`` with ``image`` uint8 (3, 112, 112) RGB, all zeros when the file is missing or does
    not decode (``ok`` False). ``interpolation``: see :func:`~timmface.evaluation.align.warp_affine`.
    """

    def __init__(
        self,
        image_dir: str | Path,
        names: Sequence[str],
        landmarks: np.ndarray,
        interpolation: Literal["bilinear", "bicubic"] = "bilinear",
    ) -> None:
        if len(names) != len(landmarks):
            raise ValueError(f"{len(names)} names but {len(landmarks)} landmark sets")
        self.interpolation = interpolation
        self.image_dir = str(image_dir)
        self.names = list(names)
        self.landmarks = np.asarray(landmarks, dtype=np.float32).reshape(-1, 5, 2)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[Tensor, bool, int]:
        from torchvision.io import ImageReadMode, decode_image, read_file

        try:
            # libjpeg-turbo via torchvision; grey and CMYK JPEGs come out as RGB
            img = decode_image(read_file(f"{self.image_dir}/{self.names[i]}"), mode=ImageReadMode.RGB)
            return align_face(img, self.landmarks[i], self.interpolation), True, i
        except (RuntimeError, OSError, ValueError):
            return torch.zeros(3, 112, 112, dtype=torch.uint8), False, i


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the workers each warp one image at a time; intra-op threads would oversubscribe


def make_embed_fn(
    model: nn.Module,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    batch_size: int = 256,
) -> EmbedFn:
    """Wrap a model that takes float RGB in [-1, 1] as an ``embed_fn`` for :func:`evaluate_ijb`.

    Args:
        model: ``N x 3 x 112 x 112`` float in [-1, 1] -> ``N x D`` (or AdaFace's ``(x / |x|, |x|)`` pair, which is
            multiplied back into the unnormalised feature, as AdaFace's ``pre_norm_vector_add`` does). It is moved to
            ``device`` and put in eval mode.
        device: where to run (default: CUDA when available, else CPU).
        dtype: autocast dtype (``torch.bfloat16`` / ``torch.float16``), or None for float32.
        batch_size: largest forward batch; bigger inputs are split.

    Returns:
        ``embed_fn(uint8 N x 3 x 112 x 112) -> float32 N x D`` on the CPU.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()

    @torch.inference_mode()
    def embed(images: Tensor) -> Tensor:
        outs = []
        for chunk in images.split(batch_size):
            x = chunk.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)  # (x / 255 - 0.5) / 0.5
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = model(x)
            if isinstance(out, (tuple, list)):
                out = out[0].float() * out[1].float().reshape(len(x), -1)
            outs.append(out.float().cpu())
        return torch.cat(outs)

    return embed


def embed_ijb_images(
    dataset: IJBAlignedDataset,
    embed_fn: EmbedFn,
    *,
    flip: bool = True,
    batch_size: int = 256,
    num_workers: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Embed every aligned image (and, with ``flip``, add the embedding of its mirror); ``progress(images done,
    images)`` is called after every batch.

    Returns:
        ``feats`` float32 (N, D) on the CPU (zeros for failed images) and ``ok`` bool (N,).
    """
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
    n = len(dataset)
    feats: Tensor | None = None
    ok_all = torch.zeros(n, dtype=torch.bool)
    done = 0
    for step, (images, ok, index) in enumerate(loader):
        ok_all[index] = ok
        done += len(index)
        if progress is not None:
            progress(done, n)
        if step % 100 == 0:
            log.info("embedding IJB images: %d / %d", int(index[0]), n)
        if not ok.any():
            continue
        images, index = images[ok], index[ok]
        emb = embed_fn(images).float()
        if flip:
            emb = emb + embed_fn(images.flip(-1)).float()  # the reference's np.fliplr of the aligned crop
        if emb.ndim != 2 or emb.shape[0] != len(images):
            raise ValueError(f"embed_fn returned shape {tuple(emb.shape)} for {len(images)} images; expected N x D")
        if feats is None:
            feats = torch.zeros(n, emb.shape[1], dtype=torch.float32)
        feats[index] = emb.cpu()
    if feats is None:
        raise DataError(f"{dataset.image_dir}: none of the {n} images could be decoded")
    return feats, ok_all


# --------------------------------------------------------------------------------------------------
# Image features -> template features -> pair scores
# --------------------------------------------------------------------------------------------------


def image_features(feats: Tensor, faceness: Tensor | np.ndarray | None = None, *, norm_fusion: bool = True) -> Tensor:
    """Per-image features as the reference feeds them to the pooling (``img_input_feats``).

    Args:
        feats: (N, D) embeddings (already flip-summed when flip TTA is on).
        faceness: (N,) detector scores to multiply by, or None for no detector weighting.
        norm_fusion: keep the norms (insightface N1 / AdaFace ``pre_norm_vector_add``); False L2-normalises first.

    Returns:
        (N, D) float32.
    """
    out = feats.float()
    if not norm_fusion:
        out = F.normalize(out, dim=1)
    if faceness is not None:
        out = out * torch.as_tensor(faceness, dtype=out.dtype).reshape(-1, 1)
    return out


def pool_templates(
    feats: Tensor,
    templates: np.ndarray | Tensor,
    medias: np.ndarray | Tensor,
    valid: np.ndarray | Tensor | None = None,
) -> tuple[np.ndarray, Tensor, Tensor]:
    """Template features: per template, the mean feature of each media, summed over media, L2-normalised.

    Vectorised form of the reference ``image2template_feature``. Sums accumulate in float32 (the reference's per-media
    ``np.mean`` of float32 features is float32 too; its template sum is float64): differences are ~1e-7.

    Args:
        feats: (N, D) image features (:func:`image_features`).
        templates: (N,) template id of each image.
        medias: (N,) media id of each image (media are grouped within a template).
        valid: (N,) bool, False for images to leave out (failed decodes); default all True.

    Returns:
        ``unique_templates`` int64 (T,) sorted ids, ``template_feats`` float32 (T, D) unit rows (zero rows where a
        template has no valid image) and ``has_images`` bool (T,).
    """
    templates = np.asarray(templates, dtype=np.int64)
    medias = np.asarray(medias, dtype=np.int64)
    n, d = feats.shape
    if len(templates) != n or len(medias) != n:
        raise ValueError(f"{n} features but {len(templates)} template and {len(medias)} media ids")
    valid_np = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)

    unique_templates, t_index = np.unique(templates, return_inverse=True)
    # media groups are (template, media) pairs - the same media id in two templates is two groups - numbered over
    # all images, valid or not, so every template keeps its row
    span = int(medias.max() - medias.min()) + 1
    keys, g_index = np.unique(t_index.reshape(-1) * span + (medias - medias.min()), return_inverse=True)
    group_template = torch.from_numpy(keys // span)
    g_sel = torch.from_numpy(g_index.reshape(-1)[valid_np])
    src = feats.float() if valid_np.all() else feats.float()[torch.from_numpy(valid_np)]

    media_sum = torch.zeros(len(keys), d).index_add_(0, g_sel, src)
    media_count = torch.bincount(g_sel, minlength=len(keys))
    media_mean = media_sum / media_count.clamp(min=1).unsqueeze(1).float()

    template_sum = torch.zeros(len(unique_templates), d).index_add_(0, group_template, media_mean)
    has_images = torch.zeros(len(unique_templates), dtype=torch.bool)
    has_images[group_template[media_count > 0]] = True
    # sklearn.preprocessing.normalize leaves all-zero rows at zero, as F.normalize's eps does
    return unique_templates, F.normalize(template_sum, dim=1), has_images


@contextmanager
def _exact_float32_matmul():
    """Disable TF32 for the GEMM: 10-bit mantissas would reorder nearly tied scores."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _default_device(device: torch.device | str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _as_index(idx: np.ndarray | Tensor) -> Tensor:
    return (idx if isinstance(idx, Tensor) else torch.from_numpy(np.asarray(idx))).to(torch.int64)


def pick_scoring_method(idx1: np.ndarray | Tensor, idx2: np.ndarray | Tensor, n_templates: int) -> str:
    """``"gemm"`` when (distinct first templates) x (distinct second templates) <= 32 x pairs, else ``"gather"``.

    A row dot inside a GEMM costs far less than one of gathered rows (BLAS vs memory-bound): on this project's 2-core
    CPU the GEMM still won 2.5x with U1 * U2 = 25 P (``benchmarks/ijb_scoring.py --layout random`` prints both).
    """
    i1, i2 = _as_index(idx1).cpu(), _as_index(idx2).cpu()
    u1 = int((torch.bincount(i1, minlength=n_templates) > 0).sum())
    u2 = int((torch.bincount(i2, minlength=n_templates) > 0).sum())
    return "gemm" if u1 * u2 <= 32 * len(i1) else "gather"


def score_pairs(
    template_feats: Tensor,
    idx1: np.ndarray | Tensor,
    idx2: np.ndarray | Tensor,
    *,
    device: torch.device | str | None = None,
    method: Literal["auto", "gemm", "gather"] = "auto",
    dtype: torch.dtype = torch.float32,
    block_bytes: int = 1 << 28,
) -> Tensor:
    """Cosine scores ``<f[idx1[p]], f[idx2[p]]>`` of unit template features for every pair, vectorised.

    Two exact strategies: ``"gather"`` dots the two gathered rows of each chunk of pairs (the reference's approach, P*D
    memory-bound work); ``"gemm"`` groups the pairs by their first template and computes, per block of first
    templates, the matrix of similarities to every template that appears second, then picks the pairs out (U1*U2*D
    compute-bound work). IJB's first column has few distinct templates (IJB-B: 1,845 against 10,270, as insightface's
    ``ijb_evals.py`` prints; IJB-C presumably its 3,531 gallery templates against 19,593), so the GEMM does ~3-5x more
    multiply-adds than there are pairs, but at BLAS speed. ``"auto"`` takes the GEMM when
    ``U1 * U2 <= 32 * P`` (:func:`pick_scoring_method`).

    Args:
        template_feats: (T, D) unit rows.
        idx1, idx2: (P,) row indices into ``template_feats``.
        device: where to compute (default: CUDA when available, else CPU).
        dtype: float32 (default) or float64 (the reference's precision).
        block_bytes: memory budget of one block of the GEMM similarity matrix / one chunk of gathered rows.

    Returns:
        float (P,) scores on the CPU, in pair order.
    """
    device = _default_device(device)
    i1, i2 = _as_index(idx1).cpu(), _as_index(idx2).cpu()
    if i1.shape != i2.shape or i1.ndim != 1:
        raise ValueError(f"idx1 and idx2 must be 1-D of equal length, got {tuple(i1.shape)} and {tuple(i2.shape)}")
    n_pairs = len(i1)
    feats = template_feats.to(device=device, dtype=dtype)
    out = torch.empty(n_pairs, dtype=dtype)
    if n_pairs == 0:
        return out
    elem = torch.finfo(dtype).bits // 8

    if method == "auto":
        method = pick_scoring_method(i1, i2, len(feats))

    with _exact_float32_matmul():
        if method == "gather":
            # Reused buffers: on the CPU, cache-sized chunks (fresh 100 MB arrays per chunk cost more in page faults
            # than the arithmetic); on a GPU, chunks as large as the budget allows.
            chunk = 4096 if device.type == "cpu" else max(1, block_bytes // (2 * feats.shape[1] * elem))
            buf1 = torch.empty(chunk, feats.shape[1], dtype=dtype, device=device)
            buf2 = torch.empty_like(buf1)
            for start in range(0, n_pairs, chunk):
                a = i1[start : start + chunk].to(device, non_blocking=True)
                b = i2[start : start + chunk].to(device, non_blocking=True)
                rows1 = torch.index_select(feats, 0, a, out=buf1[: len(a)])
                rows2 = torch.index_select(feats, 0, b, out=buf2[: len(a)])
                out[start : start + len(a)] = rows1.mul_(rows2).sum(1).cpu()
            return out
        if method != "gemm":
            raise ValueError(f"method must be 'auto', 'gemm' or 'gather', got {method!r}")

        # Sort pairs by first template (IJB's pair files already are: skip the sort then).
        order = None if bool((i1[1:] >= i1[:-1]).all()) else torch.argsort(i1, stable=True)
        s1 = i1 if order is None else i1[order]
        s2 = i2 if order is None else i2[order]
        rows, counts = torch.unique_consecutive(s1, return_counts=True)
        ends = torch.cumsum(counts, 0)
        cols = torch.nonzero(torch.bincount(s2, minlength=len(feats))).reshape(-1)  # sorted, O(P)
        col_of = torch.full((len(feats),), -1, dtype=torch.int64)
        col_of[cols] = torch.arange(len(cols))
        s2_col = col_of[s2]
        right = feats[cols.to(device)]  # (U2, D)
        block = max(1, block_bytes // (len(cols) * elem))
        sorted_scores = torch.empty(n_pairs, dtype=dtype)
        for r0 in range(0, len(rows), block):
            r1 = min(r0 + block, len(rows))
            p0 = 0 if r0 == 0 else int(ends[r0 - 1])
            p1 = int(ends[r1 - 1])
            sim = feats[rows[r0:r1].to(device)] @ right.T  # (B, U2)
            local_row = torch.repeat_interleave(torch.arange(r1 - r0), counts[r0:r1])
            flat = (local_row * len(cols) + s2_col[p0:p1]).to(device, non_blocking=True)
            sorted_scores[p0:p1] = sim.reshape(-1)[flat].cpu()
        if order is None:
            return sorted_scores
        out[order] = sorted_scores
        return out


# --------------------------------------------------------------------------------------------------
# ROC and TAR@FAR
# --------------------------------------------------------------------------------------------------


def roc_curve(
    scores: np.ndarray | Tensor,
    labels: np.ndarray | Tensor,
    *,
    drop_intermediate: bool = True,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points exactly as ``sklearn.metrics.roc_curve(labels, scores)`` returns them (higher score = genuine).

    Scores are sorted in descending order; every distinct score is a threshold (tied scores move the curve
    diagonally in one step), ``fps = rank + 1 - tps``. With ``drop_intermediate`` (sklearn's default, which the
    reference scripts use) the points in the middle of straight runs are removed - this changes which point is
    "nearest" a target FAR. Finally (0, 0) is prepended with threshold +inf.

    Args:
        scores: (P,) float; must be finite.
        labels: (P,) bool / {0, 1}; needs at least one of each.
        device: a CUDA device sorts there; otherwise numpy sorts (its SIMD quicksort beats torch's CPU sort).

    Returns:
        ``fpr``, ``tpr`` (float64, non-decreasing) and ``thresholds`` (float64, decreasing), same length.
    """
    s = scores.detach().cpu().numpy() if isinstance(scores, Tensor) else np.asarray(scores)
    y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    s, y = s.reshape(-1), y.reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"{len(s)} scores but {len(y)} labels")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        raise ValueError(f"ROC needs genuine and impostor pairs, got {n_pos} genuine of {len(y)}")
    if not np.isfinite(s).all():
        raise ValueError("ROC scores must be finite (exclude NaN pairs first)")
    # The order inside a run of tied scores does not matter: only each run's last index is used.
    if device is not None and torch.device(device).type == "cuda":
        order = torch.argsort(torch.from_numpy(s).to(device), descending=True).cpu().numpy()
    else:
        order = np.argsort(-s)
    s, y = s[order], y[order]
    last_of_run = np.flatnonzero(s[1:] != s[:-1])  # sklearn: np.where(np.diff(y_score))
    thr_idx = np.append(last_of_run, len(s) - 1)
    tps = np.cumsum(y, dtype=np.int64)[thr_idx]
    fps = thr_idx + 1 - tps
    thr = s[thr_idx].astype(np.float64)
    if drop_intermediate and len(fps) > 2:
        # keep the ends and every corner: where the second difference of fps or tps is non-zero
        bend = (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0)
        keep = np.concatenate([[True], bend, [True]])
        fps, tps, thr = fps[keep], tps[keep], thr[keep]
    fps, tps = np.append(0, fps), np.append(0, tps)
    thr = np.append(np.inf, thr)
    return fps / fps[-1], tps / tps[-1], thr


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, fars: Sequence[float] = FARS) -> dict[float, float]:
    """TAR at each target FAR with the reference convention (``write_result`` in the IJB scripts).

    The ROC point whose FPR is nearest the target (absolute difference); among equally near points, the last in
    ascending order, i.e. the largest TPR at a tied FPR (the scripts search the flipped arrays and keep the first).
    No interpolation: with IJB-C's 15.6M impostor pairs FAR 1e-6 is about 16 impostors.
    """
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    out = {}
    for far in fars:
        dist = np.abs(fpr - far)
        out[float(far)] = float(tpr[np.flatnonzero(dist == dist.min())[-1]])
    return out


# --------------------------------------------------------------------------------------------------
# The whole protocol
# --------------------------------------------------------------------------------------------------


@dataclass
class IJBResult:
    """The outcome of one IJB 1:1 evaluation. TAR/FAR values are fractions (x100 for the usual table)."""

    set_name: str
    protocol: str
    """E.g. "IJBC 1:1, flip TTA, norm fusion, detector score"."""
    tar_at_far: dict[float, float]
    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    auc: float
    n_images: int
    n_failed_images: int
    n_templates: int
    n_templates_empty: int
    """Templates left without any decodable image (no feature; their pairs are excluded)."""
    n_pairs: int
    """Pairs scored and in the ROC."""
    n_pairs_excluded: int
    n_genuine: int
    n_impostor: int
    failed_images: list[str] = field(default_factory=list)
    scores: np.ndarray | None = None
    """float32 (P_all,) score of every pair in file order; NaN for excluded pairs."""

    def summary(self) -> str:
        """One line: protocol, TAR@FAR in percent, counts."""
        tars = "  ".join(f"{far:.0e}: {100 * tar:.2f}" for far, tar in self.tar_at_far.items())
        extra = f", {self.n_failed_images} images failed" if self.n_failed_images else ""
        extra += f", {self.n_pairs_excluded} pairs excluded" if self.n_pairs_excluded else ""
        return f"{self.protocol} | TAR@FAR {tars} | {self.n_templates} templates, {self.n_pairs} pairs{extra}"


def verify_templates(
    meta: IJBMeta,
    feats: Tensor,
    ok: Tensor | np.ndarray | None = None,
    protocol: IJBProtocol | str = "insightface",
    *,
    device: torch.device | str | None = None,
    fars: Sequence[float] = FARS,
) -> IJBResult:
    """From per-image embeddings to the result: fuse, pool media then templates, score all pairs, ROC, TAR@FAR.

    Args:
        meta: from :func:`load_ijb_meta`.
        feats: (N, D) embeddings in ``meta`` order, already flip-summed if ``protocol.flip``.
        ok: (N,) bool, False for images that failed to decode (default: all decoded).
        protocol: an :class:`IJBProtocol` or a key of :data:`PROTOCOLS`.
    """
    proto = _protocol(protocol)
    n = len(meta.names)
    if feats.shape[0] != n:
        raise ValueError(f"{feats.shape[0]} image features for {n} images")
    ok_np = np.ones(n, dtype=bool) if ok is None else np.asarray(ok, dtype=bool)
    bad = ~torch.isfinite(feats).all(1) & torch.from_numpy(ok_np)
    if bad.any():
        first = meta.names[int(bad.nonzero()[0, 0])]
        raise ValueError(f"{int(bad.sum())} image embeddings are not finite (fp16 overflow?), e.g. {first}")

    img = image_features(feats, meta.faceness if proto.detector_score else None, norm_fusion=proto.norm_fusion)
    unique_templates, tfeats, has_images = pool_templates(img, meta.templates, meta.medias, ok_np)
    idx1 = np.searchsorted(unique_templates, meta.pair_t1)
    idx2 = np.searchsorted(unique_templates, meta.pair_t2)
    has = has_images.numpy()
    usable = has[idx1] & has[idx2]

    scores_all = np.full(len(idx1), np.nan, dtype=np.float32)
    scores_all[usable] = score_pairs(tfeats, idx1[usable], idx2[usable], device=device).numpy()
    labels = meta.labels[usable]
    n_gen = int(labels.sum())
    if n_gen == 0 or n_gen == len(labels):
        raise DataError(f"{meta.pair_file}: {n_gen} genuine of {len(labels)} scorable pairs; need both kinds")
    fpr, tpr, thr = roc_curve(scores_all[usable], labels, device=_default_device(device))
    failed = [meta.names[i] for i in np.flatnonzero(~ok_np)]
    return IJBResult(
        set_name=meta.set_name,
        protocol=proto.describe(meta.set_name),
        tar_at_far=tar_at_far(fpr, tpr, fars),
        fpr=fpr,
        tpr=tpr,
        thresholds=thr,
        auc=float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)),  # trapezoids, as sklearn.metrics.auc
        n_images=n,
        n_failed_images=len(failed),
        n_templates=len(unique_templates),
        n_templates_empty=int((~has).sum()),
        n_pairs=int(usable.sum()),
        n_pairs_excluded=int((~usable).sum()),
        n_genuine=n_gen,
        n_impostor=len(labels) - n_gen,
        failed_images=failed,
        scores=scores_all,
    )


def evaluate_ijb(
    root: str | Path,
    set_name: str,
    embed_fn: EmbedFn | nn.Module,
    *,
    protocol: IJBProtocol | str = "insightface",
    meta_dir: str | Path | None = None,
    batch_size: int = 256,
    num_workers: int = 4,
    device: torch.device | str | None = None,
    fars: Sequence[float] = FARS,
    progress: Callable[[int, int], None] | None = None,
) -> IJBResult:
    """Run the IJB-B / IJB-C 1:1 verification protocol end to end.

    Args:
        root: folder holding ``IJBB/`` / ``IJBC/`` (or the set folder itself); see the module docstring.
        set_name: "IJBB" or "IJBC".
        embed_fn: uint8 ``N x 3 x 112 x 112`` RGB -> float ``N x D``; an ``nn.Module`` taking [-1, 1] floats is
            wrapped with :func:`make_embed_fn` on ``device``.
        protocol: an :class:`IJBProtocol` or a key of :data:`PROTOCOLS` (default: insightface's flip + norm fusion +
            detector score).
        meta_dir: optional folder with the metadata files, when they are not in ``<set>/meta``.
        batch_size: images per DataLoader batch (and per ``embed_fn`` call; twice with flip).
        num_workers: DataLoader processes that decode and align.
        device: for the pair scoring and a wrapped module (default CUDA when available).
        progress: called as ``progress(images embedded, images)`` after every batch.

    Raises:
        DataError: bad metadata (see :func:`load_ijb_meta`) or no decodable image at all.
    """
    proto = _protocol(protocol)
    if isinstance(embed_fn, nn.Module):
        embed_fn = make_embed_fn(embed_fn, device=device, batch_size=batch_size)
    meta = load_ijb_meta(root, set_name, meta_dir)
    dataset = IJBAlignedDataset(meta.image_dir, meta.names, meta.landmarks, proto.interpolation)
    feats, ok = embed_ijb_images(
        dataset, embed_fn, flip=proto.flip, batch_size=batch_size, num_workers=num_workers, progress=progress
    )
    if not bool(ok.all()):
        log.warning("%s: %d of %d images failed to decode", meta.image_dir, int((~ok).sum()), len(ok))
    return verify_templates(meta, feats, ok, proto, device=device, fars=fars)


def save_roc_png(results: IJBResult | Sequence[IJBResult], path: str | Path, title: str = "ROC on IJB") -> None:
    """Plot TPR against log FPR (the reference's axes: FPR 1e-6..1e-1, TPR 0.3..1) for one or more results."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("save_roc_png needs matplotlib: pip install timmface[plot]") from None
    if isinstance(results, IJBResult):
        results = [results]
    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)  # attaches an Agg canvas without touching pyplot's global backend
    ax = fig.add_subplot()
    for r in results:
        at = r.tar_at_far.get(1e-4)
        label = r.protocol + (f" (TAR@1e-4 {100 * at:.2f}%)" if at is not None else "")
        ax.plot(np.maximum(r.fpr, 1e-7), r.tpr, lw=1, label=label)
    ax.set_xscale("log")
    ax.set_xlim(1e-6, 1e-1)
    ax.set_ylim(0.3, 1.0)
    ax.set_xticks(list(FARS))
    ax.grid(linestyle="--", linewidth=1)
    ax.set_xlabel("False Positive Rate")
    ax.set_ylabel("True Positive Rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    fig.savefig(str(path), dpi=120, bbox_inches="tight")
