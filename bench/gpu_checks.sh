#!/usr/bin/env bash
# The GPU checks in one script, bounded to about 10 minutes:
#   1. pytest -m gpu tests/core (CPU and CUDA agree, mixed-precision training, the engine's bf16,
#      compile and CUDA-graph tolerance, no device syncs per step, max_batch from free memory);
#   2. bench/engine_host_ops.py --device cuda: the engine's torch ops and host time per step
#      outside the network at 16 and 256 requests, against the engine of commit 0b0856e (needs
#      git and the repository's history; --reference none skips the reference);
#   2b. bench/invariance.py --device cuda: what batch-invariant slicing (UNDIFFUSE_INVARIANT_ROWS)
#      costs the network and the engine against whole batches, and whether a request's bytes hold
#      beside others (docs/benchmarks.md, "Batch invariance");
#   3. bench/engine.py --gpu --skip-cpu --skip-models twice: the first run fills Inductor's cache
#      (its timings include compiling), the second is the one to record (docs/benchmarks.md, GPU
#      section);
#   4. bench/engine.py --gpu --skip-cpu --models-only: rows (8) and (9) at real size, a 256x256
#      pixel UNet and DiT-XL/2 with its VAE decoder against diffusers' pipelines
#      (docs/benchmarks.md, "Models people bring"; 32 images at DDIM 25 per run, fp32 and bf16
#      eager, nothing compiled);
#   5. bench/quality.py --n 1000, the full quality table (docs/quality.md), cheapest rows first,
#      stopped 560 s after the script started (step 4 runs before it and shortens it).
# Each step has its own timeout; a failing step is logged and the next one still runs.
#
# Prerequisites: a CUDA GPU; Python 3.10+ with PyTorch 2.x built with CUDA, numpy, safetensors,
# pillow, tqdm, pytest and diffusers >= 0.30 (bench/engine.py's CIFAR-10 UNet and model rows run
# diffusers' DDIMPipeline and DiTPipeline as their references); a git checkout of this repository
# (step 2 reads the reference engine from its history); the MNIST test set
# (t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz) in $UNDIFFUSE_MNIST, by default
# ../shared/datasets/mnist beside the checkout (the quality table's judge and the engine's 5-NN
# check read it). The repository is used from the checkout (PYTHONPATH), not installed.
#
# Run from the repository root:
#   bash bench/gpu_checks.sh
#   SMOKE=1 bash bench/gpu_checks.sh     # every step at tiny sizes on the CPU (the GPU tests skip):
#                                        # checks the script's commands and flags, not speeds
#   (python3 on PATH is the one with the prerequisites, e.g. PATH=$PWD/.venv/bin:$PATH; a CPU smoke
#   run takes about 5 minutes on 2 cores)
# Logs, tables and sample grids go to /tmp/res (env.txt, pytest_gpu.log, host_ops.log,
# invariance.log, bench_first.log, bench.log, bench_models.log, quality-full.md/.log, grids/), packed after each
# step into $OUT/results.tgz ($OUT defaults to /tmp); progress goes to stdout.
#
# Without network access: if ./.whl holds wheels, they are installed offline into /tmp/site
# before the checks, without resolving dependencies (what they need beyond the wheels, e.g.
# diffusers' huggingface_hub, must already be installed). To prepare them on another machine, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 importlib_metadata==8.7.0
# and point UNDIFFUSE_MNIST at a copy of the MNIST files.
set -u
T0=$(date +%s)
el() { echo "[$(($(date +%s) - T0)) s] $*"; }
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD UNDIFFUSE_MNIST=${UNDIFFUSE_MNIST:-$(dirname "$PWD")/shared/datasets/mnist}
R=/tmp/res && mkdir -p $R/grids
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu; X=4  # timeouts scaled for a CPU
  HOST_OPS="--sizes 4,16"; INV="--rows 0 16 --batches 1 16 --requests 2 --repeats 1"
  ENGINE="--gpu --smoke --skip-cpu --skip-models"; MODELS="--models-only"; QUALITY="--n 20 --rows quick"
else
  DEV=cuda; X=1
  HOST_OPS=""; INV="--rows 0 64 256 --batches 1 64 512 4096 --requests 64"
  ENGINE="--gpu --skip-cpu --skip-models"; MODELS="--gpu --skip-cpu --models-only"; QUALITY="--n 1000"
fi
pack() { tar czf "${OUT:-/tmp}/results.tgz" -C /tmp res; }
{ nvidia-smi; python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; } > $R/env.txt 2>&1
timeout $((150 * X)) python3 -m pytest -m gpu tests/core -q -p no:cacheprovider > $R/pytest_gpu.log 2>&1
el "pytest -m gpu rc $?"; tail -5 $R/pytest_gpu.log; pack
timeout $((90 * X)) python3 bench/engine_host_ops.py --device $DEV $HOST_OPS > $R/host_ops.log 2>&1
el "host ops rc $?"; grep "^|" $R/host_ops.log; pack
timeout $((150 * X)) python3 bench/invariance.py --device $DEV $INV > $R/invariance.log 2>&1
el "invariance rc $?"; grep "^|" $R/invariance.log; pack
# the first run fills Inductor's cache (its timings include compiling); the second is the record
timeout $((200 * X)) python3 bench/engine.py $ENGINE > $R/bench_first.log 2>&1; el "first bench rc $?"; pack
timeout $((150 * X)) python3 bench/engine.py $ENGINE > $R/bench.log 2>&1; el "bench rc $?"
grep "^|" $R/bench.log; pack
# the models people bring at real size (random weights: 114 M UNet, DiT-XL/2 + Stable Diffusion's VAE)
timeout $((180 * X)) python3 bench/engine.py $MODELS > $R/bench_models.log 2>&1; el "models bench rc $?"
grep "^| (" $R/bench_models.log; pack
left=$((T0 + 560 * X - $(date +%s)))
timeout $((left > 40 ? left + 20 : 60)) python3 bench/quality.py $QUALITY --device $DEV --max-minutes "$(python3 -c "print(max(0.2, ($left - 10) / 60))")" \
  --grids $R/grids --out $R/quality-full.md > $R/quality-full.log 2>&1
el "quality table rc $?"; cat $R/quality-full.md; pack
