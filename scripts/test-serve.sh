#!/usr/bin/env bash
# `moe serve` end to end on loopback (ctest label cpu): a Hugging Face hub fixture served on
# a free port; curl for every endpoint and for bad input (malformed JSON, wrong types,
# unknown fields, prompt over the context, max_tokens 0 / negative / huge, invalid UTF-8,
# 10 MB bodies, slow clients, 200 idle connections, a client that hangs up mid-stream);
# the official OpenAI client (scripts/serve-client.js: completion, chat, streaming, stop
# strings, logprobs, batch invariance over concurrent streams); the load script (also 64
# clients x 16 greedy requests, each answer equal to its prompt served alone); the chat
# page in headless Chromium (DOM and screenshot); SIGTERM draining a running stream and
# exiting 0; one of our checkpoints served with the plain chat format; the queue bound (429);
# --offload --micro-batch (token scheduling by a predictor's paths): the flags' refusals, the
# answers unchanged, more forwards than steps in /metrics; no sanitizer report in the server
# logs (the ASan build runs the same script).
#   scripts/test-serve.sh path/to/moe WORKDIR NODE_DIR
set -uo pipefail
moe=$(realpath "$1")
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${2:-$(mktemp -d)}
node_dir=${3:-$work/node}
rm -rf "$work"; mkdir -p "$work" "$node_dir"; cd "$work"
export OMP_NUM_THREADS=1
fixture="$root/tests/fixtures/hf/qwen3-moe-tiny"
fails=0
pass() { echo "ok   $1"; }
fail() { echo "FAIL $1"; fails=$((fails + 1)); }
server_pid=
cleanup() { [ -n "$server_pid" ] && kill -9 "$server_pid" 2> /dev/null; }
trap cleanup EXIT

# start_server LOG ARGS...: starts moe serve on a free port, sets $server_pid and $url.
start_server() {
  local log=$1; shift
  "$moe" serve "$@" --port 0 > "$log.out" 2> "$log.err" &
  server_pid=$!
  for _ in $(seq 1 300); do
    grep -q "^listening on " "$log.out" 2> /dev/null && break
    kill -0 "$server_pid" 2> /dev/null || break
    sleep 0.1
  done
  url=$(sed -n 's/^listening on //p' "$log.out")
  [ -n "$url" ] || { echo "the server did not start:"; cat "$log.err"; exit 1; }
}
# stop_server: SIGTERM, and the exit code must be 0 within 150 s.
stop_server() {
  kill -TERM "$server_pid"
  local rc=124
  for _ in $(seq 1 1500); do kill -0 "$server_pid" 2> /dev/null || { wait "$server_pid"; rc=$?; break; }; sleep 0.1; done
  server_pid=
  return "$rc"
}
# http WHAT STATUS TEXT curl-args...: the status code and a piece of the body.
http() {
  local what=$1 want=$2 text=$3; shift 3
  local code
  code=$(curl -s -o body.txt -w '%{http_code}' --max-time 60 "$@")
  if [ "$code" = "$want" ] && grep -qF -- "$text" body.txt; then pass "$what"
  else fail "$what (status $code, want $want and '$text')"; head -c 400 body.txt; echo; fi
}
post() { local what=$1 want=$2 text=$3 path=$4 body=$5; http "$what" "$want" "$text" "$url$path" -H 'Content-Type: application/json' --data-binary "$body"; }
metric() { curl -s "$url/metrics" | awk -v n="$1" '$1 == n {print $2}'; }

