#!/usr/bin/env bash
# Signals never lose a run (ctest label cpu). 20 short trainings each get SIGINT, SIGTERM,
# or two SIGINTs in a row at a random moment (train.threads 1 and 2 alternating). Every
# run must exit with 128 + signal (or 0 when it finished first: counted, and most runs
# must be interrupted), within a bounded wait (no crash, no hang), leave a checkpoint,
# and `--resume` must then reach the end with the same per-step losses as an
# uninterrupted run with the same thread count. Also SIGHUP (stops like SIGINT), SIGUSR1
# (a checkpoint, then training goes on to a clean exit 0) and three signals (the third
# quits at once with 128 + signal).
#   scripts/test-signals.sh path/to/moe [workdir] [runs per case, default 20]
set -uo pipefail
# Two runs share the two cores (beside other tests): OpenMP threads that spin while they
# wait would slow every run tenfold, past the bounded waits below.
export OMP_WAIT_POLICY=passive
moe=$(realpath "$1")
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${2:-$(mktemp -d)}
runs=${3:-20}
rm -rf "$work"; mkdir -p "$work"; cd "$work"
fails=0
fail() { echo "FAIL $*"; fails=$((fails + 1)); }

for i in $(seq 1 400); do echo "It was the best of times, it was the worst of times, number $((i % 7))."; done > text.txt
"$moe" data prepare --out data text.txt > /dev/null || { echo "FAIL data prepare"; exit 1; }
steps=1000
small=(--quiet --set data.train_path=data/train.bin --set data.val_path=data/val.bin --set model.d_model=32
  --set model.n_layers=2 --set model.n_heads=2 --set model.seq_len=16 --set model.ffn_dim=24 --set model.n_experts=4
  --set data.batch_size=4 --set train.eval_every=0 --set train.eval_batches=2 --set train.log_every=1
  --set checkpoint.every=0 --set checkpoint.keep=2 --set train.steps=$steps)
cfg="$root/configs/tiny-cpu.yaml"

# step -> loss lines of a run directory's metrics.jsonl
losses() { sed -nE 's/.*"step":([0-9]+),"loss":([-0-9.e+naif]+).*/\1 \2/p' "$1/metrics.jsonl"; }

# Waits at most $2 seconds for the child $1; sets rc to its exit status ("hang" after
# killing it).
bounded_wait() {
  local pid=$1 limit=$2 t=0
  while kill -0 "$pid" 2> /dev/null && [ "$t" -lt $((limit * 10)) ]; do sleep 0.1; t=$((t + 1)); done
  if kill -0 "$pid" 2> /dev/null; then kill -KILL "$pid"; wait "$pid" 2> /dev/null; rc=hang; return; fi
  wait "$pid"; rc=$?
}

for th in 1 2; do
  "$moe" train "$cfg" "${small[@]}" --set train.threads=$th --set checkpoint.dir=ref$th > ref$th.log 2>&1 \
    || { echo "FAIL reference run (threads $th)"; tail -3 ref$th.log; exit 1; }
  losses ref$th > ref$th.txt
  [ "$(wc -l < ref$th.txt)" = $steps ] || { echo "FAIL reference run logged $(wc -l < ref$th.txt) steps"; exit 1; }
done

# Waits (at most 30 s) until `moe train` pid $1 takes signals: its watcher blocks SIGTERM
# (bit 15) first thing; before that a signal ends the process by its default action
# (nothing to save yet), which would tell nothing. The process must be moe already: the
# shell's child may block SIGTERM itself between fork and exec.
wait_watching() {
  local mask
  for _ in $(seq 1 300); do
    mask=$(awk '/^SigBlk:/ { print $2 }' /proc/$1/status 2> /dev/null)
    [ "$(readlink /proc/$1/exe 2> /dev/null)" = "$moe" ] && [ -n "$mask" ] && (( 0x$mask & 0x4000 )) && return
    sleep 0.1
  done
}

# One run: case name, the signals to send (one word each), run index. Its outcome
# (interrupted, finished or bad) goes to <dir>.outcome, a failure's lines to <dir>.fail.
one_run() {
  local outcome fails=0
  one_run_checks "$@" > "$1-$3.fail"
  echo "$outcome" > "$1-$3.outcome"
}

