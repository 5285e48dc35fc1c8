#!/usr/bin/env bash
# GPU check, at most about 9.5 minutes on one GPU (the timeouts add up to 575 s): the test file on
# CUDA, 10 steps of each paper preset at its paper batch size (ms/step and peak GiB in the log
# lines), a resume, torchrun on one GPU, and last the compiled-training tests (inductor kernels and
# CUDA graphs against eager, a step of their own). Writes its logs to OUT (default gpu_check/,
# which it clears first) and prints the lines that matter.
#   bash scripts/gpu_check.sh [OUT]
# EXTRA="--device=cpu --batch_size=4" bash scripts/gpu_check.sh   # a dry run of the script on a CPU
set -u
cd "$(dirname "$0")/.."
out=${1:-gpu_check}
rm -rf "$out"
mkdir -p "$out"
runs=$(mktemp -d)   # the checkpoints: OUT holds only the logs
export PYTHONUNBUFFERED=1
extra=${EXTRA:-}
run() {  # run NAME SECONDS COMMAND...: log to OUT/NAME.log, print its last lines
  local name=$1 seconds=$2; shift 2
  echo "=== $name: $*"
  timeout "$seconds" "$@" > "$out/$name.log" 2>&1
  echo "exit $? ($name)"
  grep -E "^step|^eval|passed|failed|error" "$out/$name.log" | tail -n 4
}
python3 -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(),
      '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$out/device.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$out/device.txt" 2>/dev/null
date -u >> "$out/device.txt"
run tests 150 python3 -m pytest -q test_sleep_lm.py -k "not inductor"
steps="--max_iters=10 --log_interval=5 --eval_interval=10 --eval_examples=64 --warmup_iters=5"
for task in rule110 depo math; do
  for n in 1 4; do
    run "${task}_N$n" $([ $task = math ] && echo 50 || echo 35) python3 train.py --task=$task --preset=paper \
        --sleep_passes=$n $steps --out_dir="$runs/${task}_N$n" $extra
  done
done
run resume 30 python3 train.py --task=rule110 --preset=paper --sleep_passes=1 $steps $extra --resume \
    --max_iters=20 --out_dir="$runs/rule110_N1"
run torchrun 35 torchrun --standalone --nproc_per_node=1 train.py --task=depo --preset=paper --sleep_passes=4 \
    $steps --out_dir="$runs/depo_N4_torchrun" $extra
# Last, so that a cold inductor compile that runs long costs no other step: train.py --compile on the GPU vs eager
run compiled 120 python3 -m pytest -q test_sleep_lm.py -k inductor
echo "logs in $out/, checkpoints in $runs/"
