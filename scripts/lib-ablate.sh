# Sourced by scripts/ablate.sh and scripts/ablate-mqar.sh from the source tree's root, after
# they set `prog` (the name their messages start with): option checks, the program to run,
# and the pool of trainings going at once in the background. A script starts a training
# with `"$moe" ... >"$run_root/NAME/train.log" 2>&1 &` then `pool_add NAME`, sets run_root
# (the folder of the run folders) and defines run_summary NAME (what the line of a finished
# run says after "done NAME in <s>s: "). `trap stop INT TERM` makes Ctrl-C end the runs.

die() { echo "$prog: $*" >&2; exit 2; }
posint() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

find_moe() { # mode: sets moe to MOE_BIN, else build-gpu/moe (gpu, when built) or build/moe (built if missing)
  if [ -n "${MOE_BIN:-}" ]; then
    moe=$MOE_BIN
    [ -x "$moe" ] || die "MOE_BIN=$moe is not an executable"
  elif [ "$1" = gpu ] && [ -x build-gpu/moe ]; then
    moe=build-gpu/moe
  else
    moe=build/moe
    if [ ! -x "$moe" ]; then
      echo "$prog: $moe not found; building (scripts/build.sh)" >&2
      scripts/build.sh || { echo "$prog: build failed" >&2; exit 1; }
    fi
  fi
}

# --continue (continue_runs=1): a long grid goes on over several calls. prepare_run DIR
# ARGS... sets run_start to how the run in DIR starts: "fresh" (DIR emptied, ARGS kept in
# DIR/args.txt); with --continue, "done" when its log says it trained (kept as it is) or
# "resume" when it has a checkpoint (moe train --resume DIR; the log goes on). A run made
# with other ARGS, or before args.txt existed, stops the script: nothing is thrown away.
continue_runs=0 run_start=""
prepare_run() {
  local dir=$1
  shift
  if [ "$continue_runs" = 1 ] && [ -n "$(ls -A "$dir" 2>/dev/null)" ]; then
    [ -f "$dir/args.txt" ] && [ "$(cat "$dir/args.txt")" = "$*" ] ||
      die "--continue: $dir holds a run made with other settings (see $dir/args.txt); move it away, or run without --continue to start afresh"
    if grep -q '^trained' "$dir/train.log" 2>/dev/null; then run_start=done; return; fi
    if compgen -G "$dir/ckpt-*.h5" >/dev/null; then run_start=resume; return; fi
  fi
  rm -rf "$dir" && mkdir -p "$dir" && echo "$*" >"$dir/args.txt" || die "cannot make $dir"
  run_start=fresh
}

# Starts `moe ARGS...` for the run NAME in DIR as prepare_run decided (env ENV... first,
# e.g. CUDA_VISIBLE_DEVICES=1), announcing it as run n of total; a kept run starts nothing.
start_run() {
  local name=$1 dir=$2 env=$3
  shift 3
  n=$((n + 1))
  case "$run_start" in
    done) echo "== [$n/$total] $name: trained before, kept (--continue)" >&2; return ;;
    resume) set -- "$@" --resume "$dir"; echo "== [$n/$total] $name: resuming from its checkpoint" >&2 ;;
  esac
  echo "== [$n/$total] $name: $moe $*" >&2
  env $env "$moe" "$@" >>"$dir/train.log" 2>&1 &
  pool_add "$name"
}

declare -A running=() started=() # pid -> run name / start time
failed=() interrupted=0
pool_add() { running[$!]=$1 started[$!]=$SECONDS; } # name: the training just started in the background
finish() { # pid: report a finished run
  local pid=$1 name=${running[$1]} rc
  wait "$pid"; rc=$?
  unset "running[$pid]"
  if [ "$interrupted" = 1 ]; then
    failed+=("$name")
    echo "!! $name stopped (exit $rc)" >&2
  elif [ "$rc" -eq 0 ]; then
    echo "   done $name in $(( SECONDS - ${started[$pid]} ))s: $(run_summary "$name")" >&2
  else
    failed+=("$name")
    echo "!! $name FAILED (exit $rc); the end of $run_root/$name/train.log:" >&2
    tail -n 3 "$run_root/$name/train.log" | sed 's/^/     /' >&2
  fi
}
reap() { # wait until fewer than $1 runs are going
  local pid
  while [ ${#running[@]} -ge "$1" ] && [ ${#running[@]} -gt 0 ]; do
    wait -n 2>/dev/null
    for pid in "${!running[@]}"; do
      kill -0 "$pid" 2>/dev/null || finish "$pid"
    done
  done
}
stop() { # Ctrl-C / TERM (e.g. from timeout): end the runs by pid (background runs ignore
  # SIGINT), start no more; the script then writes the results of the finished runs
  local pids=("${!running[@]}")
  interrupted=1
  echo "$prog: interrupted; stopping ${#pids[@]} run(s), then writing the results so far" >&2
  [ ${#pids[@]} -eq 0 ] || kill "${pids[@]}" 2>/dev/null
}
