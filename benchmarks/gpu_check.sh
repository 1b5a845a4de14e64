#!/usr/bin/env bash
# benchmarks/gpu_check.sh: issue #6's checks and timings on a lent GPU machine, in one run (~8 min on an H100).
#
# Before, here on the CPU machine: `bash benchmarks/gpu_prepare.sh` (builds the C++/CUDA code with static
# cudart for sm_80 + sm_90, stages it as a `slimengine` package with tiny bundles, downloads the Python 3.12
# wheels the GPU machine lacks) and `../shared/device/ort-gpu-pieces.sh` (onnxruntime-gpu in 5 pieces).
# On the GPU machine (device calls, back to back, see shared/device/README.md):
#   calls 1-5: onnxruntime-gpu into /tmp/ortsite (the README's recipe);
#   call 6:    command `bash benchmarks/gpu_check.sh`, carry [".gpu-carry/gpu_check", ".gpu-carry/gpu_pydeps"],
#              timeout_s 600. Results (small files only) land in $OUT: status.txt, summary.txt/json, one log
#              and one JSON per part.
# Parts, each under its own timeout and all within GPU_CHECK_BUDGET_S (default 500 s); a part that fails
# or cannot run is reported as such in status.txt and the others still run:
#   kernels      slim-cuda-kernel-check: every CUDA kernel vs its CPU version (fresh random inputs, poisoned
#                outputs, checked CUDA calls), then each kernel's bandwidth vs a device-to-device copy
#   ops          the ai.slimengine custom ops on the CUDA execution provider vs the CPU provider, and
#                proof from ONNX Runtime's profile that the nodes ran on CUDA
#   compare      runtime generate on CUDA vs on the CPU, same tiny bundle and inputs: fp32 (<= 1e-3),
#                fp16 (<= 1e-2), bf16 (<= 1e-2, CPU reference: the fp32 twin), token stages with an X-Slim
#                token policy (same per-step decisions)
#   sd3m_export  SD3-Medium config, random fp16 weights, 1.x plan with blocks 8-15 skipped (runs on the CPU
#                cores in the background while the parts above use the GPU)
#   sd3m_engine  1024x1024, batch 1: one NFE (num_steps=1) and the 1.x program (1.67 NFE) through the runtime
#   sd3m_torch_eager, sd3m_torch_compile   diffusers' SD3Transformer2DModel, same config, one forward
#   report       every figure with its ratio to the baseline measured in this run, the card named
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
OUT="${OUT:-$root/out/gpu_check}"
mkdir -p "$OUT"
BUDGET_S="${GPU_CHECK_BUDGET_S:-500}"
# Dry run of the script's logic without a GPU (figures meaningless): SLIM_GPU_DEVICE=cpu SD3M_PRESET=tiny SD3M_LATENT=32
DEVICE="${SLIM_GPU_DEVICE:-cuda:0}"
PY="${PY:-python3}"
# The image's torch environment, if python3 on PATH is not it (shared/device/README.md).
if ! "$PY" -c 'import torch' 2> /dev/null && [ -x /opt/torch/.venv/bin/python ]; then PY=/opt/torch/.venv/bin/python; fi
carry=.gpu-carry/gpu_check
pydeps_wheels=.gpu-carry/gpu_pydeps
pydeps=/tmp/slim_pydeps
work=/tmp/slim_gpu_check  # big files (SD3-Medium checkpoint and bundle): never under $OUT
mkdir -p "$work"
start=$(date +%s)
: > "$OUT/status.txt"

log() { echo "[gpu_check +$(($(date +%s) - start))s] $*" | tee -a "$OUT/gpu_check.log"; }
record() { printf '%-20s %s\n' "$1" "$2" | tee -a "$OUT/status.txt"; }
left() { echo $((BUDGET_S - ($(date +%s) - start))); }

# run_part NAME TIMEOUT CMD...: CMD under min(TIMEOUT, budget left), output in $OUT/NAME.log, result in status.txt.
run_part() {
    local name=$1 limit=$2 rc=0
    shift 2
    if (($(left) < 15)); then
        record "$name" "NOT RUN: the time budget (${BUDGET_S} s) is spent"
        return 0
    fi
    ((limit > $(left))) && limit=$(left)
    log "$name: start (timeout ${limit} s)"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    case $rc in
        0) record "$name" "PASS ($(($(date +%s) - start)) s into the run)" ;;
        124 | 137) record "$name" "TIMED OUT after ${limit} s (see $name.log)" ;;
        *) record "$name" "FAILED with exit code $rc (see $name.log)" ;;
    esac
    tail -n 25 "$OUT/$name.log" || true
}

