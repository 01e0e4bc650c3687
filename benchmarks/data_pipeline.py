"""Training data pipeline throughput, measured in one run on the same files.

    python benchmarks/data_pipeline.py                  # writes its own RecordIO set: 2,000 112x112 JPEGs
    python benchmarks/data_pipeline.py --data DIR       # a RecordIO folder (train.rec/train.idx)
    python benchmarks/data_pipeline.py --workers 1,2 --idx-lines 5200000

Figures, in images/s:

* raw decode: one process decodes the JPEG bytes (already read into memory) and nothing else;
* seed-style: the pipeline timm-face started from, per worker process: per sample read the record,
  decode, ``v2.RandomHorizontalFlip``, ``ToDtype(float32, scale=True)``, ``Normalize(0.5, 0.5)``, then
  the default collate of float tensors;
* timmface: this project's :class:`~timmface.data.loader.TrainLoader` (uint8 batches, flips as bits),
  per worker process;

and the load time of a synthetic ``train.idx`` (5.2M lines, as MS1MV3) with our parser, ``np.loadtxt``
and the cached binary index. The machine is shared, so the three rates are measured interleaved,
``--repeats`` times, and ratios are the medians of the per-repeat ratios. The last line is
``ratio_vs_seed_style=X raw_decode_fraction=Y`` (timmface over seed-style, timmface over raw decode).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timmface.data.loader import build_train_loader  # noqa: E402
from timmface.data.recordio import RecordIODataset, RecordIOWriter, load_index, parse_idx  # noqa: E402


def write_jpeg_recordio(root: Path, n: int, size: int = 112, per_class: int = 20) -> Path:
    """``n`` JPEGs (quality 90) of smooth random content at ``size`` x ``size``, ``per_class`` per label."""
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(0)
    with RecordIOWriter(root, num_classes=max(2, -(-n // per_class)), image_size=(size, size)) as w:
        for i in range(n):
            base = torch.randint(0, 256, (3, 14, 14), generator=g).float()
            img = torch.nn.functional.interpolate(base[None], size=(size, size), mode="bilinear")[0].to(torch.uint8)
            w.add(encode_jpeg(img, quality=90).numpy().tobytes(), i // per_class)
    return root


# ------------------------------------------------------------------------------------------ raw decode


def decode_rate(path: Path, n: int) -> float:
    """Images/s of ``decode_jpeg`` alone, one process, one thread, bytes already in memory."""
    from torchvision.io import decode_jpeg

    ds = RecordIODataset(path)
    raws = [torch.frombuffer(bytearray(ds.read_raw(i)[0]), dtype=torch.uint8) for i in range(min(n, len(ds)))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        for r in raws[:32]:  # warm-up: library initialisation, allocator
            decode_jpeg(r)
        t0 = time.perf_counter()
        for r in raws:
            decode_jpeg(r)
        return len(raws) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ seed-style


class SeedStyleDataset(Dataset):
    """Per sample: read the record, decode, then the seed's v2 transform chain (float32 output)."""

    def __init__(self, path: Path) -> None:
        from torchvision.transforms import v2

        self.ds = RecordIODataset(path)
        self.transform = v2.Compose(
            [
                v2.ToImage(),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
            ]
        )

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from torchvision.io import decode_image

        data, label = self.ds.read_raw(i)
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return self.transform(img), label


def _time_batches(it: object, batch: int, n_batches: int) -> float:
    next(it)  # type: ignore[call-overload]  # workers started, prefetch queue filling
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)  # type: ignore[call-overload]
    return batch * n_batches / (time.perf_counter() - t0)


def _forever(loader: DataLoader):
    while True:
        yield from loader


def seed_style_rate(path: Path, batch: int, workers: int, n_batches: int) -> float:
    loader = DataLoader(
        SeedStyleDataset(path), batch, shuffle=True, drop_last=True, num_workers=workers, persistent_workers=True
    )
    it = _forever(loader)
    try:
        return _time_batches(it, batch, n_batches) / workers
    finally:
        del it, loader


def timmface_rate(path: Path, batch: int, workers: int, n_batches: int, per_sample: bool = False) -> float:
    loader = build_train_loader(RecordIODataset(path), batch, num_workers=workers, seed=0, per_sample=per_sample)
    try:
        return _time_batches(loader, batch, n_batches) / max(1, workers)
    finally:
        loader.close()


# ------------------------------------------------------------------------------------------------ index


def write_idx(path: Path, lines: int) -> Path:
    """A ``train.idx`` like MS1MV3's: keys 1..N, offsets growing by ~7 kB (11-digit at the end)."""
    keys = np.arange(1, lines + 1, dtype=np.int64)
    offsets = np.cumsum(np.random.default_rng(0).integers(4000, 10000, size=lines))
    table = np.stack([keys, offsets], axis=1)
    np.savetxt(path, table, fmt="%d", delimiter="\t")
    return path


