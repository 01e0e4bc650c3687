"""The distillation demo: teacher, scratch student, distilled student (online and cached), on demo data.

    python benchmarks/distill_demo.py                 # seeds 0 and 1, runs under runs/distill_demo/
    python benchmarks/distill_demo.py --seeds 0 1 2 --out /tmp/dd

Runs the real CLI, in this order:
1. ``timmface train --config configs/demo_teacher.yaml``                        (the teacher, once)
2. ``timmface embed --model TEACHER --data DEMO --out teacher.tfemb --cache``    (the cache, once)
3. per seed: ``timmface train --config configs/demo.yaml seed=S``               (scratch student)
             ``timmface distill --teacher TEACHER --config configs/demo_distill.yaml seed=S``
             ``timmface distill --config configs/demo_distill.yaml distill.cache=... seed=S``
``configs/demo_distill.yaml`` has the same student, data, batch, steps and schedule as
``configs/demo.yaml``, so the scratch run is the baseline at equal steps. The table reports the
final 10-fold verification accuracy on held-out identities (Accuracy-Flip, ``acc/demo_val``) and
the median training step time (evaluation and saving excluded, first log window dropped), with the
cached and online step times as ratios to the plain step measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timmface.cli import main as cli  # noqa: E402
from timmface.config import load_config  # noqa: E402


def run(args: list[str]) -> float:
    t0 = time.perf_counter()
    code = cli(args)
    if code != 0:
        raise SystemExit(f"command failed ({code}): timmface {' '.join(args)}")
    return time.perf_counter() - t0


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summary(run_dir: Path, batch: int) -> dict[str, float]:
    lines = metrics(run_dir)
    accs = [m["acc/demo_val"] for m in lines if "acc/demo_val" in m]
    rates = [m["img_per_s"] for m in lines if "img_per_s" in m][1:]  # drop the warm-up window
    step_s = statistics.median(batch / r for r in rates) if rates else float("nan")
    return {"acc": accs[-1] if accs else float("nan"), "step_s": step_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "distill_demo")
    p.add_argument("--overrides", nargs="*", default=[], help="extra key=value for every student run")
    args = p.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cfg = {name: str(ROOT / "configs" / f"{name}.yaml") for name in ("demo", "demo_teacher", "demo_distill")}
    student = load_config(cfg["demo"])
    batch = student.batch_size

    teacher_dir = out / "teacher"
    if not (teacher_dir / "checkpoints").is_dir():
        run(["train", "--config", cfg["demo_teacher"], f"output_dir={teacher_dir}", "log.progress=plain"])
    teacher = summary(teacher_dir, load_config(cfg["demo_teacher"]).batch_size)

    # the demo data folder: generated (and cached) by the teacher run, found again from its config
    from timmface.trainer import demo_data_path

    demo_path = demo_data_path(student.data.demo)
    cache = out / "teacher.tfemb"
    if not cache.exists():
        run(
            [
                "embed",
                "--model",
                str(teacher_dir),
                "--data",
                demo_path,
                "--out",
                str(cache),
                "--cache",
                "--image-size",
                str(student.data.image_size),
                "--no-progress",
            ]
        )

    rows = []
    for seed in args.seeds:
        common = [f"seed={seed}", "log.progress=plain", "overwrite=true", *args.overrides]
        scratch_dir, online_dir, cached_dir = (out / f"{k}_seed{seed}" for k in ("scratch", "online", "cached"))
        run(["train", "--config", cfg["demo"], f"output_dir={scratch_dir}", *common])
        run(
            [
                "distill",
                "--teacher",
                str(teacher_dir),
                "--config",
                cfg["demo_distill"],
                f"output_dir={online_dir}",
                *common,
            ]
        )
        run(["distill", "--config", cfg["demo_distill"], f"distill.cache={cache}", f"output_dir={cached_dir}", *common])
        rows.append((seed, summary(scratch_dir, batch), summary(online_dir, batch), summary(cached_dir, batch)))

    print()
    print(
        f"teacher: {load_config(cfg['demo_teacher']).model.backbone}, acc/demo_val {teacher['acc']:.4f}, "
        f"step {teacher['step_s']:.3f} s"
    )
    print(f"student: {student.model.backbone}, {student.total_steps} steps of batch {batch}")
    print()
    print(
        "| seed | scratch acc | distilled (online) acc | distilled (cached) acc | plain step | online step | "
        "cached step | cached / plain |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for seed, s, o, c in rows:
        print(
            f"| {seed} | {s['acc']:.4f} | {o['acc']:.4f} | {c['acc']:.4f} | {s['step_s']:.3f} s | "
            f"{o['step_s']:.3f} s | {c['step_s']:.3f} s | {c['step_s'] / s['step_s']:.3f} |"
        )
    wins = sum(o["acc"] > s["acc"] and c["acc"] > s["acc"] for _, s, o, c in rows)
    print(f"\ndistilled student ahead of scratch on {wins} of {len(rows)} seeds (online and cached)")


if __name__ == "__main__":
    main()
