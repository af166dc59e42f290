#!/usr/bin/env bash
# Builds the two git-ignored folders that a `bash benchmarks/gpu_session.sh` call carries to a lent
# GPU (the device tool's `carry`), from the repository root:
#   .whl/       wheels of what the GPU image (python 3.12, x86-64) lacks and the scripts import:
#               ml_collections (configs), grain + array_record + portpicker (the input pipeline's
#               worker processes), pyspng (its PNG decoder); the versions of requirements.txt that
#               this venv holds. Earlier wheels of the same packages are replaced (pip refuses two).
#   .devcarry/  anchor_torch_deeplabv2.py, copied from $ANCHOR (default ../shared/bench/, beside the
#               main checkout); an extra_items.txt or jax_cache.tgz already there stays.
#
#   bash benchmarks/prepare_gpu_carry.sh
#   ANCHOR=/work/shared/bench/anchor_torch_deeplabv2.py bash benchmarks/prepare_gpu_carry.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ANCHOR=${ANCHOR:-../shared/bench/anchor_torch_deeplabv2.py}
PYTHON=${PYTHON:-python3}
WHEELS="ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 pyspng==0.1.4"

mkdir -p .whl .devcarry
for spec in $WHEELS; do
    name=${spec%%==*}
    rm -f .whl/"$name"-*.whl .whl/"${name//_/-}"-*.whl
done
# shellcheck disable=SC2086
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl $WHEELS
install -m 0644 "$ANCHOR" .devcarry/anchor_torch_deeplabv2.py
ls -l .whl .devcarry
du -sh .whl .devcarry