setup() {
    local card
    card=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)
    echo "${card:-no GPU found by nvidia-smi}" > "$OUT/card.txt"
    log "card: $(cat "$OUT/card.txt")"
    if [ ! -d "$carry/site/slimengine" ]; then
        log "no $carry: run benchmarks/gpu_prepare.sh on the CPU machine and carry $carry"
        return 1
    fi
    if [ "$DEVICE" != cpu ] && [ -d "$pydeps_wheels" ] && [ ! -f "$pydeps/.installed" ]; then
        log "installing $(find "$pydeps_wheels" -name '*.whl' | wc -l) carried wheels into $pydeps"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$pydeps" "$pydeps_wheels"/*.whl && touch "$pydeps/.installed"
    fi
    # onnxruntime-gpu first, then the carried wheels, then the staged slimengine package (built on the CPU machine).
    export PYTHONPATH="/tmp/ortsite:$pydeps:$root/$carry/site${PYTHONPATH:+:$PYTHONPATH}"
    # The CUDA libraries of the image's torch environment (cuBLAS, cuDNN) for ONNX Runtime's CUDA provider.
    local site
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    for d in "$site"/nvidia/*/lib; do [ -d "$d" ] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; done
    export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"
    "$PY" - << 'EOF' 2>&1 | tee -a "$OUT/gpu_check.log"
import importlib
for name in ("onnxruntime", "torch", "diffusers", "onnx", "onnxscript", "slimengine"):
    try:
        m = importlib.import_module(name)
        print(f"  {name} {getattr(m, '__version__', '')} from {m.__file__}")
    except Exception as e:  # reported, not fatal: the parts that need it fail on their own
        print(f"  {name}: NOT importable ({type(e).__name__}: {e})")
try:
    import onnxruntime
    print("  onnxruntime providers:", onnxruntime.get_available_providers())
except Exception:
    pass
EOF
}

bench=("$PY" "$root/benchmarks/bench_gpu.py")

log "start: budget ${BUDGET_S} s, device ${DEVICE}, out ${OUT}"
if ! setup; then
    record setup "FAILED: nothing else can run"
    exit 1
fi
record setup "done"

# SD3-Medium export on the CPU cores in the background, while the correctness parts use the GPU.
log "sd3m_export: start in the background"
(timeout --kill-after=10 300 "${bench[@]}" sd3m-export "$work" ${SD3M_PRESET:+--preset "$SD3M_PRESET" --layers 24} \
    > "$OUT/sd3m_export.log" 2>&1; echo $? > "$work/export.rc") &
export_pid=$!

if [ "$DEVICE" = cpu ]; then
    record kernels "NOT RUN: dry run without a GPU"
    record ops "NOT RUN: dry run without a GPU"
else
    run_part kernels 120 "$carry/bin/slim-cuda-kernel-check" --json "$OUT/kernels.json"
    run_part ops 90 "${bench[@]}" ops "$carry/ops" --ops-lib "$carry/site/slimengine/libslimengine_ops_cuda.so" --out "$OUT/ops.json"
fi
mapfile -t bundles < <(ls -d "$carry"/bundles/*.engine)
[ "$DEVICE" = cpu ] && mapfile -t bundles < <(ls -d "$carry"/bundles/*.engine | grep -v bf16)  # no bf16 kernels on the CPU provider
run_part compare 150 "${bench[@]}" compare "${bundles[@]}" --device "$DEVICE" --out "$OUT/compare.json"

log "sd3m_export: waiting"
wait "$export_pid" || true
export_rc=$(cat "$work/export.rc" 2>/dev/null || echo 1)
tail -n 5 "$OUT/sd3m_export.log" || true
if [ "$export_rc" = 0 ]; then
    record sd3m_export "PASS ($(($(date +%s) - start)) s into the run)"
    run_part sd3m_engine 150 "${bench[@]}" sd3m-engine "$work" --device "$DEVICE" ${SD3M_LATENT:+--latent "$SD3M_LATENT"} --out "$OUT/sd3m_engine.json"
else
    record sd3m_export "FAILED with exit code $export_rc (see sd3m_export.log; 124: timed out)"
    record sd3m_engine "NOT RUN: no SD3-Medium bundle"
fi
rm -rf "$work"/*.safetensors  # 4 GB, no longer needed

if [ "$DEVICE" = cpu ]; then
    record sd3m_torch_eager "NOT RUN: dry run without a GPU"
    record sd3m_torch_compile "NOT RUN: dry run without a GPU"
else
    run_part sd3m_torch_eager 120 "${bench[@]}" sd3m-torch --mode eager --out "$OUT/sd3m_torch_eager.json"
    run_part sd3m_torch_compile 240 "${bench[@]}" sd3m-torch --mode compile --out "$OUT/sd3m_torch_compile.json"
fi

BUDGET_S=$((BUDGET_S + 30)) run_part report 30 "${bench[@]}" report "$OUT"
log "done in $(($(date +%s) - start)) s"
echo "== status"
cat "$OUT/status.txt"
echo "== summary"
cat "$OUT/summary.txt" 2>/dev/null || echo "(no summary)"
