#!/usr/bin/env node
// Load test of `moe serve`: N concurrent streaming chat clients, M requests each, on a
// loopback address only. Prints throughput, p50/p99 time to first token and inter-token
// latency; exits 1 if any request failed or its stream was truncated (no finish_reason or
// no [DONE]). --json FILE also writes the numbers there as one JSON object.
// --greedy-alone K: every request is greedy (temperature 0) with one of K prompts; each
// prompt is first served alone (one request at a time), and every answer under load must
// equal its prompt's answer alone, token for token (batch invariance); exit 1 otherwise.
//   node scripts/load-serve.js http://127.0.0.1:PORT [--clients N] [--requests M] [--max-tokens T] [--json FILE]
//        [--greedy-alone K]
"use strict";

const args = process.argv.slice(2);
const base = args[0];
function opt(name, dflt) {
  const i = args.indexOf(name);
  return i > 0 ? +args[i + 1] : dflt;
}
const clients = opt("--clients", 8), requests = opt("--requests", 4), maxTokens = opt("--max-tokens", 32);
const jsonPath = args.indexOf("--json") > 0 ? args[args.indexOf("--json") + 1] : null;
const greedyPrompts = opt("--greedy-alone", 0);
if (!base || !/^http:\/\/(127\.0\.0\.1|localhost|\[::1\])(:\d+)?$/.test(base) || !(clients >= 1 && clients <= 256) ||
    !(requests >= 1 && requests <= 1000) || !(maxTokens >= 1 && maxTokens <= 4096) || jsonPath === undefined ||
    !(Number.isInteger(greedyPrompts) && greedyPrompts >= 0 && greedyPrompts <= 1000)) {
  console.error("usage: load-serve.js http://127.0.0.1:PORT [--clients 1-256] [--requests 1-1000] [--max-tokens 1-4096] " +
                "[--json FILE] [--greedy-alone 1-1000]");
  process.exit(2);
}

const ttft = [], itl = [];
let tokens = 0, failed = 0, truncated = 0;

// The request of client c's r-th turn: sampled with its own seed, or greedy on one of the
// --greedy-alone prompts.
function request(c, r) {
  const k = (c * requests + r) % (greedyPrompts || 1);
  const content = greedyPrompts ? `prompt ${k}: tell me about the number ${k * 7 + 3}` : `client ${c} request ${r}: say something`;
  return { prompt: k, body: { messages: [{ role: "user", content }], max_tokens: maxTokens,
                              temperature: greedyPrompts ? 0 : 0.8, seed: c * 1000 + r, stream: true,
                              stream_options: { include_usage: true } } };
}

// One streamed request; its text, or null when it failed or was truncated (counted).
async function one(c, r, timed = true) {
  const t0 = performance.now();
  const resp = await fetch(base + "/v1/chat/completions", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request(c, r).body) });
  if (!resp.ok) { failed++; await resp.text(); return null; }
  const reader = resp.body.getReader(), dec = new TextDecoder();
  let buf = "", last = 0, done = false, finish = null, usage = null, text = "";
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
      if (j.error) { failed++; return null; }
      if (j.usage) usage = j.usage;
      const ch = j.choices[0];
      if (!ch) continue;
      if (ch.finish_reason) finish = ch.finish_reason;
      if (ch.delta && ch.delta.content) {
        const now = performance.now();
        if (timed) { if (!last) ttft.push(now - t0); else itl.push(now - last); }
        last = now;
        text += ch.delta.content;
      }
    }
  }
  if (!done || !finish || !usage) { truncated++; return null; }
  if (timed) tokens += usage.completion_tokens;
  return text;
}

// Each --greedy-alone prompt served alone, one request at a time: alone[k].
async function serveAlone() {
  const alone = [];
  for (let k = 0; k < greedyPrompts; k++) {
    const c = Math.floor(k / requests), r = k % requests; // request(c, r) asks prompt k
    alone.push(await one(c, r, false));
  }
  return alone;
}

function pct(a, p) {
  if (!a.length) return NaN;
  const s = [...a].sort((x, y) => x - y);
  return s[Math.min(s.length - 1, Math.floor(p / 100 * s.length))];
}

(async () => {
  const alone = greedyPrompts ? await serveAlone() : [];
  const answers = [];
  const t0 = performance.now();
  await Promise.all(Array.from({ length: clients }, async (_, c) => {
    for (let r = 0; r < requests; r++) {
      try { answers.push([request(c, r).prompt, await one(c, r)]); }
      catch (e) { failed++; console.error(`client ${c} request ${r}: ${e.message}`); }
    }
  }));
  const secs = (performance.now() - t0) / 1000;
  console.log(`${clients} clients x ${requests} requests in ${secs.toFixed(2)} s: ${tokens} tokens, ` +
              `${(tokens / secs).toFixed(1)} tokens/s, ${((clients * requests) / secs).toFixed(2)} requests/s`);
  console.log(`time to first token p50 ${pct(ttft, 50).toFixed(1)} ms, p99 ${pct(ttft, 99).toFixed(1)} ms; ` +
              `inter-token p50 ${pct(itl, 50).toFixed(1)} ms, p99 ${pct(itl, 99).toFixed(1)} ms`);
  console.log(`failed ${failed}, truncated ${truncated}`);
  let differ = 0;
  if (greedyPrompts) {
    const bad = answers.filter(([k, text]) => text !== null && (alone[k] === null || text !== alone[k]));
    differ = bad.length;
    console.log(`greedy: ${answers.length - differ} of ${answers.length} answers equal their prompt served alone ` +
                `(${greedyPrompts} prompts)`);
    for (const [k, text] of bad.slice(0, 3)) console.log(`  prompt ${k}: ${JSON.stringify(text)} alone ${JSON.stringify(alone[k])}`);
  }
  if (jsonPath) {
    const num = (x) => (Number.isFinite(x) ? +x.toFixed(3) : null);
    require("fs").writeFileSync(jsonPath, JSON.stringify({
      clients, requests, max_tokens: maxTokens, seconds: num(secs), output_tokens: tokens,
      tokens_per_s: num(tokens / secs), requests_per_s: num((clients * requests) / secs),
      ttft_p50_ms: num(pct(ttft, 50)), ttft_p99_ms: num(pct(ttft, 99)),
      itl_p50_ms: num(pct(itl, 50)), itl_p99_ms: num(pct(itl, 99)), failed, truncated,
      greedy_differ: greedyPrompts ? differ : null }) + "\n");
  }
  process.exit(failed || truncated || differ ? 1 : 0);
})();
