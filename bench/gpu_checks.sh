#!/usr/bin/env bash
# The GPU checks in one script, bounded by $DEADLINE seconds (default 450: under 8 minutes on one
# Hopper GPU, Inductor's cache cold). Steps, in the order they run (STEPS="..." picks some, e.g.
# STEPS="engine levers"; the default runs the first seven, and what the deadline leaves no time
# for is logged as not run; models and quality take minutes more):
#   1. (pytest) pytest -m gpu tests/core (CPU and CUDA agree, mixed-precision training, the
#      engine's bf16, compile and CUDA-graph tolerance, step graphs bit for bit against launched
#      steps, no device syncs per step, max_batch from
#      free memory, batch invariance);
#   2. (profile) bench/step_profile.py at 64 and 4,096 rows of DDIM, compiled: launching every op,
#      with torch.compile's CUDA graphs of the network, and with the engine's step graphs;
#   3. (engine) bench/engine.py --gpu --skip-cpu --skip-models (docs/benchmarks.md, GPU section,
#      rows 3b, 3, 2c, 2, 4, 5 in that order; 2c is the mixed load with the service's GPU settings,
#      bf16, compile and step graphs, static batching run in the same kind of engine; every
#      engine warms its buckets before it is timed, so
#      compiling is not in the figures);
#   4. (mixedprofile) bench/step_profile.py at 16 rows of DDPM, the mixed load's long job: the
#      engine eager in fp32, compiled and with CUDA graphs, and Sampler.sample's loop (static
#      batching's) beside it: kernels, GPU busy time and idle fraction per step;
#   5. (levers) bench/unet_levers.py: what each lever (TF32, bf16, channels_last, cudnn.benchmark,
#      compile, Inductor freezing, bf16 weights, NCHW) gives the CIFAR-10 UNet's network call at
#      batch 256 (--batch 256 512 adds the larger batch);
#   6. (hostops) bench/engine_host_ops.py --device cuda: the engine's torch ops and host time per
#      step outside the network at 16 and 256 requests, against the engine of commit 0b0856e
#      (needs git and the repository's history; without it, this engine alone);
#   7. (invariance) bench/invariance.py --device cuda: what batch-invariant slicing
#      (UNDIFFUSE_INVARIANT_ROWS) costs the network and the engine against whole batches, and
#      whether a request's bytes hold beside others (docs/benchmarks.md, "Batch invariance");
#   8. (models) bench/engine.py --gpu --skip-cpu --models-only: rows (8) and (9) at real size, a
#      256x256 pixel UNet and DiT-XL/2 with its VAE decoder against diffusers' pipelines
#      (docs/benchmarks.md, "Models people bring"; 32 images at DDIM 25 per run, fp32 and bf16
#      eager, nothing compiled);
#   9. (quality) bench/quality.py --n 1000, the full quality table (docs/quality.md), cheapest
#      rows first, stopped at the deadline.
# Each step has its own timeout, cut to what is left before the deadline; a failing step is
# logged with its exit status and the next one still runs.
#
# Prerequisites: a CUDA GPU; Python 3.10+ with PyTorch 2.x built with CUDA, numpy, safetensors,
# pillow, tqdm, pytest, stamina (tests/core/test_client_core.py imports it; without it that module
# fails to collect and the GPU tests still run) and diffusers >= 0.30 (bench/engine.py's CIFAR-10 UNet and model rows run
# diffusers' DDIMPipeline and DiTPipeline as their references); a git checkout of this repository
# (step 2 reads the reference engine from its history; without it, step 2 measures this engine
# alone); the MNIST test set
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
# invariance.log, bench.log, step_profile.log, mixed_profile.log, levers.log, bench_models.log, quality-full.md/.log,
# grids/), packed after each
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
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD UNDIFFUSE_MNIST=${UNDIFFUSE_MNIST:-$(dirname "$PWD")/shared/datasets/mnist}
R=/tmp/res && mkdir -p $R/grids
STEPS=" ${STEPS:-pytest profile engine mixedprofile levers hostops invariance} "
REF=""; git rev-parse -q --verify 0b0856e^{commit} > /dev/null 2>&1 || REF="--reference none"
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu; X=4; DEADLINE=${DEADLINE:-1800}  # timeouts scaled for a CPU
  HOST_OPS="--sizes 4,16"; INV="--rows 0 16 --batches 1 16 --requests 2 --repeats 1"
  ENGINE="--gpu --smoke --skip-cpu --skip-models"; MODELS="--models-only"; QUALITY="--n 20 --rows quick"
  PROFILE="--device cpu --rows 16 32 --steps 3"; MIXED="--device cpu --steps 3"; LEVERS="--smoke --device cpu --max-seconds 400"
