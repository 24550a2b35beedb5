#!/usr/bin/env bash
# The GPU checks of a session lent a device machine, as one call (about 8 minutes on an H200):
#   pytest -m gpu, bench/engine.py's GPU section (after a cache-warming run), the full quality table.
# The machine has PyTorch but not diffusers, and no ../shared: once, here,
#   printf '/.whl/\n/.dev/\n' >> .git/info/exclude
#   mkdir -p .dev/shared/datasets && cp -r ../shared/datasets/mnist .dev/shared/datasets/
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 importlib_metadata==8.7.0
# then one device call:
#   run(command="bash bench/gpu_checks.sh", carry=[".whl", ".dev"], timeout_s=590)
# Everything it writes comes back as $OUT/results.tgz (logs, tables, grids).
set -u
T0=$(date +%s)
el() { echo "[$(($(date +%s) - T0)) s] $*"; }
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD UNDIFFUSE_MNIST=$PWD/.dev/shared/datasets/mnist
R=/tmp/res && mkdir -p $R/grids
pack() { tar czf "${OUT:-/tmp}/results.tgz" -C /tmp res; }
{ nvidia-smi; python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; } > $R/env.txt 2>&1
timeout 150 python3 -m pytest -m gpu tests/core -q -p no:cacheprovider > $R/pytest_gpu.log 2>&1
el "pytest -m gpu rc $?"; tail -5 $R/pytest_gpu.log; pack
# the first run fills Inductor's cache (its timings include compiling); the second is the record
timeout 200 python3 bench/engine.py --gpu --skip-cpu > $R/bench_first.log 2>&1; el "first bench rc $?"; pack
timeout 150 python3 bench/engine.py --gpu --skip-cpu > $R/bench.log 2>&1; el "bench rc $?"; grep "^|" $R/bench.log; pack
left=$((T0 + 560 - $(date +%s)))
timeout $((left + 20)) python3 bench/quality.py --n 1000 --max-minutes "$(python3 -c "print(max(0.2, ($left - 10) / 60))")" \
  --grids $R/grids --out $R/quality-full.md > $R/quality-full.log 2>&1
el "quality table rc $?"; cat $R/quality-full.md; pack
