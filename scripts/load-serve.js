#!/usr/bin/env node
// Load test of `moe serve`: N concurrent streaming chat clients, M requests each, on a
// loopback address only. Prints throughput, p50/p99 time to first token and inter-token
// latency; exits 1 if any request failed or its stream was truncated (no finish_reason or
// no [DONE]). --json FILE also writes the numbers there as one JSON object.
//   node scripts/load-serve.js http://127.0.0.1:PORT [--clients N] [--requests M] [--max-tokens T] [--json FILE]
"use strict";

const args = process.argv.slice(2);
const base = args[0];
function opt(name, dflt) {
  const i = args.indexOf(name);
  return i > 0 ? +args[i + 1] : dflt;
}
const clients = opt("--clients", 8), requests = opt("--requests", 4), maxTokens = opt("--max-tokens", 32);
const jsonPath = args.indexOf("--json") > 0 ? args[args.indexOf("--json") + 1] : null;
if (!base || !/^http:\/\/(127\.0\.0\.1|localhost|\[::1\])(:\d+)?$/.test(base) || !(clients >= 1 && clients <= 256) ||
    !(requests >= 1 && requests <= 1000) || !(maxTokens >= 1 && maxTokens <= 4096) || jsonPath === undefined) {
  console.error("usage: load-serve.js http://127.0.0.1:PORT [--clients 1-256] [--requests 1-1000] [--max-tokens 1-4096] " +
                "[--json FILE]");
  process.exit(2);
}

const ttft = [], itl = [];
let tokens = 0, failed = 0, truncated = 0;

async function one(c, r) {
  const t0 = performance.now();
  const resp = await fetch(base + "/v1/chat/completions", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ messages: [{ role: "user", content: `client ${c} request ${r}: say something` }],
                           max_tokens: maxTokens, temperature: 0.8, seed: c * 1000 + r, stream: true,
                           stream_options: { include_usage: true } }) });
  if (!resp.ok) { failed++; await resp.text(); return; }
  const reader = resp.body.getReader(), dec = new TextDecoder();
  let buf = "", last = 0, done = false, finish = null, usage = null;
  for (;;) {
    const { done: end, value } = await reader.read();
    if (end) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const ev = buf.slice(0, i);
      buf = buf.slice(i + 2);
      if (!ev.startsWith("data: ")) continue;
      const data = ev.slice(6);
      if (data === "[DONE]") { done = true; continue; }
      const j = JSON.parse(data);
      if (j.error) { failed++; return; }
      if (j.usage) usage = j.usage;
      const ch = j.choices[0];
      if (!ch) continue;
      if (ch.finish_reason) finish = ch.finish_reason;
      if (ch.delta && ch.delta.content) {
        const now = performance.now();
        if (!last) ttft.push(now - t0); else itl.push(now - last);
        last = now;
      }
    }
  }
  if (!done || !finish || !usage) { truncated++; return; }
  tokens += usage.completion_tokens;
}

function pct(a, p) {
  if (!a.length) return NaN;
  const s = [...a].sort((x, y) => x - y);
  return s[Math.min(s.length - 1, Math.floor(p / 100 * s.length))];
}

(async () => {
  const t0 = performance.now();
  await Promise.all(Array.from({ length: clients }, async (_, c) => {
    for (let r = 0; r < requests; r++) {
      try { await one(c, r); } catch (e) { failed++; console.error(`client ${c} request ${r}: ${e.message}`); }
    }
  }));
  const secs = (performance.now() - t0) / 1000;
  console.log(`${clients} clients x ${requests} requests in ${secs.toFixed(2)} s: ${tokens} tokens, ` +
              `${(tokens / secs).toFixed(1)} tokens/s, ${((clients * requests) / secs).toFixed(2)} requests/s`);
  console.log(`time to first token p50 ${pct(ttft, 50).toFixed(1)} ms, p99 ${pct(ttft, 99).toFixed(1)} ms; ` +
              `inter-token p50 ${pct(itl, 50).toFixed(1)} ms, p99 ${pct(itl, 99).toFixed(1)} ms`);
  console.log(`failed ${failed}, truncated ${truncated}`);
  if (jsonPath) {
    const num = (x) => (Number.isFinite(x) ? +x.toFixed(3) : null);
    require("fs").writeFileSync(jsonPath, JSON.stringify({
      clients, requests, max_tokens: maxTokens, seconds: num(secs), output_tokens: tokens,
      tokens_per_s: num(tokens / secs), requests_per_s: num((clients * requests) / secs),
      ttft_p50_ms: num(pct(ttft, 50)), ttft_p99_ms: num(pct(ttft, 99)),
      itl_p50_ms: num(pct(itl, 50)), itl_p99_ms: num(pct(itl, 99)), failed, truncated }) + "\n");
  }
  process.exit(failed || truncated ? 1 : 0);
})();
