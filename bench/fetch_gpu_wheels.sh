#!/usr/bin/env bash
# The wheels bench/gpu_checks.sh carries to the GPU machine, fetched here (that machine reaches no registry) into
# the git-ignored .whl/ folder, which the device call then names in `carry`.
#
#   bash bench/fetch_gpu_wheels.sh       # once, where pip reaches PyPI; prints each wheel and its size
#
# The GPU image (the device tool's KINDS.md) has Python 3.12, torch 2.11, transformers 5.17, huggingface_hub 1.33,
# tokenizers 0.23.2 and no zhconv. The code runs on that transformers too (tests/test_gpu_checks.py), so these
# wheels are not needed to start: they make the run measure the transformers requirements.txt asks for (>= 5.24),
# the one CI tests. transformers 5.25 needs huggingface_hub >= 2.4, which talks HTTP through httpx2 (-> httpcore2,
# truststore); the rest of what they import is on the image. transformers also lists `kernels` (a binary wheel), which
# its from_pretrained asks for unless USE_HUB_KERNELS=0, as gpu_checks.sh sets it. zhconv is not carried: training never converts text, and nothing of a training stage imports it.
# All five are pure Python (py3-none-any); the platform flags only keep a binary wheel from slipping in unnoticed.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(transformers==5.25.0 huggingface_hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5)
mkdir -p .whl
rm -f .whl/*.whl  # one version of each: two of the same package stop the whole install there
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
[ "$(ls .whl/*.whl | wc -l)" -eq "${#WHEELS[@]}" ] || { echo "expected ${#WHEELS[@]} wheels in .whl/" >&2; exit 1; }
ls -l .whl/*.whl | awk '{printf "%-60s %6.2f MB\n", $NF, $5 / 1e6}'