# bf16 compute needs cuda: refused by the config's rule, before anything listens
"$moe" serve --model "$fixture" --dtype bf16 --port 0 > bf16.out 2> bf16.err; rc=$?
if [ "$rc" = 2 ] && grep -q "train.dtype=bf16 needs train.device=cuda" bf16.err && ! grep -q "^listening" bf16.out
then pass "--dtype bf16 on the cpu: refused (exit 2) naming the rule"; else fail "--dtype bf16 on the cpu (exit $rc)"; cat bf16.err; fi
start_server hub --model "$fixture" --max-batch 4 --max-queue 32 --timeout 2 --max-tokens-in-flight 1024
port=${url##*:}
case "$url" in http://127.0.0.1:*) pass "binds 127.0.0.1 and prints its free port ($port)";; *) fail "listening line: $url";; esac

# ---- the command line ----
"$moe" serve --help > help.txt && grep -q -- "--max-tokens-in-flight" help.txt && pass "serve --help" || fail "serve --help"
"$moe" serve > usage.txt 2>&1; [ $? = 2 ] && grep -q "give --model DIR or --checkpoint FILE" usage.txt && pass "no model: exit 2" || fail "no model"
"$moe" serve --model "$fixture" --port "$port" > busy.txt 2>&1; [ $? = 1 ] && grep -q "cannot listen" busy.txt && pass "port in use: exit 1" || fail "port in use"

# ---- endpoints ----
http "GET /health" 200 '"ok"' "$url/health"
http "GET /v1/models" 200 '"qwen3-moe-tiny"' "$url/v1/models"
http "GET / serves the chat page" 200 '/v1/chat/completions' "$url/"
post "completion" 200 '"text_completion"' /v1/completions '{"prompt":"Hello","max_tokens":4,"temperature":0}'
post "chat" 200 '"chat.completion"' /v1/chat/completions '{"messages":[{"role":"user","content":"Hi"}],"max_tokens":4}'
post "chat with content parts" 200 '"assistant"' /v1/chat/completions \
  '{"messages":[{"role":"user","content":[{"type":"text","text":"Hi"}]}],"max_tokens":2}'
post "unknown fields are ignored" 200 '"usage"' /v1/completions '{"prompt":"Hello","max_tokens":2,"frobnicate":{"x":1}}'
post "token-id prompt" 200 '"prompt_tokens":3' /v1/completions '{"prompt":[1,2,3],"max_tokens":2}'
curl -sN --max-time 60 "$url/v1/chat/completions" -d '{"messages":[{"role":"user","content":"Hi"}],"max_tokens":5,"temperature":0,"stream":true,"stream_options":{"include_usage":true}}' > sse.txt
if [ "$(tail -n 2 sse.txt | head -n 1)" = "data: [DONE]" ] && grep -q '"finish_reason":"length"' sse.txt && grep -q '"completion_tokens":5' sse.txt
then pass "SSE stream ends with finish_reason, usage and data: [DONE]"; else fail "SSE stream"; cat sse.txt; fi

# ---- bad input: OpenAI error objects with the right status ----
post "malformed JSON: 400" 400 '"invalid_request_error"' /v1/completions '{"prompt": "Hello",'
post "trailing garbage: 400" 400 'malformed JSON' /v1/completions '{"prompt":"Hello"} x'
post "not an object: 400" 400 'JSON object' /v1/completions '[1,2]'
post "wrong type names the field" 400 '"param":"temperature"' /v1/completions '{"prompt":"Hi","temperature":"hot"}'
post "prompt of the wrong type" 400 '"param":"prompt"' /v1/completions '{"prompt":{"a":1}}'
post "missing prompt" 400 "'prompt' is required" /v1/completions '{"max_tokens":3}'
post "bad role" 400 '"param":"messages"' /v1/chat/completions '{"messages":[{"role":"wizard","content":"Hi"}]}'
post "max_tokens 0: 400" 400 '"param":"max_tokens"' /v1/completions '{"prompt":"Hi","max_tokens":0}'
post "max_tokens -5: 400" 400 '"param":"max_tokens"' /v1/completions '{"prompt":"Hi","max_tokens":-5}'
post "max_tokens huge: 400" 400 'context_length_exceeded' /v1/completions '{"prompt":"Hi","max_tokens":1000000000000}'
post "max_tokens 2.5: 400" 400 'must be an integer' /v1/completions '{"prompt":"Hi","max_tokens":2.5}'
post "stream not a bool: 400" 400 '"param":"stream"' /v1/completions '{"prompt":"Hi","stream":"yes"}'
post "logprobs 9: 400" 400 '"param":"logprobs"' /v1/completions '{"prompt":"Hi","logprobs":9}'
post "five stop strings: 400" 400 '"param":"stop"' /v1/completions '{"prompt":"Hi","stop":["a","b","c","d","e"]}'
long=$(printf 'word %.0s' $(seq 1 400))
post "prompt over the context: 400" 400 'context_length_exceeded' /v1/completions "{\"prompt\":\"$long\"}"
printf '{"prompt":"caf\xe9 \xff","max_tokens":2}' > bad-utf8.json
http "invalid UTF-8: 400" 400 'UTF-8' "$url/v1/completions" --data-binary @bad-utf8.json
printf '{"prompt":"\\ud800","max_tokens":2}' > surrogate.json
http "lone surrogate escape: 400" 400 'invalid_request_error' "$url/v1/completions" --data-binary @surrogate.json
head -c 10485760 /dev/zero | tr '\0' ' ' > big.json
http "10 MB body: 413" 413 'too large' "$url/v1/completions" --data-binary @big.json
http "10 MB chunked body: 413" 413 'too large' "$url/v1/completions" -H 'Transfer-Encoding: chunked' --data-binary @big.json
http "unknown path: 404" 404 'not_found' "$url/v2/nothing"
http "GET on a POST endpoint: 405" 405 'use POST' "$url/v1/completions"
http "still healthy after the bad input" 200 '"ok"' "$url/health"

# ---- slow and many clients ----
exec {slow}<>"/dev/tcp/127.0.0.1/$port"
printf 'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{"prompt":' >&"$slow"
sleep 3.5
if timeout 3 cat <&"$slow" > slow.txt; then pass "a slow client is cut off after --timeout"; else fail "slow client still connected"; fi
exec {slow}>&-
conns=()
for _ in $(seq 1 200); do exec {c}<>"/dev/tcp/127.0.0.1/$port" && conns+=("$c"); done
http "answers with 200 idle connections open (${#conns[@]})" 200 '"ok"' "$url/health"
post "and generates" 200 '"text_completion"' /v1/completions '{"prompt":"Hello","max_tokens":2}'
for c in "${conns[@]}"; do exec {c}>&-; done

# ---- the OpenAI client and the load script ----
# from the npm registry: tried three times, so that one dropped connection does not fail the test
for try in 1 2 3; do
  [ -d "$node_dir/node_modules/openai" ] && break
  npm install --prefix "$node_dir" --no-audit --no-fund openai > npm.txt 2>&1 && break
  echo "npm install failed (try $try):"; tail -5 npm.txt; sleep 5
done
if NODE_PATH="$node_dir/node_modules" node "$root/scripts/serve-client.js" "$url" 10 > client.txt 2>&1; then pass "openai client checks"
else fail "openai client checks"; fi
cat client.txt | sed 's/^/     /'
if node "$root/scripts/load-serve.js" "$url" --clients 8 --requests 2 --max-tokens 16 > load.txt 2>&1; then pass "load: 8 clients x 2 streams, none failed or truncated"
else fail "load script"; fi
sed 's/^/     /' load.txt
sleep 0.3 # idle now: the gauges drop to 0, the counters keep what the requests did
m200=$(metric 'moe_requests_total{status="200"}'); m400=$(metric 'moe_requests_total{status="400"}')
gen=$(metric moe_generated_tokens_total); ttft=$(metric moe_time_to_first_token_seconds_count)
tpot=$(metric moe_time_per_output_token_seconds_count); batch=$(metric moe_batch_sequences_count)
if [ "${m200:-0}" -gt 50 ] && [ "${m400:-0}" -gt 15 ] && [ "${gen:-0}" -gt 500 ] && [ "${ttft:-0}" -gt 30 ] &&
   [ "${tpot:-0}" -gt "${ttft:-0}" ] && [ "${batch:-0}" -gt 0 ] && [ "$(metric moe_batch_size)" = 0 ] &&
   [ "$(metric moe_queue_length)" = 0 ] && [ "$(metric moe_kv_blocks_used)" = 0 ] && [ "$(metric moe_kv_blocks_total)" = 64 ]
then pass "metrics: 200s $m200, 400s $m400, $gen tokens, $ttft first tokens, idle gauges 0"
else fail "metrics"; curl -s "$url/metrics" | grep -v "^#" | head -40; fi
if [ "$(metric moe_expert_cache_offloaded)" = 0 ] && [ "$(metric moe_expert_cache_hit_rate)" = 1.000000 ]
then pass "metrics: every expert resident, hit rate 1"; else fail "metrics: resident expert cache"; curl -s "$url/metrics" | grep expert; fi
greedy='{"prompt":"The capital of France is","max_tokens":24,"temperature":0}'
curl -s "$url/v1/completions" -d "$greedy" > resident.json

# ---- the chat page in headless Chromium ----
chrome=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$chrome" ] && [ "$(id -u)" = 0 ]; then
  apt-get install -y -qq chromium > /dev/null 2>&1
  chrome=$(command -v chromium || true)
fi
if [ -z "$chrome" ]; then echo "skip chat page: chromium is not installed (apt-get install chromium)"
else
  curl -s "$url/v1/chat/completions" -d '{"messages":[{"role":"user","content":"Hi"}],"max_tokens":16,"temperature":0}' > want.json
  timeout 150 node "$root/scripts/chat-page.js" "$chrome" "$url/?q=Hi&max=16" dom.html "$work/chat.png" 120 2> chrome.txt
  if [ ! -s dom.html ] && grep -qi "sandbox\|running as root" chrome.txt; then echo "skip chat page: chromium cannot run here"; cat chrome.txt
  elif python3 - want.json dom.html <<'PY'
import html, json, re, sys
want = json.load(open(sys.argv[1]))["choices"][0]["message"]["content"]
dom = open(sys.argv[2]).read()
got = re.search(r'<div class="msg assistant">(.*?)</div>', dom, re.S)
ok = 'data-exchanges="1"' in dom and got is not None and html.unescape(got.group(1)) == want and want != ""
print("page answer:", repr(html.unescape(got.group(1)) if got else None), "expected:", repr(want))
sys.exit(0 if ok else 1)
PY
  then [ -s chat.png ] && pass "chat page: the streamed answer is on the page, screenshot $work/chat.png" || fail "no screenshot"
    grep -q "tokens/s, all experts resident" dom.html && pass "chat page: shows tokens/s and the expert cache" ||
      { fail "chat page stats"; grep -o 'id="stats"[^<]*' dom.html; }
  else fail "chat page answer"; head -c 600 dom.html; tail -5 chrome.txt; fi
fi

if stop_server; then pass "SIGTERM when idle: exit 0"; else fail "SIGTERM exit code"; tail -3 hub.err; fi

# ---- offloaded experts: a cache of two layers' top-k slots, answers equal to resident ----
"$moe" serve --model "$fixture" --max-batch 4 --max-tokens-in-flight 1024 --offload --gpu-memory 1KiB --port 0 \
  > small.out 2> small.err
need=$(sed -n 's/.*needs at least .* (\([0-9]*\) bytes).*/\1/p' small.err); slot=$(sed -n 's/.*slots of \([0-9]*\) bytes.*/\1/p' small.err)
if [ -n "$need" ] && [ -n "$slot" ] && ! grep -q "^listening" small.out
then pass "--offload with too small a budget: refused, saying it needs $need bytes"
else fail "--offload budget refusal"; cat small.err; need=100000000 slot=0; fi
start_server offload --model "$fixture" --max-batch 4 --max-tokens-in-flight 1024 --offload --gpu-memory $((need + 4 * slot)) --policy lru
curl -s "$url/v1/completions" -d "$greedy" > offloaded.json
if python3 -c 'import json, sys; a, b = (json.load(open(f))["choices"][0]["text"] for f in sys.argv[1:]); sys.exit(not (a == b and a))' \
     resident.json offloaded.json; then pass "offloaded serving: the greedy answer equals resident"
else fail "offloaded answer differs"; cat resident.json offloaded.json; fi
hits=$(metric moe_expert_cache_hits_total); misses=$(metric moe_expert_cache_misses_total); rate=$(metric moe_expert_cache_hit_rate)
if [ "$(metric moe_expert_cache_offloaded)" = 1 ] && [ "${misses:-0}" -gt 0 ] && [ "${hits:-0}" -gt 0 ] &&
   python3 -c "import sys; sys.exit(abs($rate - $hits / ($hits + $misses)) > 1e-6)"
then pass "metrics: expert cache offloaded, $hits hits, $misses misses, hit rate $rate"
else fail "metrics: offloaded expert cache"; curl -s "$url/metrics" | grep expert; fi
if stop_server; then pass "SIGTERM (offloaded): exit 0"; else fail "SIGTERM exit code (offloaded)"; tail -3 offload.err; fi

# ---- token scheduling: decode rows in micro-batches by predicted paths, answers unchanged ----
for case in "--micro-batch 2|serve: --micro-batch goes with --offload" \
            "--offload --gpu-memory 6GiB --micro-batch 2 --schedule paths|serve: --schedule paths needs --predictor" \
            "--offload --gpu-memory 6GiB --schedule arrival|serve: --schedule goes with --micro-batch M"; do
  args=${case%%|*} want=${case#*|}
  "$moe" serve --model "$fixture" $args --port 0 > micro.out 2> micro.err; rc=$?
  if [ "$rc" = 2 ] && grep -qF -- "$want" micro.err && ! grep -q "^listening" micro.out; then pass "serve $args: refused (exit 2)"
  else fail "serve $args (exit $rc)"; cat micro.err; fi
done
for i in $(seq 1 40); do echo "It was the best of times, it was the worst of times, number $i."; done > trace.txt
"$moe" trace --model "$fixture" --data trace.txt --out traces.h5 --tokens 1000 > trace.log 2>&1 &&
  "$moe" predictor train traces.h5 --out predictor.h5 --steps 30 > predictor.log 2>&1 || { fail "a predictor of the fixture"; cat trace.log predictor.log; }
start_server micro --model "$fixture" --max-batch 4 --max-tokens-in-flight 1024 --offload --gpu-memory $((need + 4 * slot)) \
  --predictor predictor.h5 --micro-batch 2
grep -q "micro-batches of 2 sequences, grouped by predicted routing paths" micro.err && pass "--micro-batch 2: said on stderr" \
  || { fail "--micro-batch line"; cat micro.err; }
curl -s "$url/v1/completions" -d "$greedy" > micro.json
if python3 -c 'import json, sys; a, b = (json.load(open(f))["choices"][0]["text"] for f in sys.argv[1:]); sys.exit(not (a == b and a))' \
     resident.json micro.json; then pass "micro-batches: the greedy answer equals resident"
else fail "micro-batched answer differs"; cat resident.json micro.json; fi
if timeout 120 node "$root/scripts/load-serve.js" "$url" --clients 8 --requests 2 --max-tokens 16 --greedy-alone 4 > loadmicro.txt 2>&1
then pass "micro-batches: 8 clients x 2 streams, every greedy answer equal to its prompt served alone"
else fail "micro-batches under load"; sed 's/^/     /' loadmicro.txt; fi
dec=$(metric 'moe_forwards_total{kind="decode"}'); pre=$(metric 'moe_forwards_total{kind="prefill"}'); fwd=$((${dec:-0} + ${pre:-0}))
steps=$(metric moe_batch_sequences_count); experts=$(metric 'moe_forward_experts_total{kind="decode"}')
if [ "$fwd" -gt "${steps:-0}" ] && [ "${experts:-0}" -gt 0 ]; then pass "metrics: $fwd forwards in $steps steps, $experts distinct experts in decode forwards"
else fail "metrics: forwards $fwd, steps $steps, experts $experts"; curl -s "$url/metrics" | grep forward; fi
if stop_server; then pass "SIGTERM (micro-batches): exit 0"; else fail "SIGTERM exit code (micro-batches)"; tail -3 micro.err; fi

# ---- load: 64 streaming clients x 16 requests, every greedy answer equal to its prompt alone ----
start_server load --model "$fixture" --max-batch 16 --max-queue 128 --max-tokens-in-flight 4096
if timeout 300 node "$root/scripts/load-serve.js" "$url" --clients 64 --requests 16 --max-tokens 8 --greedy-alone 16 \
     > load64.txt 2>&1; then pass "load: 64 clients x 16 streams, none failed or truncated, every greedy answer equal to its prompt served alone"
else fail "load: 64 clients x 16 streams"; fi
sed 's/^/     /' load64.txt
if stop_server; then pass "SIGTERM after the load: exit 0"; else fail "SIGTERM exit code after the load"; tail -3 load.err; fi

# ---- one of our checkpoints: byte tokens, the plain chat format; a long context (slow enough to
# hang up on a running stream and to SIGTERM one) ----
for i in $(seq 1 1500); do echo "It was the best of times, it was the worst of times, number $((i % 7))."; done > text.txt
"$moe" data prepare --out data text.txt > prep.txt 2>&1
"$moe" train "$root/configs/tiny-cpu.yaml" --set data.train_path=data/train.bin --set data.val_path=data/val.bin \
  --set model.d_model=128 --set model.n_layers=2 --set model.n_heads=2 --set model.seq_len=2048 --set model.ffn_dim=128 \
  --set model.n_experts=4 --set data.batch_size=1 --set train.eval_batches=1 --set train.steps=2 --set train.eval_every=0 \
  --set checkpoint.dir=run --quiet > train.txt 2>&1
ckpt=$(ls run/ckpt-*.h5 2> /dev/null | tail -1)
if [ -z "$ckpt" ]; then fail "training the tiny checkpoint"; tail -5 train.txt
else
  start_server ckpt --checkpoint "$ckpt" --max-tokens-in-flight 4096 --drain-seconds 120 --max-batch 2 --max-queue 1
  # "User: Hi\nAssistant:" is 19 bytes = 19 byte tokens
  post "checkpoint: chat in the plain format" 200 '"prompt_tokens":19' /v1/chat/completions \
    '{"messages":[{"role":"user","content":"Hi"}],"max_tokens":8,"temperature":0}'
  post "checkpoint: completion" 200 '"completion_tokens":8' /v1/completions '{"prompt":"It was","max_tokens":8,"temperature":0}'
  # ---- the queue bound: 2 running, 1 waiting, the rest 429 with Retry-After ----
  pids=()
  for i in 1 2 3 4 5 6; do
    curl -s -o /dev/null -D "hdr$i.txt" -w '%{http_code}' --max-time 120 "$url/v1/completions" \
      -d '{"prompt":"It was","max_tokens":300,"temperature":0}' > "code$i.txt" &
    pids+=($!)
  done
  wait "${pids[@]}"
  n200=$(cat code?.txt | grep -o 200 | wc -l); n429=$(cat code?.txt | grep -o 429 | wc -l)
  # (a request the scheduler has not yet admitted counts as waiting, so when the burst
  # arrives before the first admission only that one is answered: 1 to 3, never more)
  if [ "$n200" -ge 1 ] && [ "$n200" -le 3 ] && [ $((n200 + n429)) = 6 ] && grep -qi '^retry-after: 1' $(grep -l 429 code?.txt | sed 's/code/hdr/')
  then pass "queue bound: $n200 answered, $n429 told 429 with Retry-After"; else fail "queue bound: $(cat code?.txt)"; fi

  # ---- a client that hangs up mid-stream cancels its request ----
  before=$(metric moe_requests_cancelled_total)
  # (the client hangs up after its first chunk, however fast the machine generates)
  { curl -sN --max-time 60 "$url/v1/completions" -d '{"prompt":"Hello","max_tokens":2000,"stream":true,"temperature":0}' \
      | head -c 1 > /dev/null; } || true
  sleep 1
  g1=$(metric moe_generated_tokens_total); sleep 0.5; g2=$(metric moe_generated_tokens_total)
  after=$(metric moe_requests_cancelled_total)
  blocks=$(metric moe_kv_blocks_used)
  if [ "$after" -gt "$before" ] && [ "$g1" = "$g2" ] && [ "$blocks" = 0 ]; then
    pass "a hung-up stream is cancelled, stops generating and frees its KV blocks"
  else fail "hang-up: cancelled $before -> $after, generated $g1 -> $g2, KV blocks used $blocks"; fi

  # ---- SIGTERM drains a running stream and exits 0 ----
  curl -sN --max-time 180 "$url/v1/completions" -d '{"prompt":"Hello","max_tokens":1000,"stream":true,"temperature":0}' > drain.txt &
  cpid=$!
  for _ in $(seq 1 100); do [ -s drain.txt ] && break; sleep 0.05; done # the stream is running
  if stop_server; then pass "SIGTERM: exit 0"; else fail "SIGTERM exit code"; tail -3 ckpt.err; fi
  wait "$cpid"
  if grep -q '"finish_reason":"length"' drain.txt && tail -n 2 drain.txt | grep -q '^data: \[DONE\]$'; then pass "SIGTERM: the running stream finished first"
  else fail "SIGTERM drain"; tail -c 300 drain.txt; fi
  grep -q "serve: stopping: 1 request in flight" ckpt.err && pass "SIGTERM: said what it waited for" || { fail "drain message"; cat ckpt.err; }
fi

if grep -l "runtime error\|Sanitizer" ./*.err; then fail "sanitizer reports in the server logs"; fi
[ "$fails" = 0 ] && echo "all serve checks passed" || echo "$fails serve check(s) failed"
[ "$fails" = 0 ]
