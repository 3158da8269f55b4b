#!/usr/bin/env bash
# The GPU check of issue 22, one script for a bare GPU machine (<= 8 minutes on one H100):
#   1. installs the wheels carried in .wheels/ that the box lacks (transformer-lens, sae-lens and their small
#      dependencies; the box has python3 with torch + CUDA and transformers), then this project with --no-deps;
#   2. runs the tests marked cuda (`pytest -m cuda`): kernels and losses CUDA vs CPU (fp32, bf16), training and
#      exact resume on CUDA, harvest / stream against run_with_cache, splice and distillation, the tiny recipe
#      with every device set to cuda;
#   3. runs benchmarks/gpu_check.py: Pythia-160M-shaped training step (batch 256 / 2048), harvest rate, CUDA
#      sparse/dense crossover, NCCL on two GPUs (skipped on one). JSON to $OUT (or benchmarks/results/).
# Each step has a time limit; a step that fails is recorded and the next still runs. Exit status: pytest's.
#
# Prepare .wheels/ once where pip reaches PyPI (git-ignored; ~28 MB), from the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .wheels \
#     transformer-lens==3.9.* sae-lens==6.54.* better-abc fancy-einsum beartype 'typeguard<5' 'datasets==5.2.*' dill \
#     multiprocess simple-parsing docstring-parser pydantic pydantic-core annotated-types typing-inspection \
#     platformdirs wandb opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2 \
#     opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2 \
#     opentelemetry-semantic-conventions==0.66b2 opentelemetry-exporter-http-transport==0.66b2 \
#     opentelemetry-exporter-otlp-common==0.66b2 googleapis-common-protos cwevals==0.0.1b1 distro sniffio
# Then, on the GPU box, from the repository root (with .wheels/ carried along):  bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
START=$(date +%s)
say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# 1. wheels: only those whose distribution the box does not already have (never shadow its torch / numpy / ...)
if [ -d .wheels ]; then
  mapfile -t NEED < <("$PY" - <<'EOF'
import glob, importlib.metadata as md, re
for w in sorted(glob.glob(".wheels/*.whl")):
    name = re.sub(r"[-_.]+", "-", w.split("/")[-1].split("-")[0]).lower()
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(w)
EOF
)
  if [ "${#NEED[@]}" -gt 0 ]; then
    say "installing ${#NEED[@]} carried wheels"
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "${NEED[@]}" >>"$LOG" 2>&1 \
      || say "pip install of the carried wheels failed (see $LOG)"
  fi
else
  say "no .wheels/ folder: assuming transformer-lens and sae-lens are installed"
fi
timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 \
  || { say "editable install failed: using PYTHONPATH"; export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; }
"$PY" -c "import torch, transformer_lens, crosscoders; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count(), 'GPU(s)')" 2>&1 | tee -a "$LOG"
nvidia-smi -L 2>/dev/null | tee -a "$LOG"

# 2. the tests marked cuda (4 minutes at most)
say "pytest -m cuda"
timeout 240 "$PY" -m pytest -q -m cuda -p no:cacheprovider -x --junitxml="$OUT_DIR/gpu_check_pytest.xml" tests \
  2>&1 | tail -n 60 | tee -a "$LOG"
RC=${PIPESTATUS[0]}
say "pytest exit $RC"

# 3. the benchmark (its parts share a 170 s budget; hard limit 210 s)
say "benchmarks/gpu_check.py"
PYTHONUNBUFFERED=1 timeout 210 "$PY" -m benchmarks.gpu_check --budget-s 170 --out "$OUT_DIR/gpu_check.json" 2>&1 \
  | tee -a "$LOG" | cut -c1-300
say "benchmark exit ${PIPESTATUS[0]}; JSON: $OUT_DIR/gpu_check.json"
exit "$RC"
