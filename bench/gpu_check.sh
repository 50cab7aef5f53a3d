#!/usr/bin/env bash
# The GPU half of the performance checks in one short run, for a session lent a CUDA machine (about 10 minutes on
# an H100): the CUDA tests, the bench at batch 128 in fp16 and bf16 with and without torch.compile, and short
# fp16 / bf16 training runs of the default preset. Each step's output lands in OUT_DIR (default $OUT, else
# gpu-check/), one file per step, plus the training runs' final sample grids.
#
#   bash bench/gpu_check.sh [OUT_DIR]
#
# The device image has torch, accelerate, einops, safetensors, torchmetrics, tensorboard but not diffusers or
# omegaconf: carry them as wheels (the device README says how) and put them on PYTHONPATH before calling this.
set -uo pipefail
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DIFFUSERS_VERBOSITY=error
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=0

step() {                                        # step NAME SECONDS COMMAND...: run, keep its output, go on
    local name=$1 seconds=$2
    shift 2
    echo "== $name: $*"
    timeout "$seconds" "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.txt"
    [ $rc -eq 0 ] || { echo "== $name exited with $rc"; failed=1; }
}

step env 60 python3 -c "import torch, diffusers; print(torch.__version__, diffusers.__version__, torch.cuda.get_device_name(0))" || exit 1
step tests 120 python3 -m pytest -q -p no:warnings tests/test_speed.py tests/test_training.py -k "cuda or fp16 or bf16 or compile"
step bench-cifar-fp16 240 python3 bench/bench_unet.py --preset ddpm-cifar10 --device cuda --dtype fp16 --batch 128 --compile
step bench-cifar-bf16 150 python3 bench/bench_unet.py --preset ddpm-cifar10 --device cuda --dtype bf16 --batch 128 --no-compile \
    --also bf16,channels_last --ddim-steps 0
for precision in fp16 bf16; do
    step "train-$precision" 90 python3 train.py output_dir="/tmp/gpu-check-$precision" train.mixed_precision=$precision \
        train.max_steps=500
    cp "/tmp/gpu-check-$precision/samples/final.png" "$out/train-$precision-final.png" 2>/dev/null
done
exit $failed