one_run_checks() {
  local name=$1 sigs=$2 k=$3 th=$((1 + $3 % 2)) dir=$1-$3 delay want
  delay=$(awk -v s="$RANDOM" 'BEGIN { srand(s); printf "%.2f", rand() * 0.35 }')
  "$moe" train "$cfg" "${small[@]}" --set train.threads=$th --set checkpoint.dir=$dir > $dir.log 2>&1 &
  local pid=$!
  wait_watching $pid
  sleep "$delay"
  for s in $sigs; do kill -"$s" $pid 2> /dev/null; sleep 0.05; done
  bounded_wait $pid 60
  want=$((128 + $(kill -l "${sigs%% *}")))
  outcome=interrupted
  if [ "$rc" = 0 ]; then outcome=finished; return; fi
  if [ "$rc" != "$want" ]; then fail "$dir: exit $rc after SIG${sigs// /+SIG} at ${delay}s (want $want)"; tail -3 $dir.log; outcome=bad; return; fi
  if ! ls $dir/ckpt-*.h5 > /dev/null 2>&1; then fail "$dir: no checkpoint left"; outcome=bad; return; fi
  "$moe" train "$cfg" "${small[@]}" --set train.threads=$th --resume $dir > $dir-resume.log 2>&1 &
  bounded_wait $! 60
  if [ "$rc" != 0 ]; then fail "$dir: --resume exited $rc"; tail -3 $dir-resume.log; outcome=bad; return; fi
  if ! cmp -s <(losses $dir) ref$th.txt; then
    fail "$dir: losses after resume differ from the uninterrupted run (threads $th)"
    diff <(losses $dir) ref$th.txt | head -4; outcome=bad
  fi
}

# Two runs at a time (one per core), then the counts of a case from the outcome files.
for case in "int:INT" "term:TERM" "int2:INT INT"; do
  name=${case%%:*} sigs=${case#*:}
  for k in $(seq 1 2 "$runs"); do
    one_run "$name" "$sigs" "$k" &
    [ "$k" -lt "$runs" ] && one_run "$name" "$sigs" $((k + 1)) &
    wait
  done
  cat "$name"-*.fail
  interrupted=$(cat "$name"-*.outcome | grep -c '^interrupted$')
  finished=$(cat "$name"-*.outcome | grep -c '^finished$')
  bad=$((runs - interrupted - finished))
  if [ $bad = 0 ] && [ $((2 * interrupted)) -gt "$runs" ]; then
    echo "ok   SIG${sigs// /+SIG}: $interrupted runs interrupted and resumed to the same losses, $finished finished first"
  else
    fail "SIG${sigs// /+SIG}: $interrupted interrupted, $finished finished first, $bad failed (most must be interrupted)"
  fi
done

# SIGHUP stops like SIGINT (a run that finished before the signal came is tried again).
for k in 1 2 3; do
  one_run hup HUP $k
  [ "$(cat hup-$k.outcome)" = finished ] || break
done
cat hup-$k.fail
if [ "$(cat hup-$k.outcome)" = interrupted ]; then echo "ok   SIGHUP: exit 129, checkpoint, resumed to the same losses"
else fail "SIGHUP: $(cat hup-$k.outcome) (try $k; hup-$k.log)"; fi

# Three signals: the third quits at once (128 + signal), without waiting for the save.
"$moe" train "$cfg" "${small[@]}" --set train.steps=100000 --set checkpoint.dir=three > three.log 2>&1 &
pid=$!
for _ in $(seq 1 300); do [ -s three/metrics.jsonl ] && break; sleep 0.1; done
kill -TERM $pid; sleep 0.1; kill -TERM $pid 2> /dev/null; sleep 0.1; kill -TERM $pid 2> /dev/null
bounded_wait $pid 30
[ "$rc" = 143 ] && echo "ok   three SIGTERMs: exit 143" || fail "three SIGTERMs: exit $rc (want 143)"

# SIGUSR1: a checkpoint now, and training goes on to the end.
"$moe" train "$cfg" "${small[@]}" --set train.steps=100000 --set checkpoint.dir=usr1 > usr1.log 2>&1 &
pid=$!
for _ in $(seq 1 300); do [ -s usr1/metrics.jsonl ] && break; sleep 0.1; done
kill -USR1 $pid
for _ in $(seq 1 300); do ls usr1/ckpt-*.h5 > /dev/null 2>&1 && break; sleep 0.1; done
alive=no; kill -0 $pid 2> /dev/null && alive=yes
kill -INT $pid
bounded_wait $pid 30
n=$(ls usr1/ckpt-*.h5 2> /dev/null | wc -l)
if [ "$alive" = yes ] && [ "$rc" = 130 ] && [ "$n" = 2 ]; then echo "ok   SIGUSR1: a checkpoint, training went on (then SIGINT: exit 130)"
else fail "SIGUSR1: still running after the checkpoint: $alive, exit $rc, $n checkpoints (want yes, 130, 2)"; fi

[ $fails = 0 ] && echo "signals: all checks passed" || { echo "signals: $fails check(s) failed"; exit 1; }
