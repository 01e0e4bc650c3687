"""``timmface embed --model SPEC --data PATH --out FILE``: embeddings of a dataset, or a teacher-embedding cache.

``--out x.safetensors`` / ``x.npy``: one embedding per image of a RecordIO folder, an image folder (identity
sub-folders, or any folder of images), a text file listing image paths, or image paths given directly; with the
image keys (record keys or paths). ``--cache`` (or ``--out x.tfemb``): the teacher cache that distillation reads --
float16 embeddings of every training record and of its mirror (:mod:`timmface.embedding`). Both are resumable: a
re-run after an interruption computes only what is missing.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from timmface.errors import ConfigError, DataError

__all__ = ["add_arguments", "dataset_from_paths", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        metavar="SPEC",
        help="run directory, checkpoint, teacher file or folder, or hf-hub:OWNER/REPO[@REVISION][/FILE]",
    )
    parser.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="PATH",
        help="RecordIO folder, image folder, text file of image paths, or image files",
    )
    parser.add_argument(
        "--out", required=True, metavar="FILE", help=".safetensors, .npy (+ .keys.txt) or .tfemb (cache)"
    )
    parser.add_argument(
        "--cache",
        action="store_true",
        help="write the teacher-embedding cache (image + mirror, float16) for distillation",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out (and any unfinished run) instead of resuming"
    )
    parser.add_argument("--flip", action="store_true", help="store f(x) + f(flip(x)) (Accuracy-Flip features)")
    parser.add_argument("--normalize", action="store_true", help="L2-normalise the stored embeddings")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="stored dtype (not --cache)")
    parser.add_argument("--image-size", type=int, default=112, help="images are resized to this size first (112)")
    parser.add_argument(
        "--batch-size", type=int, default=256, help="images per forward pass (default 256; lower it if memory is short)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="(default: min(4, CPUs)) DataLoader processes decoding images",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--amp", choices=["none", "bfloat16", "float16"], default="none", help="autocast dtype")
    parser.add_argument("--arch", default=None, help="teacher architecture override (e.g. iresnet100)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _has_images(folder: Path) -> bool:
    from timmface.data.folder import IMAGE_EXTENSIONS

    return any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir())


def _image_files(folder: Path) -> list[Path]:
    from timmface.data.folder import IMAGE_EXTENSIONS

    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            Path(dirpath) / f
            for f in sorted(filenames)
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS
        ]
    return found


def _read_list(path: Path) -> tuple[list[Path], list[str]]:
    """Paths listed one per line (blank lines and ``#`` comments skipped); relative ones are relative to the list."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: neither an image nor a text list of image paths") from None
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise DataError(f"{path}: the list holds no image paths")
    return [Path(k) if Path(k).is_absolute() else path.parent / k for k in keys], keys


def dataset_from_paths(paths: list[str]) -> tuple[Dataset, str]:
    """The dataset ``--data`` names, and a description of it.

    One folder: RecordIO (``train.rec``/``train.idx``), an identity-folder dataset (labels kept), or any folder of
    images (all images below it, keys relative to it). One text file: a list of image paths. Otherwise image files.
    """
    from timmface.data.folder import IMAGE_EXTENSIONS, FileListDataset
    from timmface.data.loader import build_dataset

    if len(paths) == 1:
        p = Path(paths[0])
        if not p.exists():
            raise DataError(f"{p}: no such file or folder")
        if p.is_dir():
            if (p / "train.rec").exists() or (p / "train.idx").exists() or not _has_images(p):
                return build_dataset(str(p)), f"dataset {p}"
            files = _image_files(p)
            return FileListDataset(files, [f.relative_to(p).as_posix() for f in files]), f"image folder {p}"
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            files, keys = _read_list(p)
            return FileListDataset(files, keys), f"image list {p}"
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"{missing[0]}: no such image file")
    return FileListDataset(paths, paths), f"{len(paths)} image files"


