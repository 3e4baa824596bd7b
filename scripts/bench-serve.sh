#!/usr/bin/env bash
# The serving figure: `moe serve` on a free loopback port, then scripts/load-serve.js at each
# client count (N concurrent streaming chat clients, --requests each, after one untimed
# request that warms the server up), then SIGTERM. Prints a markdown table per client count:
# output tokens/s, p50/p99 time to first token, p50/p99 inter-token latency, failures
# (failed + truncated streams); exit status 1 when any request failed or the server did not
# start or stop cleanly.
#
# Usage: scripts/bench-serve.sh --model DIR | --checkpoint FILE [--device cuda|cpu] [--dtype bf16|f32]
#          [--clients "1 8 32 64"] [--requests N] [--max-tokens T] [-- SERVER FLAGS...]
#   --device / --dtype go to `moe serve` when given; flags after -- go to it as they are
#   (e.g. -- --offload --gpu-memory 20GiB). Unless those set them, the server gets
#   --max-batch = the largest client count and --max-queue = 4 x that, so that no client
#   waits for a slot or gets 429 at the largest count.
# Environment: MOE_BIN (default build/moe; with --device cuda build-gpu/moe when it exists),
#   NODE (default node, 18 or newer), BENCH_OUT (default bench-results/<date>-serve/): the
#   server's logs, load-<clients>.json / .log per count, report.md.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
src=() dev=() clients="1 8 32 64" requests=4 max_tokens=64 server_flags=()
while [ $# -gt 0 ]; do
    case "$1" in
    --model | --checkpoint) src=("$1" "$(realpath "${2:?$1 needs a path}")"); shift ;;
    --device | --dtype) dev+=("$1" "${2:?$1 needs a value}"); shift ;;
    --clients) clients=${2:?--clients needs counts}; shift ;;
    --requests) requests=${2:?--requests needs a number}; shift ;;
    --max-tokens) max_tokens=${2:?--max-tokens needs a number}; shift ;;
    --) shift; server_flags=("$@"); break ;;
    -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-serve.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ ${#src[@]} -eq 2 ] || { echo "bench-serve.sh: give --model DIR or --checkpoint FILE" >&2; exit 2; }

moe_bin=${MOE_BIN:-$root/build/moe}
if [ -z "${MOE_BIN:-}" ] && [[ " ${dev[*]} " == *" --device cuda "* ]] && [ -x "$root/build-gpu/moe" ]; then
    moe_bin=$root/build-gpu/moe
fi
[ -x "$moe_bin" ] || { echo "bench-serve.sh: no moe program at $moe_bin (build it, or set MOE_BIN)" >&2; exit 1; }
node=${NODE:-node}
out=${BENCH_OUT:-$root/bench-results/$(date +%Y%m%d-%H%M%S)-serve}
mkdir -p "$out"

most=0
for c in $clients; do [ "$c" -gt "$most" ] && most=$c; done
defaults=()
[[ " ${server_flags[*]} " == *" --max-batch "* ]] || defaults+=(--max-batch "$most")
[[ " ${server_flags[*]} " == *" --max-queue "* ]] || defaults+=(--max-queue $((4 * most)))
serve_cmd=("$moe_bin" serve "${src[@]}" "${dev[@]}" --port 0 "${defaults[@]}" "${server_flags[@]}")
echo "${serve_cmd[*]}" > "$out/server.cmd"

server_pid=
cleanup() { [ -n "$server_pid" ] && kill -9 "$server_pid" 2> /dev/null; }
trap cleanup EXIT
"${serve_cmd[@]}" > "$out/server.out" 2> "$out/server.err" &
server_pid=$!
url=
for _ in $(seq 1 6000); do # up to 10 minutes to load the model
    url=$(sed -n 's/^listening on //p' "$out/server.out" 2> /dev/null)
    [ -n "$url" ] && break
    kill -0 "$server_pid" 2> /dev/null || break
    sleep 0.1
done
[ -n "$url" ] || { echo "bench-serve.sh: the server did not start:" >&2; tail -n 20 "$out/server.err" >&2; exit 1; }
echo "bench-serve.sh: serving at $url ($(tail -n 1 "$out/server.err"))" >&2

failures=0
"$node" "$root/scripts/load-serve.js" "$url" --clients 1 --requests 1 --max-tokens "$max_tokens" \
    > "$out/warmup.log" 2>&1 || { echo "bench-serve.sh: the warm-up request failed (see $out/warmup.log)" >&2; failures=1; }
for c in $clients; do
    echo "bench-serve.sh: $c clients x $requests requests" >&2
    "$node" "$root/scripts/load-serve.js" "$url" --clients "$c" --requests "$requests" --max-tokens "$max_tokens" \
        --json "$out/load-$c.json" > "$out/load-$c.log" 2>&1 || failures=$((failures + 1))
done

kill -TERM "$server_pid"
stopped=
for _ in $(seq 1 1500); do
    kill -0 "$server_pid" 2> /dev/null || { wait "$server_pid" && stopped=yes; break; }
    sleep 0.1
done
server_pid=
[ -n "$stopped" ] || { echo "bench-serve.sh: the server did not exit 0 after SIGTERM" >&2; failures=$((failures + 1)); }

"$node" - "$out" "$clients" "${serve_cmd[*]}" << 'JS' | tee "$out/report.md"
const fs = require("fs");
const [out, clients, cmd] = process.argv.slice(2);
const f = (x) => (x === null || x === undefined ? "NA" : x.toFixed(1));
console.log(`\`${cmd}\`\n`);
console.log("| clients | requests | output tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | failures |");
console.log("|---:|---:|---:|---:|---:|---:|---:|---:|");
for (const c of clients.trim().split(/\s+/)) {
  let r = null;
  try { r = JSON.parse(fs.readFileSync(`${out}/load-${c}.json`, "utf8")); } catch (e) {}
  if (!r) { console.log(`| ${c} | NA | NA | NA | NA | NA | NA | no result (see load-${c}.log) |`); continue; }
  console.log(`| ${c} | ${c * r.requests} | ${f(r.tokens_per_s)} | ${f(r.ttft_p50_ms)} | ${f(r.ttft_p99_ms)} | ` +
              `${f(r.itl_p50_ms)} | ${f(r.itl_p99_ms)} | ${r.failed + r.truncated} |`);
}
JS
echo "bench-serve.sh: results in $out" >&2
[ "$failures" -eq 0 ]
