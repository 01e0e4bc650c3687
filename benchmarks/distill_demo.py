"""The distillation table: every method on the harder demo, against the same student from scratch and the teacher.

    python benchmarks/distill_demo.py                                   # 3 seeds, every row
    python benchmarks/distill_demo.py --seeds 0 --rows scratch "feature KD"
    python benchmarks/distill_demo.py --seeds 0 --row "fkd w10=distill.feature_weight=10"   # an extra row

Runs the real CLI, under ``--out`` (default ``runs/distill_demo``):

1. ``timmface train --config configs/demo_hard_teacher.yaml``                       (the teacher, once)
2. ``timmface embed --model TEACHER --data DEMO --out teacher.tfemb --cache``        (its cache, once)
3. per row and seed: the scratch row is ``timmface train --config configs/demo_hard.yaml seed=S``; a
   method row is ``timmface distill --config configs/demo_hard.yaml distill.cache=... <its keys>``,
   and the "best" row is ``configs/demo_distill.yaml`` itself (the shipped recipe);
4. the step cost: one process builds the plain trainer and every row's cached distillation trainer
   on the same data and times their steps interleaved, the order rotated every round
   (:func:`distill_step.interleaved_times`); the column is the median per-round ratio to the plain step.

Every student run has the same student, data, batch, steps, schedule and seed as the scratch run,
so the rows differ only in their distillation keys. Accuracy is the final 10-fold Accuracy-Flip on
the held-out identities (``acc/demo_val``); "gap closed" is ``(row - scratch) / (teacher - scratch)``
on the means over seeds. A finished run (its ``config.yaml`` equal to the resolved config, its
metrics at ``total_steps``) is read back instead of run again, so the script resumes after an
interruption and a new row costs only its own runs. The results also go to ``<out>/table.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from distill_step import bench_overrides, interleaved_times, ratio_to  # noqa: E402

from timmface.cli import main as cli  # noqa: E402
from timmface.config import diff_configs, load_config, to_dict  # noqa: E402
from timmface.errors import ConfigError  # noqa: E402

CONFIGS = ROOT / "configs"
STUDENT = CONFIGS / "demo_hard.yaml"
TEACHER = CONFIGS / "demo_hard_teacher.yaml"
BEST = CONFIGS / "demo_distill.yaml"

# The method rows: name -> the distillation keys added to configs/demo_hard.yaml (a key that a row
# does not set keeps its default; feature_weight defaults to 1, so rows without feature KD set it to 0).
# None = plain training (the scratch row); "best" = configs/demo_distill.yaml, the shipped recipe.
# Weights were tuned on seed 0 only (benchmarks/RESULTS.md lists what was tried).
FEATURE = ["distill.feature_weight=30"]
RELATION = ["distill.relation_weight=100", "distill.relation_loss=kl", "distill.relation_temperature=0.1"]
NO_FEATURE = ["distill.feature_weight=0"]
ROWS: list[tuple[str, list[str] | None]] = [
    ("scratch", None),
    ("feature KD", FEATURE),
    ("+ in-batch relation", [*FEATURE, *RELATION]),
    ("+ memory relation", [*FEATURE, *RELATION, "distill.memory_size=4096"]),
    ("EKD", [*NO_FEATURE, "distill.ekd_weight=1"]),
    ("AdaDistill", [*NO_FEATURE, "distill.centres=adadistill", "distill.centres_init=random"]),
    ("logit KD", [*NO_FEATURE, "distill.logit_weight=1", "distill.logit_temperature=4"]),
    ("teacher centres", [*NO_FEATURE, "distill.centres=frozen"]),
    ("best", []),
]  # fmt: skip


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "row"


def run(args: list[str]) -> None:
    print(f"\n$ timmface {' '.join(args)}", flush=True)
    code = cli(args)
    if code != 0:
        raise SystemExit(f"command failed ({code}): timmface {' '.join(args)}")


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_accuracy(run_dir: Path, total_steps: int) -> float | None:
    """The run's ``acc/demo_val`` at ``total_steps``, or None when it did not get there."""
    for m in reversed(metrics(run_dir)):
        if "acc/demo_val" in m and m.get("step") == total_steps:
            return float(m["acc/demo_val"])
    return None