else
  DEV=cuda; X=1; DEADLINE=${DEADLINE:-450}
  HOST_OPS=""; INV="--rows 0 64 256 --batches 1 64 512 4096 --requests 64"
  ENGINE="--gpu --skip-cpu --skip-models --gpu-rows 3b 3 2c 2 4 5"; MODELS="--gpu --skip-cpu --models-only"; QUALITY="--n 1000"
  PROFILE="--rows 64 4096 --modes default reduce-overhead graphs"; MIXED="--modes eager-fp32 default reduce-overhead"; LEVERS="--batch 256 --max-seconds 130"
fi
pack() { tar czf "${OUT:-/tmp}/results.tgz" -C /tmp res; }
# run NAME SECONDS LOG COMMAND...: the step if STEPS names it, within SECONDS and the deadline;
# returns 1 only when the step was not run (a failed step's status is logged)
run() {
  local name=$1 limit=$(($2 * X)) log=$R/$3; shift 3
  case "$STEPS" in *" $name "*) ;; *) return 1 ;; esac
  local left=$((T0 + DEADLINE - $(date +%s)))
  if [ $left -lt 20 ]; then el "$name: not run, the deadline ($DEADLINE s) is reached"; return 1; fi
  timeout $((limit < left ? limit : left)) "$@" > "$log" 2>&1
  el "$name rc $?"
}
{ nvidia-smi; python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; } > $R/env.txt 2>&1
run pytest 240 pytest_gpu.log python3 -m pytest -m gpu tests/core -q -p no:cacheprovider --continue-on-collection-errors && tail -5 $R/pytest_gpu.log; pack
run profile 150 step_profile.log python3 bench/step_profile.py $PROFILE && grep "^|" $R/step_profile.log; pack
run engine 300 bench.log python3 bench/engine.py $ENGINE && grep "^|" $R/bench.log; pack
run mixedprofile 120 mixed_profile.log python3 bench/step_profile.py --rows 16 --sampler ddpm --reference $MIXED \
  && grep "^|" $R/mixed_profile.log; pack
run levers 170 levers.log python3 bench/unet_levers.py $LEVERS && grep "^|" $R/levers.log; pack
run hostops 90 host_ops.log python3 bench/engine_host_ops.py --device $DEV $HOST_OPS $REF && grep "^|" $R/host_ops.log; pack
run invariance 150 invariance.log python3 bench/invariance.py --device $DEV $INV && grep "^|" $R/invariance.log; pack
# the models people bring at real size (random weights: 114 M UNet, DiT-XL/2 + Stable Diffusion's VAE)
run models 180 bench_models.log python3 bench/engine.py $MODELS && grep "^| (" $R/bench_models.log; pack
left=$((T0 + DEADLINE - $(date +%s))); left=$((left < 600 * X ? left : 600 * X))
run quality 600 quality-full.log python3 bench/quality.py $QUALITY --device $DEV \
  --max-minutes "$(python3 -c "print(max(0.2, ($left - 30) / 60))")" --grids $R/grids --out $R/quality-full.md \
  && cat $R/quality-full.md; pack
