# Sourced by the end-to-end test scripts (scripts/test-*.sh), with the script's own arguments:
#   source "$(dirname "${BASH_SOURCE[0]}")/lib-test.sh" "$@"
# Sets moe (the program, $1), root (the source tree) and work ($2, else a fresh temporary
# folder; emptied, then the current folder), exports OMP_NUM_THREADS=1, and defines the
# checks that count failures in `fails`: ok, fail, check and expect. Each command a check
# runs writes its output to out.txt, whose last lines a failure prints.
moe=$(realpath "$1")
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${2:-$(mktemp -d)}
rm -rf "$work"; mkdir -p "$work"; cd "$work"
export OMP_NUM_THREADS=1
fails=0
ok() { echo "ok   $1"; }
fail() { echo "FAIL $1"; [ -f out.txt ] && tail -5 out.txt; fails=$((fails + 1)); }
check() { # description, command...: the command must succeed
  local what=$1; shift
  if "$@" > out.txt 2>&1; then ok "$what"; else fail "$what"; fi
}
expect() { # description, exit code, text in the output, command...
  local what=$1 code=$2 text=$3; shift 3
  "$@" > out.txt 2>&1
  local rc=$?
  if [ "$rc" = "$code" ] && grep -qF -- "$text" out.txt; then ok "$what"
  else fail "$what (exit $rc, want $code and '$text')"; fi
}
