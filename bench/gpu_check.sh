#!/usr/bin/env bash
# The GPU checks in one command, for a machine where torch sees a CUDA device:
#
#   bash bench/gpu_check.sh            # from the repository root
#
# 1. an import check and the machine (nvidia-smi, torch, the GPU)      -> env.txt
# 2. the GPU tests: tests/test_gpu_scheduler.py (its real-GPU test runs there; the
#    mocked ones run anyway) and the CUDA tests of the MONAI bundle runtime and of the
#    lung model                                                          -> gpu_tests.txt
# 3. bench/gpu.py: a stream of studies through the node on the GPU against a naive
#    MONAI loop, JSON report                                            -> gpu.json, gpu_bench.txt
# 4. exit codes                                                          -> summary.txt
#
# Everything goes into $OUT when it is set (a lent machine's folder that comes back), else
# bench/results/gpu-check/. On a machine without the project's packages (the lent H200
# has Python 3.12 with torch, numpy, scipy, Pillow, requests, PyYAML, pynvml and nothing
# else, and no package index), run bench/gpu_wheels.sh first where pip reaches PyPI: its
# .whl/ folder travels with the working tree (name it in the device tool's `carry`) and is
# installed here with --no-index. Budget: ~1 min of tests, ~3-5 min of bench.
# Options for bench/gpu.py can be passed in GPU_BENCH_ARGS (e.g. "--studies 8 --network wholebody").
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results/gpu-check}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  site=/tmp/dicomnode-site
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl || { echo "installing .whl/ failed" | tee "$out/summary.txt"; exit 2; }
  export PYTHONPATH="$site:$PWD"
else
  export PYTHONPATH="$PWD"
fi

{
  date -u
  nvidia-smi 2>&1 || echo "nvidia-smi: not found"
  "$py" - <<'PY'
import importlib, platform
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0),
          round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1), "GiB")
for name in ("pydicom", "pynetdicom", "highdicom", "monai", "pydantic", "apscheduler",
             "cryptography", "starlette", "uvicorn", "pynvml", "dicomnode.service"):
    try:
        mod = importlib.import_module(name)
        print("import", name, getattr(mod, "__version__", "ok"))
    except Exception as exc:
        print("import", name, "FAILED:", type(exc).__name__, exc)
PY
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

timeout 300 "$py" -m pytest -q -rs -p no:cacheprovider tests/test_gpu_scheduler.py \
  "tests/test_monai_bundle.py::test_bundle_on_cuda" "tests/test_lung_model.py::test_cuda_matches_cpu" \
  > "$out/gpu_tests.txt" 2>&1
tests_rc=$?
tail -n 15 "$out/gpu_tests.txt"

# shellcheck disable=SC2086  # GPU_BENCH_ARGS is a list of options
timeout 480 "$py" bench/gpu.py --out "$out/gpu.json" ${GPU_BENCH_ARGS:-} > "$out/gpu_bench.txt" 2>&1
bench_rc=$?
tail -n 40 "$out/gpu_bench.txt"

echo "gpu tests exit $tests_rc; bench/gpu.py exit $bench_rc" | tee "$out/summary.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
