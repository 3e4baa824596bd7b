#!/usr/bin/env bash
# bench.sh's report from known timings (ctest label cpu): both sides are stand-ins that
# print fixed JSON lines round by round (ours: a moe program; the reference: a python that
# answers for scripts/bench_reference.py), so every figure of the report is known:
#   ours fwd+bwd 100, 110, 90 ms by round (median 100);
#   reference 200 (reps 190, 210), 300 (150, 450), 240 (230, 250) (median 240);
# so speedup 2.400, per-round ratios 2.00-2.73, vs the reference's fastest rep 150 / 100 =
# 1.500, ceiling = (flops / our time) / the sgemm rate. The forward phase and a case whose
# reference fails (lm-step-cpu: NA beside our 300 ms, exit status 1) are checked too.
#   scripts/test-bench.sh [workdir]
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${1:-$(mktemp -d)}
rm -rf "$work"; mkdir -p "$work"; cd "$work" || exit 1
fails=0
ok() { echo "ok   $1"; }
fail() { echo "FAIL $1"; fails=$((fails + 1)); }

# The stand-in of `moe bench CASE --json ...`: round r is the r-th call for that case.
cat > moe <<'EOF'
#!/usr/bin/env bash
case=$2 dir=$(dirname "$0")
n=$(( $(cat "$dir/ours-$case.n" 2>/dev/null || echo 0) + 1 )); echo $n > "$dir/ours-$case.n"
if [ "$case" = sgemm ]; then
  echo '{"case":"sgemm","phase":"gemm","ms":1.0,"gflops_per_s":200.0,"n":2048,"device":"cpu","threads":2}'
  exit 0
fi
if [ "$case" = lm-step-cpu ]; then
  echo '{"case":"lm-step-cpu","phase":"step","ms":300,"flops":30000000000,"peak_bytes":1048576}'
  exit 0
fi
fb=(0 100 110 90) fw=(0 40 44 36)
echo "{\"case\":\"$case\",\"phase\":\"fwd\",\"ms\":${fw[$n]},\"flops\":4000000000,\"peak_bytes\":1048576}"
echo "{\"case\":\"$case\",\"phase\":\"fwd_bwd\",\"ms\":${fb[$n]},\"flops\":10000000000,\"peak_bytes\":2097152}"
EOF
# The stand-in of the reference's python: answers `-c 'import torch...'` and
# `scripts/bench_reference.py CASE ...` (lm-step-cpu fails), and runs anything else with python3.
cat > python <<'EOF'
#!/usr/bin/env bash
[ "$1" = -c ] && { echo 9.9.9; exit 0; }
[ "$1" = scripts/bench_reference.py ] || exec python3 "$@" # bench.sh's report runs on this python too
case=$2 dir=$(dirname "$0")
[ "$case" = lm-step-cpu ] && { echo "stand-in: no such case" >&2; exit 1; }
n=$(( $(cat "$dir/ref-$case.n" 2>/dev/null || echo 0) + 1 )); echo $n > "$dir/ref-$case.n"
fb=(0 200 300 240) fba=("" "190,210" "150,450" "230,250") fw=(0 80 80 80)
echo "{\"case\":\"$case\",\"phase\":\"fwd\",\"ms\":${fw[$n]},\"ms_all\":[${fw[$n]}],\"peak_bytes\":3145728}"
echo "{\"case\":\"$case\",\"phase\":\"fwd_bwd\",\"ms\":${fb[$n]},\"ms_all\":[${fba[$n]}],\"peak_bytes\":4194304}"
EOF
chmod +x moe python

MOE_BIN=$PWD/moe PYTHON=$PWD/python BENCH_OUT=$PWD/out "$root/scripts/bench.sh" cpu --rounds 3 --reps 2 \
  --cases "moe-layer-cpu lm-step-cpu" > report.txt 2> bench.err
rc=$?
[ $rc = 1 ] && grep -q "the reference failed on lm-step-cpu" bench.err \
  && ok "a failed reference case is reported, exit status 1" || fail "a failed reference case is reported (exit $rc)"
want() { # description, the exact BENCH line
  grep -qxF -- "$2" report.txt && ok "$1" || { fail "$1"; echo "  want: $2"; grep '^BENCH' report.txt | sed 's/^/  got:  /'; }
}
want "fwd+bwd: medians, speedup, per-round spread, fastest rep, ceiling" \
  "BENCH moe-layer-cpu ours=100.000 ref=240.000 speedup=2.400 ceiling=0.500 rounds=2.00-2.73 vs_fastest=1.500"
want "forward phase" \
  "BENCH moe-layer-cpu-fwd ours=40.000 ref=80.000 speedup=2.000 ceiling=0.500 rounds=1.82-2.22 vs_fastest=2.000"
want "a case whose reference failed: NA beside our time" \
  "BENCH lm-step-cpu ours=300.000 ref=NA speedup=NA ceiling=0.500 rounds=NA vs_fastest=NA"
grep -q '^| moe-layer-cpu | 100.000 | 240.000 | 2.40 | 2.00-2.73 | 1.50 | 100.00, 110.00, 90.00 | 200.00, 300.00, 240.00 |' \
  report.txt && ok "the markdown row" || { fail "the markdown row"; grep '^| moe-layer-cpu |' report.txt; }

[ $fails = 0 ] && echo "bench report: all checks passed" || { echo "bench report: $fails check(s) failed"; exit 1; }