def _missing_line(out: Path, dataset: Dataset, missing: np.ndarray, total: int) -> str:
    keys = np.asarray(getattr(dataset, "keys", np.arange(total)))
    shown = ", ".join(str(k) for k in keys[missing[:10]].tolist())
    more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
    return f"{out}: {len(missing)} of {total} records could not be decoded and have no embedding: keys {shown}{more}"


def _common(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from timmface.runtime import pick_device

    if args.batch_size < 1 or args.image_size < 1:
        raise ConfigError("--batch-size and --image-size must be positive")
    amp = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.amp]
    return {
        "batch_size": args.batch_size,
        "device": pick_device(args.device),
        "amp_dtype": amp,
        "num_workers": args.workers,
        "image_size": args.image_size,
        "progress": not args.no_progress,
    }


def _run_cache(args: argparse.Namespace, out: Path) -> int:
    from teachers import load_teacher, teacher_fingerprint
    from timmface.data.loader import build_dataset
    from timmface.embedding.cache import EmbeddingCache
    from timmface.embedding.engine import build_cache

    if len(args.data) != 1 or not Path(args.data[0]).is_dir():
        raise ConfigError("--cache needs one training dataset (a RecordIO folder or an image folder) as --data")
    if args.flip or args.normalize or args.dtype != "float32":
        raise ConfigError(
            "--flip, --normalize and --dtype do not apply to a teacher cache (it stores both views, float16)"
        )
    common = _common(args)
    dataset = build_dataset(args.data[0])
    teacher = load_teacher(args.model, arch=args.arch)
    build_cache(
        teacher, dataset, out, teacher_path=args.model, teacher_fingerprint=teacher_fingerprint(args.model),
        teacher_info=dict(teacher.teacher_info), dataset_path=args.data[0], resume=not args.overwrite, **common,
    )  # fmt: skip
    with EmbeddingCache.open(out) as cache:
        missing = cache.missing()
        if len(missing) == cache.num_records:  # a cache of nothing would only fail later, in distillation
            first = dataset.keys[missing[0]] if hasattr(dataset, "keys") else missing[0]
            out.unlink(missing_ok=True)
            raise DataError(f"{out}: nothing written: 0 of {cache.num_records} records could be read (first: {first})")
        state = "complete" if cache.complete else f"{len(missing)} records missing"
        print(f"{out}: teacher cache of {cache.num_records} records x 2 views x {cache.dim} (float16), {state}")
        if len(missing):
            print(_missing_line(out, dataset, missing, cache.num_records))
    return 0


def _run_file(args: argparse.Namespace, out: Path) -> int:
    from timmface.commands.eval import load_model
    from timmface.embedding.cache import dataset_fingerprint
    from timmface.embedding.engine import embed_to_file

    common = _common(args)
    dataset, what = dataset_from_paths(args.data)
    loaded = load_model(args.model, arch=args.arch)
    meta = {
        "dataset": {
            "path": " ".join(args.data),
            "fingerprint": dataset_fingerprint(dataset),
            "num_records": len(dataset),  # type: ignore[arg-type]
            "num_classes": int(getattr(dataset, "num_classes", 0) or 0),
        },
        "teacher": {"path": args.model, "fingerprint": loaded.fingerprint, "info": loaded.info},
    }
    report, files, missing = embed_to_file(
        loaded.module, dataset, out, meta=meta, flip=args.flip, normalize=args.normalize, dtype=args.dtype,
        overwrite=args.overwrite, **common,
    )  # fmt: skip
    resumed = f" (resumed: {report.skipped} were already done)" if report.skipped else ""
    n_out = report.num_records - len(missing)
    print(f"embedded {n_out} images of {what}{resumed} -> {', '.join(str(f) for f in files)}")
    if len(missing):
        print(_missing_line(out, dataset, missing, report.num_records))
    return 0


def run(args: argparse.Namespace) -> int:
    from timmface.hub import pin

    # a Hub id is resolved once, to a commit: the outputs record exactly which weights made them
    args.model = pin(args.model)
    out = Path(args.out)
    if args.cache or out.suffix == ".tfemb":
        return _run_cache(args, out)
    return _run_file(args, out)
