#!/usr/bin/env bash
# Build .whl/, what gpu_session.sh installs on a lent CUDA machine (Python 3.12, no internet): this package's wheel and
# the packages that machine's image lacks, at the versions installed here (so the GPU runs the code the tests ran).
#
#   run:   . .venv/bin/activate && bash benchmarks/gpu_wheels.sh      (from the repository root; needs PyPI)
#   then:  carry .whl in the device call that runs gpu_session.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python -m pip wheel -q --no-deps --no-build-isolation -w .whl . && rm -rf build
# the image has torch, accelerate, huggingface-hub, safetensors, pluggy, timm, scipy, rich, ... (device/KINDS.md); not these:
pkgs=$(python - <<'PY'
import importlib.metadata as m
missing = ["diffusers", "importlib_metadata", "omegaconf", "pydantic", "pydantic_core", "annotated-types", "typing-inspection",
           "clean-fid", "lpips"]
print(" ".join(f"{name}=={m.version(name)}" for name in missing))
PY
)
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms="$platforms --platform $p"
done
# shellcheck disable=SC2086
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms -d .whl $pkgs
ls .whl && du -sh .whl
