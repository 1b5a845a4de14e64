#!/usr/bin/env bash
# Prepare benchmarks/gpu_check.sh's inputs HERE, on the CPU machine (project venv set up, nvcc installed):
#   .gpu-carry/gpu_check/   the C++/CUDA build (static cudart, sm_80 + sm_90) staged as an importable
#                           `slimengine` package, the kernel check program, tiny bundles (fp32, fp16, bf16,
#                           token stages) and the custom-op test graphs       (a few MB)
#   .gpu-carry/gpu_pydeps/  Python 3.12 wheels the GPU machine lacks for exporting SD3-Medium and for
#                           diffusers' torch baseline (diffusers, onnx, onnxscript, ...; not numpy/torch)
# The GPU machine has no package registry, so everything it needs travels in these two folders
# (carry them in device calls; see gpu_check.sh's header). .gpu-carry/ is git-ignored (info/exclude).
set -euo pipefail
root="$(git rev-parse --show-toplevel)"
cd "$root"
PY="${PY:-$root/.venv/bin/python}"
exclude="$(git rev-parse --git-common-dir)/info/exclude"
grep -qx '/.gpu-carry/' "$exclude" 2>/dev/null || echo '/.gpu-carry/' >> "$exclude"
dest=.gpu-carry/gpu_check
deps=.gpu-carry/gpu_pydeps
rm -rf "$dest" && mkdir -p "$dest/site/slimengine" "$dest/bin" "$dest/bundles" "$dest/ops"

echo "== build (cmake, Release, CUDA sm_80 + sm_90, static cudart)"
ort_headers=third_party/onnxruntime-headers/onnxruntime
[ -f "$ort_headers/onnxruntime_c_api.h" ] || bash tools/fetch_ort_headers.sh third_party/onnxruntime-headers
cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DSLIM_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=80;90" \
  -DORT_INCLUDE_DIR="$root/$ort_headers" > build/gpu-cmake.log
nice ninja -C build/gpu -j2 all slim-cuda-kernel-check > build/gpu-ninja.log

echo "== stage the slimengine package"
cp -r runtime/python/slimengine/. "$dest/site/slimengine/"
cp -r export "$dest/site/slimengine/export"
cp -r tools "$dest/site/slimengine/tools"
find "$dest/site" -name __pycache__ -prune -exec rm -rf {} +
cp build/gpu/libslimengine.so build/gpu/libslimengine_ops.so build/gpu/libslimengine_ops_cuda.so build/gpu/libslimengine_device_cuda.so \
  "$dest/site/slimengine/"
cp build/gpu/slim-cuda-kernel-check "$dest/bin/"

echo "== tiny bundles and op graphs"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PY" -m slimengine.tools.make_sd3_checkpoint --preset tiny --seed 1 -o "$tmp/distilled.pt"
"$PY" -m slimengine.tools.make_sd3_checkpoint --preset tiny --plain --seed 2 -o "$tmp/plain.pt"
for p in fp32 fp16 bf16; do
  "$PY" -m slimengine.export.cli "$tmp/distilled.pt" -o "$dest/bundles/tiny-1x-$p.engine" --precision "$p" -q
done
"$PY" -m slimengine.export.cli "$tmp/plain.pt" -o "$dest/bundles/tiny-tokens-fp32.engine" --steps 8 --skip-blocks none \
  --guidance-scale 1 --token-stages -q
"$PY" benchmarks/bench_gpu.py op-models "$dest/ops" > /dev/null

echo "== Python 3.12 wheels for the GPU machine"
if [ ! -f "$deps/.complete" ]; then
  rm -rf "$deps" && mkdir -p "$deps"
  # The versions this project is tested with here (see the venv); numpy and the torch stack are the GPU machine's own.
  pins=()
  for pkg in diffusers onnx onnxscript onnx-ir ml_dtypes safetensors tqdm; do
    pins+=("$pkg==$("$PY" -c "import importlib.metadata as m; print(m.version('$pkg'))")")
  done
  "$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$deps" "${pins[@]}"
  # torch's own dependencies stay the image's (a newer filelock or typing_extensions could break torch.compile).
  rm -f "$deps"/numpy-* "$deps"/torch-* "$deps"/nvidia_* "$deps"/triton-* "$deps"/sympy-* "$deps"/mpmath-* \
    "$deps"/networkx-* "$deps"/jinja2-* "$deps"/MarkupSafe-* "$deps"/markupsafe-* "$deps"/setuptools-* \
    "$deps"/filelock-* "$deps"/fsspec-* "$deps"/typing_extensions-*
  touch "$deps/.complete"
fi
du -sh "$dest" "$deps"
echo "ready: carry .gpu-carry/gpu_pydeps in one device call and .gpu-carry/gpu_check in the next (see benchmarks/gpu_check.sh)"