def index_times(lines: int, loop_lines: int) -> dict[str, float]:
    """Seconds: our parser, ``np.loadtxt``, the seed's ``np.loadtxt`` + per-line offset loop (the loop
    timed on ``loop_lines`` lines and scaled), the first cached load (parse + write) and a cached load."""
    with tempfile.TemporaryDirectory() as tmp:
        idx = write_idx(Path(tmp) / "train.idx", lines)
        out: dict[str, float] = {}
        t0 = time.perf_counter()
        parse_idx(idx.read_bytes(), idx)
        out["parse_idx"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        table = np.loadtxt(idx, dtype=np.int64)
        out["np.loadtxt"] = time.perf_counter() - t0
        # the seed: offsets[idx] = offset, one python iteration per line into a torch tensor
        offsets = torch.empty(int(table[:, 0].max()) + 1, dtype=torch.int64)
        part = table[: min(loop_lines, lines)]
        t0 = time.perf_counter()
        for key, offset in part:
            offsets[key] = offset
        out["seed_loop"] = out["np.loadtxt"] + (time.perf_counter() - t0) * lines / len(part)
        t0 = time.perf_counter()
        load_index(idx, cache_dir=tmp)
        out["cache_first"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_index(idx, cache_dir=tmp)
        out["cache_hit"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------------------- main


def run(data: Path, args: argparse.Namespace) -> tuple[float, float]:
    n = len(RecordIODataset(data))
    n_batches = max(3, min(args.batches, 2 * n // args.batch - 1))
    rows: dict[str, list[float]] = {}
    ratio_seed: list[float] = []
    ratio_raw: list[float] = []
    for r in range(args.repeats):
        raw = decode_rate(data, n)
        seed = seed_style_rate(data, args.batch, 1, n_batches)
        ours = {w: timmface_rate(data, args.batch, w, n_batches) for w in args.workers}
        rows.setdefault("raw decode (1 process)", []).append(raw)
        rows.setdefault("seed-style, per worker (1 worker)", []).append(seed)
        for w, v in ours.items():
            rows.setdefault(f"timmface, per worker ({w} worker{'s' if w > 1 else ''})", []).append(v)
        if args.per_sample:
            ref = timmface_rate(data, args.batch, 1, n_batches, per_sample=True)
            rows.setdefault("timmface per-sample reference path, per worker (1 worker)", []).append(ref)
        one = ours[args.workers[0]]
        ratio_seed.append(one / seed)
        ratio_raw.append(one / raw)
        print(f"  repeat {r + 1}: raw {raw:.0f}, seed-style {seed:.0f}, timmface {one:.0f} img/s", flush=True)
    print(f"images/s on {n} images of {data}, batch {args.batch}, {n_batches} batches per figure, "
          f"medians of {args.repeats} repeats:")  # fmt: skip
    for name, values in rows.items():
        print(f"  {name:58s} {statistics.median(values):8.0f}   (min {min(values):.0f}, max {max(values):.0f})")
    return statistics.median(ratio_seed), statistics.median(ratio_raw)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="a RecordIO folder (default: write 2,000 112x112 JPEGs)")
    p.add_argument("--images", type=int, default=2000, help="images to write without --data")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=30, help="batches timed per figure (after one warm-up batch)")
    p.add_argument("--workers", default="1", help="comma-separated worker counts for the timmface loader")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--per-sample", action="store_true", help="also time the per-sample reference path")
    p.add_argument("--idx-lines", type=int, default=5_200_000, help="0 skips the index timing")
    p.add_argument("--idx-loop-lines", type=int, default=200_000, help="lines timed for the seed's per-line loop")
    args = p.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",")]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load:.2f} at start")

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or write_jpeg_recordio(Path(tmp) / "rec", args.images)
        ratio_seed, ratio_raw = run(data, args)

    if args.idx_lines:
        t = index_times(args.idx_lines, args.idx_loop_lines)
        print(f"train.idx of {args.idx_lines:,} lines, seconds: parse_idx {t['parse_idx']:.2f}, np.loadtxt "
              f"{t['np.loadtxt']:.2f}, seed (loadtxt + per-line loop, loop extrapolated from "
              f"{min(args.idx_loop_lines, args.idx_lines):,} lines) {t['seed_loop']:.1f}, first load with cache "
              f"write {t['cache_first']:.2f}, cached load {t['cache_hit']:.3f}")  # fmt: skip
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average {load:.2f} at end")
    print(f"ratio_vs_seed_style={ratio_seed:.2f} raw_decode_fraction={ratio_raw:.2f}")


if __name__ == "__main__":
    main()
