#!/usr/bin/env bash
# The GPU sweep of one task's gpu preset (README, "Running on a GPU"): N = 1, 2, 4 x seeds 0, 1, 2,
# all nine runs side by side on one GPU (--parallel=9), after N = 1 and N = 4 alone on the GPU for 60
# steps (their ms/step against the side-by-side runs' gives the speed-up of running side by side).
# Writes to OUT (default gpu_sweep_TASK/): solo_N1.log, solo_N4.log, sweep.log, results.md/.json/.png
# and run_logs.tgz (every run's train.log); the checkpoints stay in a temporary folder.
#   bash scripts/gpu_sweep.sh rule110 [OUT]          # or depo
#   FLAGS=""                                         # eager instead of --compile --compile_mode=reduce-overhead
#   ITERS=1000                                       # fewer steps than the preset's 3000 (to fit a time limit)
# The timeouts (SOLO_SECONDS 90 twice, SWEEP_SECONDS 400) add up to 580 s: a sweep cut off there writes
# no results table, but run_logs.tgz still holds every run's evaluation lines so far.
#   EXTRA="--device=cpu --batch_size=8 --max_iters=4 --eval_interval=2 --eval_examples=8" FLAGS="" \
#       bash scripts/gpu_sweep.sh rule110 /tmp/dry   # a dry run of the script on a CPU
set -u
cd "$(dirname "$0")/.."
task=$1
out=${2:-gpu_sweep_$task}
mkdir -p "$out"
work=$(mktemp -d)
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-2}   # nine processes compile at once
flags="--task=$task --preset=gpu --num_workers=1 ${FLAGS---compile --compile_mode=reduce-overhead} ${EXTRA:-}"
iters=${ITERS:+--max_iters=$ITERS}
python3 -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
date -u
for n in 1 4; do   # alone on the GPU; the last log line averages steps 41-60, after the compile
  timeout "${SOLO_SECONDS:-90}" python3 train.py $flags --sleep_passes=$n --max_iters=60 --log_interval=20 \
      --eval_interval=60 --eval_examples=64 --out_dir="$work/solo_N$n" > "$out/solo_N$n.log" 2>&1
  echo "solo N=$n (exit $?): $(grep '^step' "$out/solo_N$n.log" | tail -n 1)"
done
start=$(date +%s)
timeout "${SWEEP_SECONDS:-400}" python3 train.py $flags $iters --sweep=1,2,4 --seeds=0,1,2 --parallel=9 \
    --out_dir="$work/sweep" > "$out/sweep.log" 2>&1
echo "sweep exit $? after $(( $(date +%s) - start )) s"
cp "$work"/sweep/results.* "$out"/ 2>/dev/null
(cd "$work/sweep" && tar czf - N*/train.log) > "$out/run_logs.tgz"
for log in "$work"/sweep/N*/train.log; do   # each run's last step line: its ms/step side by side
  echo "$(basename "$(dirname "$log")"): $(grep '^step' "$log" | tail -n 1)"
done
grep -A 12 "^| N" "$out/sweep.log" | head -n 14
echo "checkpoints in $work"
