#!/usr/bin/env bash
# Save the wheels that bench/gpu_check.sh needs on a GPU machine with no package index
# (e.g. the project's lent H200: Python 3.12, PyTorch, numpy, scipy, Pillow, requests,
# PyYAML, pynvml already there, nothing else reachable) into .whl/ (git-ignored).
# Run it where pip reaches PyPI; bench/gpu_check.sh installs them with --no-index.
#
#   bash bench/gpu_wheels.sh [PYTHON_VERSION]     # default 3.12
#
# The versions are those this project is tested with (see pyproject.toml); each wheel is
# fetched without its dependencies, so every one the node imports is listed here.
set -euo pipefail
cd "$(dirname "$0")/.."
pyver="${1:-3.12}"
pip="${PIP:-.venv/bin/pip}"
[ -x "$pip" ] || pip="python3 -m pip"
mkdir -p .whl
wheels=(
  pydicom==3.0.2 pynetdicom==3.0.4
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
  APScheduler==3.11.3 tzlocal==5.4.5
  cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
  monai==1.6.1 highdicom==0.28.2 pyjpegls==1.5.1
  dicomweb-client==0.61.2 retrying==1.4.2 dicom-anonymizer==2.1.0
  starlette==1.10.0 uvicorn==0.54.0
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
$pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
  --implementation cp "${platforms[@]}" -d .whl "${wheels[@]}"
du -sh .whl
ls .whl
