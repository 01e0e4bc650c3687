"""Calibrate the built-in demo data: train a small timm backbone briefly, report held-out verification.

The demo set should be learnable but not trivial: a scratch ``lcnet_050`` trained with CosFace for a
few CPU minutes (~1000 steps of batch 64) should reach about 0.92-0.96 pair accuracy on the held-out
identities of ``demo_val.bin``, leaving a distilled student room to do better.

    python benchmarks/calibrate_demo.py --steps 1000 --difficulty 1.0

Prints one JSON line per evaluation (step, seconds, loss, best-threshold accuracy, 10-fold accuracy;
embeddings of image + flip summed, cosine similarity). Measured on the project's 2-core CPU machine
(shared, one torch thread), demo defaults, 1000 steps: lcnet_050 0.9415 best / 0.940 10-fold,
mobilenetv3_small_050 0.9675 / 0.961.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

from timmface.data.bin import VerificationSet
from timmface.data.demo import load_or_generate_demo
from timmface.data.image import resize_uint8
from timmface.data.recordio import RecordIODataset


def decode_all(ds: RecordIODataset, size: int) -> torch.Tensor:
    """Every training image, uint8 (N, 3, size, size): resized like the trainer's loader when ``size`` differs."""
    images = [ds.decode(i) for i in range(len(ds))]
    return torch.stack([x if x.shape[-1] == size else resize_uint8(x, size) for x in images])


def resize_all(images: torch.Tensor, size: int) -> torch.Tensor:
    return images if images.shape[-1] == size else torch.stack([resize_uint8(x, size) for x in images])


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255 - 0.5) / 0.5


@torch.no_grad()
def embed(model: torch.nn.Module, images: torch.Tensor, flip: bool = True) -> torch.Tensor:
    model.eval()
    out = []
    for batch in images.split(256):
        x = normalise(batch)
        e = model(x)
        if flip:
            e = e + model(x.flip(-1))
        out.append(F.normalize(e, dim=1))
    model.train()
    return torch.cat(out)


def pair_accuracy(emb: torch.Tensor, issame: torch.Tensor) -> tuple[float, float]:
    """(best-threshold accuracy over all pairs, 10-fold accuracy as in insightface's protocol)."""
    sim = (emb[0::2] * emb[1::2]).sum(1).numpy()
    same = issame.numpy()
    thresholds = np.sort(sim)
    acc = lambda th, idx: ((sim[idx] >= th) == same[idx]).mean()  # noqa: E731
    all_idx = np.arange(len(sim))
    best = max(acc(t, all_idx) for t in thresholds[:: max(1, len(thresholds) // 400)])
    folds = np.array_split(all_idx, 10)
    accs = []
    for k in range(10):
        train = np.concatenate([f for j, f in enumerate(folds) if j != k])
        grid = np.linspace(-1, 1, 401)
        th = grid[int(np.argmax([acc(t, train) for t in grid]))]
        accs.append(acc(th, folds[k]))
    return float(best), float(np.mean(accs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="/tmp/timmface-demo-calib")
    ap.add_argument("--model", default="lcnet_050")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--embed", type=int, default=256)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1, help="1 unless the CPU is free: spinning threads are slow")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-identities", type=int, default=250)
    ap.add_argument("--images-per-identity", type=int, default=40)
    ap.add_argument("--num-val-identities", type=int, default=200)
    ap.add_argument("--num-val-pairs", type=int, default=2000)
    ap.add_argument("--difficulty", type=float, default=1.0)
    ap.add_argument("--image-size", type=int, default=112, help="train and evaluate at this size (data.image_size)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    t0 = time.time()
    path = load_or_generate_demo(
        Path(args.cache),
        num_identities=args.num_identities,
        images_per_identity=args.images_per_identity,
        num_val_identities=args.num_val_identities,
        num_val_pairs=args.num_val_pairs,
        difficulty=args.difficulty,
        seed=0,
    )
    gen_s = time.time() - t0
    ds = RecordIODataset(path)
    images, labels = decode_all(ds, args.image_size), torch.from_numpy(ds.labels)
    val = VerificationSet(path / "demo_val.bin")
    val_images = resize_all(val.decode_all(), args.image_size)
    print(json.dumps({"data": str(path), "generate_s": round(gen_s, 1), "train_images": len(ds)}), flush=True)

    model = timm.create_model(args.model, num_classes=args.embed)
    centres = torch.nn.Parameter(torch.randn(ds.num_classes, args.embed) * 0.01)
    params = [{"params": model.parameters()}, {"params": [centres]}]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    s_scale, margin = 64.0, 0.4  # CosFace (insightface CombinedMarginLoss(64, 1, 0, 0.4))
    g = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(images), (args.batch,), generator=g)
        x = normalise(images[idx])
        flip = torch.rand(args.batch, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        y = labels[idx]
        cos = F.normalize(model(x), dim=1) @ F.normalize(centres, dim=1).T
        logits = s_scale * (cos - margin * F.one_hot(y, ds.num_classes))
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % args.eval_every == 0 or step == args.steps:
            best, tenfold = pair_accuracy(embed(model, val_images), val.issame)
            train_s = time.time() - start
            print(
                json.dumps(
                    {
                        "step": step,
                        "train_s": round(train_s, 1),
                        "s_per_step": round(train_s / step, 3),
                        "loss": round(loss.item(), 3),
                        "best_acc": round(best, 4),
                        "tenfold_acc": round(tenfold, 4),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
