"""``timmface data``: pack an image folder into RecordIO, inspect a dataset or a verification .bin."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    pack = sub.add_parser(
        "pack",
        help="pack IMAGE_FOLDER/<identity>/<image> into an InsightFace RecordIO folder",
        description="Pack IMAGE_FOLDER/<identity>/<image> into OUT_DIR (train.rec, train.idx, property). "
        "JPEGs of the target size are copied byte for byte; others are re-encoded (and resized).",
    )
    pack.add_argument("image_folder", metavar="IMAGE_FOLDER", help="one sub-folder of images per identity")
    pack.add_argument("out_dir", metavar="OUT_DIR", help="the RecordIO folder to create (outside IMAGE_FOLDER)")
    pack.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images (default 95)")
    pack.add_argument("--size", type=int, default=112, help="image height and width (default 112)")
    pack.add_argument("--no-resize", action="store_true", help="refuse images of another size instead of resizing")
    pack.add_argument(
        "--overwrite", action="store_true", help="replace OUT_DIR when it holds a previous pack (and nothing else)"
    )
    inspect = sub.add_parser(
        "inspect",
        help="counts of a RecordIO folder, an image folder or a .bin file",
        description="Print image and identity counts; optionally write a PNG grid of a few identities.",
    )
    inspect.add_argument("path", metavar="PATH", help="a RecordIO folder, an image folder or a .bin file")
    inspect.add_argument("--grid", metavar="FILE", default=None, help="write a PNG grid of a few identities")
    inspect.add_argument("--json", action="store_true", help="print the counts as JSON")
    shards = sub.add_parser(
        "shards",
        help="write a RecordIO folder or an image folder as WebDataset tar shards",
        description="Write DATA as WebDataset shards named by OUT_PATTERN, whose one printf field is the shard "
        "number, e.g. out/faces-%06d.tar: samples KEY.jpg + KEY.cls, the image bytes as stored; meta.json (counts, "
        "classes) beside them. Train on them with data.path=wds://out/faces-{000000..000009}.tar.",
    )
    shards.add_argument("data", metavar="DATA", help="a RecordIO folder or an image folder")
    shards.add_argument("out_pattern", metavar="OUT_PATTERN", help="shard file names, e.g. out/faces-%%06d.tar")
    shards.add_argument("--max-count", type=int, default=10_000, help="samples per shard (default 10000)")
    shards.add_argument("--no-shuffle", action="store_true", help="keep the dataset order (default: shuffled)")
    shards.add_argument("--seed", type=int, default=0, help="seed of the shuffled order (default 0)")


def run(args: argparse.Namespace) -> int:
    from timmface.data.recordio import check_pack_output
    from timmface.data.tools import check_apart, inspect_dataset, pack_image_folder

    console = Console()
    if args.data_command == "shards":
        return _write_shards(args, console)
    if args.data_command == "pack":
        check_apart(args.image_folder, args.out_dir)
        check_pack_output(args.out_dir, args.overwrite)  # (the library says overwrite=True; here it is the flag)
        with console.status(f"packing {args.image_folder}") as status:
            info = pack_image_folder(
                args.image_folder,
                args.out_dir,
                quality=args.quality,
                image_size=(args.size, args.size),
                resize=not args.no_resize,
                overwrite=args.overwrite,
                progress=lambda i, n: status.update(f"packing {args.image_folder}: {i}/{n}") if i % 1000 == 0 else None,
            )
        console.print(
            f"[bold]{info['out_dir']}[/bold]: {info['images']} images of {info['identities']} identities "
            f"({info['copied']} copied, {info['reencoded']} re-encoded, {info['resized']} resized, "
            f"{info['skipped']} skipped)",
            soft_wrap=True,
        )
        return 0
    info = inspect_dataset(args.path, grid_png=args.grid)
    if args.json:
        print(json.dumps(info))
        return 0
    table = Table(title=str(info["path"]), show_header=False)
    for key, value in info.items():
        if key == "path":
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        table.add_row(key.replace("_", " "), str(value))
    console.print(table)
    return 0


def _write_shards(args: argparse.Namespace, console: Console) -> int:
    from timmface.data.loader import build_dataset
    from timmface.data.wds import write_shards

    dataset = build_dataset(args.data)
    with console.status(f"writing shards of {args.data}") as status:
        meta = write_shards(
            dataset,
            args.out_pattern,
            max_count=args.max_count,
            shuffle=not args.no_shuffle,
            seed=args.seed,
            progress=lambda i, n: status.update(f"writing shards of {args.data}: {i}/{n}"),
        )
    console.print(
        f"{len(meta['shards'])} shards, {meta['num_samples']} samples of {meta['num_classes']} classes "
        f"({args.out_pattern}; meta.json beside them)",
        soft_wrap=True,
    )
    return 0
