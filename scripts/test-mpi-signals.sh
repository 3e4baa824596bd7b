#!/usr/bin/env bash
# SIGTERM to mpirun stops a 2-rank training cleanly (ctest label mpi): mpirun passes the
# signal to every rank, the ranks agree on the step, save one checkpoint together and exit;
# `--resume` then goes 10 steps further with the same per-step losses as an uninterrupted
# 2-rank run (constant learning rate: the losses do not depend on train.steps). OpenMPI kills the ranks odls_base_sigkill_timeout seconds (default 1) after
# passing the signal on; the test gives them 5.
#   scripts/test-mpi-signals.sh path/to/moe [workdir]
set -uo pipefail
moe=$(realpath "$1")
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${2:-$(mktemp -d)}
rm -rf "$work"; mkdir -p "$work"; cd "$work"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 OMPI_MCA_odls_base_sigkill_timeout=5
fails=0
fail() { echo "FAIL $*"; fails=$((fails + 1)); }

for i in $(seq 1 300); do echo "the quick brown fox $((i % 13)) jumps over the lazy dog."; done > text.txt
"$moe" data prepare --out data text.txt > /dev/null || { echo "FAIL data prepare"; exit 1; }
args=(train "$root/configs/tiny-cpu.yaml" --quiet --set data.train_path=data/train.bin --set data.val_path=data/val.bin
  --set model.d_model=32 --set model.n_layers=2 --set model.n_heads=2 --set model.seq_len=16 --set model.ffn_dim=24
  --set model.n_experts=4 --set data.batch_size=4 --set train.eval_every=0 --set train.eval_batches=2
  --set train.log_every=1 --set checkpoint.every=0 --set parallel.expert_parallel=2 --set train.schedule=constant
  --set train.warmup=0)
mpi=(mpirun --oversubscribe -np 2 "$moe")
losses() { sed -nE 's/.*"step":([0-9]+),"loss":([-0-9.e+naif]+).*/\1 \2/p' "$1/metrics.jsonl"; }

"${mpi[@]}" "${args[@]}" --set train.steps=1000000 --set checkpoint.dir=run > run.log 2>&1 &
pid=$!
for _ in $(seq 1 600); do [ "$(cat run/metrics.jsonl 2> /dev/null | wc -l)" -ge 3 ] && break; sleep 0.1; done
kill -TERM $pid
t=0
while kill -0 $pid 2> /dev/null && [ $t -lt 600 ]; do sleep 0.1; t=$((t + 1)); done
if kill -0 $pid 2> /dev/null; then kill -KILL $pid; fail "mpirun still running 60 s after SIGTERM"; fi
wait $pid
ckpt=$(ls run/ckpt-*.h5 2> /dev/null | tail -1)
step=$(echo "$ckpt" | sed -nE 's/.*ckpt-0*([0-9]+)\.h5/\1/p')
if [ -n "$step" ] && grep -q "training stopped by SIGTERM at step $step;" run.log; then
  echo "ok   SIGTERM to mpirun: the ranks saved $ckpt together and stopped"
else fail "SIGTERM to mpirun: no 'stopped by SIGTERM' line with checkpoint '$ckpt'"; tail -5 run.log; fi
for r in 0 1; do
  last=$(tail -1 run/rank-$r.log | awk '{print $2}')
  [ "$last" = "$step" ] && echo "ok   rank $r stopped at step $step" || fail "rank $r's last step is '$last', the checkpoint's $step"
done
"$moe" inspect "$ckpt" --verify > /dev/null 2>&1 && echo "ok   the checkpoint verifies" || fail "$ckpt does not verify"

steps=$((${step:-0} + 10))
timeout 300 "${mpi[@]}" "${args[@]}" --set train.steps=$steps --resume run > resume.log 2>&1 ||
  { fail "--resume after SIGTERM"; tail -5 resume.log; }
timeout 300 "${mpi[@]}" "${args[@]}" --set train.steps=$steps --set checkpoint.dir=ref > ref.log 2>&1 ||
  { fail "the uninterrupted run"; tail -5 ref.log; }
if [ "$(losses run | wc -l)" = $steps ] && cmp -s <(losses run) <(losses ref); then
  echo "ok   resumed to step $steps with the uninterrupted run's losses"
else fail "losses after resume differ from the uninterrupted run"; diff <(losses run) <(losses ref) | head -4; fi

[ $fails = 0 ] && echo "mpi signals: all checks passed" || { echo "mpi signals: $fails check(s) failed"; exit 1; }