# keys that say how a run is started, not what it trains: a finished run is the same run whatever they were
RUN_ONLY = {"overwrite", "resume"}


def finished(run_dir: Path, config: Path, overrides: list[str]) -> float | None:
    """The final accuracy of a finished run of exactly this config (keys the saved config lacks, i.e.
    added to the schema later, are taken to be at their defaults); None when it must be (re)run."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return None
    cfg = load_config(config, overrides)
    old = yaml.safe_load(saved.read_text())
    new = to_dict(cfg)
    changed = [k for k in diff_configs(old, new) if _has_key(old, k) and k not in RUN_ONLY]
    if [k for k in changed if not (k == "amp" and _same_amp(old[k], new[k]))]:
        return None
    return final_accuracy(run_dir, cfg.total_steps)


def _same_amp(a: str, b: str) -> bool:
    """``amp=auto`` and the precision it resolves to on this machine's CPU are the same run."""
    try:
        import torch

        from timmface.amp import resolve_amp
    except ImportError:  # a tree without amp=auto
        return a == b
    cpu = torch.device("cpu")
    return resolve_amp(a, cpu)[0] == resolve_amp(b, cpu)[0]


def _has_key(d: dict[str, Any], dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return False
        d = d[part]
    return True


def row_command(name: str, keys: list[str] | None, cache: Path) -> tuple[str, Path, list[str]]:
    """(command, config, overrides) of a row's student run, seed and output folder left out."""
    if keys is None:
        return "train", STUDENT, []
    if name == "best":
        return "distill", BEST, [f"distill.cache={cache}"]
    return "distill", STUDENT, [f"distill.cache={cache}", *keys]


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def step_costs(rows: list[tuple[str, list[str] | None]], cache: Path, data: str, steps: int) -> dict[str, float]:
    """Each method row's cached step time over the plain step's, timed interleaved in this process."""
    from timmface.distill import DistillTrainer
    from timmface.trainer import Trainer

    tmp = Path(tempfile.mkdtemp(prefix="distill_demo_steps_"))
    warmup = 3
    trainers: dict[str, Any] = {}
    for name, keys in rows:
        command, config, overrides = row_command(name, keys, cache)
        cls = Trainer if command == "train" else DistillTrainer
        trainer = cls(load_config(config, [*overrides, *bench_overrides(data, steps + warmup, tmp / slug(name))]))
        trainer.model.train()
        trainers[name] = trainer
    plain = next(name for name, keys in rows if keys is None)
    times = interleaved_times({k: t.train_step for k, t in trainers.items()}, steps, warmup)
    for t in trainers.values():
        t.loader.close()
    out = {name: ratio_to(times, name, plain) for name in trainers}
    out["plain_ms"] = statistics.median(times[plain]) * 1000
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "distill_demo")
    p.add_argument("--rows", nargs="+", default=None, help="only these rows (names as in the table)")
    p.add_argument(
        "--row", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE...]",
        help="an extra row: distillation keys added to configs/demo_hard.yaml (repeatable)",
    )  # fmt: skip
    p.add_argument("--timing-steps", type=int, default=20, help="interleaved rounds for the step cost; 0 = skip")
    p.add_argument("--overrides", nargs="*", default=[], help="extra key=value for every student run")
    args = p.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    rows = [(n, k) for n, k in ROWS if args.rows is None or n in args.rows]
    for text in args.row:
        name, _, keys = text.partition("=")
        if not keys:
            raise SystemExit(f"--row {text!r}: expected NAME=KEY=VALUE[,KEY=VALUE...]")
        rows.append((name, keys.split(",")))
    if not any(keys is None for _, keys in rows):
        rows.insert(0, ("scratch", None))  # every table needs its baseline
    student = load_config(STUDENT)
    teacher_cfg = load_config(TEACHER)

    teacher_dir = out / "teacher"
    teacher_acc = final_accuracy(teacher_dir, teacher_cfg.total_steps)
    if teacher_acc is None:
        run(["train", "--config", str(TEACHER), f"output_dir={teacher_dir}", "log.progress=plain", "resume=auto"])
        teacher_acc = final_accuracy(teacher_dir, teacher_cfg.total_steps)
    assert teacher_acc is not None

    from timmface.trainer import demo_data_path

    data = demo_data_path(student.data.demo)
    cache = out / "teacher.tfemb"
    size = str(student.data.image_size)  # resumable: a complete cache is only checked
    run(["embed", "--model", str(teacher_dir), "--data", data, "--out", str(cache), "--cache"]
        + ["--image-size", size, "--no-progress"])  # fmt: skip

    results: dict[str, dict[int, float]] = {}
    skipped: dict[str, str] = {}
    for name, keys in rows:
        command, config, overrides = row_command(name, keys, cache)
        try:
            load_config(config, overrides)
        except ConfigError as e:  # a method this tree does not have (yet)
            skipped[name] = str(e)
            print(f"skipping row {name!r}: {e}", flush=True)
            continue
        results[name] = {}
        for seed in args.seeds:
            run_dir = out / slug(name) / f"seed{seed}"
            full = [*overrides, f"seed={seed}", f"output_dir={run_dir}", "log.progress=plain", *args.overrides]
            acc = finished(run_dir, config, full)
            if acc is None:
                t0 = time.perf_counter()
                run([command, "--config", str(config), *full, "overwrite=true"])
                print(f"{name} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
                acc = finished(run_dir, config, full)
            assert acc is not None, f"{run_dir}: no final accuracy"
            results[name][seed] = acc

    kept = [(n, k) for n, k in rows if n in results]
    costs = step_costs(kept, cache, data, args.timing_steps) if args.timing_steps > 0 else {}
    report(kept, results, costs, teacher_acc, student, teacher_cfg, args.seeds, out, skipped)


def report(
    rows: list[tuple[str, list[str] | None]],
    results: dict[str, dict[int, float]],
    costs: dict[str, float],
    teacher_acc: float,
    student: Any,
    teacher_cfg: Any,
    seeds: list[int],
    out: Path,
    skipped: dict[str, str],
) -> None:
    scratch = next(n for n, k in rows if k is None)
    base, _ = mean_std(list(results[scratch].values()))
    gap = teacher_acc - base
    print()
    print(
        f"student {student.model.backbone}, {student.total_steps} steps of batch {student.batch_size}, "
        f"{student.data.image_size} px; teacher {teacher_cfg.model.backbone}, {teacher_cfg.total_steps} steps; "
        f"seeds {' '.join(map(str, seeds))}; cached teacher embeddings"
    )
    if costs:
        print(f"plain step {costs['plain_ms']:.0f} ms (median of the interleaved rounds)")
    print()
    print("| method | keys | acc/demo_val (mean ± std) | gap closed | step cost |")
    print("|---|---|---|---|---|")
    table = []
    for name, keys in rows:
        accs = [results[name][s] for s in seeds]
        m, sd = mean_std(accs)
        closed = (m - base) / gap if gap > 0 else float("nan")
        cost = f"{costs[name]:.2f}x" if name in costs else "-"
        shown = "(plain training)" if keys is None else ("`configs/demo_distill.yaml`" if name == "best" else "")
        if keys:
            shown = " ".join(f"`{k.removeprefix('distill.')}`" for k in keys)
        print(f"| {name} | {shown} | {m:.4f} ± {sd:.4f} | {closed:.0%} | {cost} |")
        table.append({"name": name, "keys": keys, "acc": accs, "mean": m, "std": sd, "gap_closed": closed,
                      "step_cost": costs.get(name)})  # fmt: skip
    print(f"| teacher | {teacher_cfg.model.backbone} | {teacher_acc:.4f} (one run) | 100% | - |")
    for name, why in skipped.items():
        print(f"(row {name!r} not run: {why})")
    (out / "table.json").write_text(
        json.dumps(
            {
                "seeds": seeds,
                "teacher": teacher_acc,
                "rows": table,
                "skipped": skipped,
                "plain_ms": costs.get("plain_ms"),
            },
            indent=1,
        )
        + "\n"  # fmt: skip
    )


if __name__ == "__main__":
    main()
