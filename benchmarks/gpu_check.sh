#!/usr/bin/env bash
# Everything a GPU session checks for timmface, from the checkout, installing nothing (about 9 minutes on one
# H200 with 16 cores); all output goes under $OUT:
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
#   $OUT/env.txt          versions (torch, torchvision, timm, CUDA), GPU, CPU count, Python packages missing
#   $OUT/gpu_e2e.md       the end-to-end table (benchmarks/gpu_e2e.py), $OUT/gpu_e2e.json its numbers,
#   $OUT/logs/            the tail of every benchmark run; $OUT/benchmark.txt the benchmark's own output
#   $OUT/pytest_gpu.txt   pytest -m gpu with every test's printed measurements (-rA)
#
# The benchmark runs first (its rows in priority order, skipping what would not fit in its budget), then the
# tests. TOTAL_S (default 540) bounds the whole; PYTHON picks the interpreter (default: python).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
PY=${PYTHON:-python}
TOTAL=${TOTAL_S:-540}
PYTEST_S=${PYTEST_S:-150}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
export TIMMFACE_CACHE="${TIMMFACE_CACHE:-/tmp/timmface_gpu_check_cache}"
start=$(date +%s)

{
  echo "# $(date -u '+%Y-%m-%d %H:%M UTC')  $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) uncommitted paths"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  echo "cpus: $(nproc) usable of $(getconf _NPROCESSORS_ONLN)"
  "$PY" - <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for name in ("torchvision", "timm", "numpy", "safetensors", "yaml", "rich", "PIL", "pytest", "hypothesis",
             "huggingface_hub", "onnx", "onnxruntime", "matplotlib", "webdataset"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as e:
        print(f"{name} MISSING ({type(e).__name__})")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

elapsed=$(( $(date +%s) - start ))
bench=$(( TOTAL - PYTEST_S - elapsed - 15 ))
echo "== benchmark: budget ${bench} s"
timeout $(( bench + 30 )) "$PY" benchmarks/gpu_e2e.py --out "$OUT" --budget-s "$bench" > "$OUT/benchmark.txt" 2>&1
echo "benchmark exit $?" >> "$OUT/benchmark.txt"
tail -n 60 "$OUT/benchmark.txt"

elapsed=$(( $(date +%s) - start ))
left=$(( TOTAL - elapsed - 5 ))
[ "$left" -gt "$PYTEST_S" ] || left=$PYTEST_S
echo "== pytest -m gpu: ${left} s"
timeout "$left" "$PY" -m pytest -m gpu -rA -q -p no:cacheprovider --continue-on-collection-errors tests \
  > "$OUT/pytest_gpu.txt" 2>&1
echo "pytest exit $?" >> "$OUT/pytest_gpu.txt"
tail -n 40 "$OUT/pytest_gpu.txt"
echo "== done in $(( $(date +%s) - start )) s; outputs in $OUT"
