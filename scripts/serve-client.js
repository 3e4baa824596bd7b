#!/usr/bin/env node
// The official OpenAI client against `moe serve` (run by scripts/test-serve.sh):
// models, completions, chat, streaming, stop strings, logprobs, seeds, error statuses, and
// batch invariance: every greedy answer of N concurrent streaming clients equals the same
// request served alone.
//   NODE_PATH=<dir>/node_modules node scripts/serve-client.js http://127.0.0.1:PORT [N]
"use strict";
const { OpenAI } = require("openai");

const base = process.argv[2], nClients = +(process.argv[3] || 10);
const client = new OpenAI({ baseURL: base + "/v1", apiKey: "none", maxRetries: 0, timeout: 120000 });
let fails = 0;
function check(what, cond, detail) {
  if (cond) console.log("ok   " + what);
  else { console.log("FAIL " + what + (detail !== undefined ? ": " + JSON.stringify(detail) : "")); fails++; }
}

async function chatText(messages, extra = {}) {
  const r = await client.chat.completions.create({ model: "m", messages, temperature: 0, ...extra });
  return r;
}

async function streamChat(messages, extra = {}) {
  const stream = await client.chat.completions.create({ model: "m", messages, temperature: 0, stream: true,
                                                        stream_options: { include_usage: true }, ...extra });
  let text = "", finish = null, usage = null, chunks = 0;
  for await (const c of stream) {
    chunks++;
    if (c.usage) usage = c.usage;
    const ch = c.choices[0];
    if (!ch) continue;
    if (ch.delta && ch.delta.content) text += ch.delta.content;
    if (ch.finish_reason) finish = ch.finish_reason;
  }
  return { text, finish, usage, chunks };
}

async function expectStatus(what, status, fn) {
  try {
    await fn();
    check(what, false, "no error");
  } catch (e) {
    check(what, e.status === status && e.error && typeof e.error.message === "string", { status: e.status, error: e.error });
  }
}

async function basics() {
  const models = await client.models.list();
  check("models.list", models.data.length === 1 && typeof models.data[0].id === "string");
  const c = await client.completions.create({ model: "m", prompt: "Hello", max_tokens: 8, temperature: 0 });
  check("completion", typeof c.choices[0].text === "string" && c.usage.completion_tokens <= 8 &&
        ["length", "stop"].includes(c.choices[0].finish_reason), c);
  const r = await chatText([{ role: "user", content: "Hi" }], { max_tokens: 12 });
  const whole = r.choices[0].message.content;
  check("chat", typeof whole === "string" && r.choices[0].message.role === "assistant" && r.usage.prompt_tokens > 0, r);
  const s = await streamChat([{ role: "user", content: "Hi" }], { max_tokens: 12 });
  check("streamed chat equals the whole answer", s.text === whole && s.finish === r.choices[0].finish_reason, [s, whole]);
  check("stream usage", s.usage && s.usage.completion_tokens === r.usage.completion_tokens, s.usage);
  const cs = await client.completions.create({ model: "m", prompt: "Hello", max_tokens: 8, temperature: 0, stream: true });
  let ct = "";
  for await (const x of cs) ct += x.choices[0] ? x.choices[0].text : "";
  check("streamed completion equals the whole", ct === c.choices[0].text, [ct, c.choices[0].text]);
}

async function stops() {
  const msgs = [{ role: "user", content: "Tell me a story" }];
  const full = (await chatText(msgs, { max_tokens: 24 })).choices[0].message.content;
  const chars = Array.from(full);
  if (chars.length < 8) return check("stop strings (answer long enough)", false, full);
  const stop = chars.slice(4, 7).join("");
  const want = full.slice(0, full.indexOf(stop));
  const r = await chatText(msgs, { max_tokens: 24, stop: [stop, "\u0001never"] });
  check("stop string cuts the answer", r.choices[0].message.content === want && r.choices[0].finish_reason === "stop",
        [r.choices[0].message.content, want, stop]);
  const s = await streamChat(msgs, { max_tokens: 24, stop });
  check("stop string in a stream", s.text === want && s.finish === "stop", [s.text, want]);
}

async function logprobs() {
  const r = await chatText([{ role: "user", content: "Hi" }], { max_tokens: 6, logprobs: true, top_logprobs: 3 });
  const lp = r.choices[0].logprobs && r.choices[0].logprobs.content;
  check("chat logprobs: one per token", lp && lp.length === r.usage.completion_tokens, r.choices[0].logprobs);
  check("chat logprobs: 3 alternatives, sorted, greedy = the best", lp && lp.every(t =>
    t.top_logprobs.length === 3 && t.logprob <= 0 && t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob &&
    t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob && Math.abs(t.logprob - t.top_logprobs[0].logprob) < 1e-6));
  const c = await client.completions.create({ model: "m", prompt: "Hello", max_tokens: 5, temperature: 0, logprobs: 2 });
  const l = c.choices[0].logprobs;
  check("completion logprobs", l && l.tokens.length === c.usage.completion_tokens &&
        l.token_logprobs.length === l.tokens.length && l.top_logprobs.every(o => Object.keys(o).length >= 1), l);
}

async function seeds() {
  const msgs = [{ role: "user", content: "Hi" }];
  const a = await chatText(msgs, { max_tokens: 12, temperature: 1, seed: 42 });
  const b = await chatText(msgs, { max_tokens: 12, temperature: 1, seed: 42 });
  check("same seed, same sample", a.choices[0].message.content === b.choices[0].message.content);
}

async function errors() {
  await expectStatus("max_tokens 0 is a 400", 400, () => chatText([{ role: "user", content: "Hi" }], { max_tokens: 0 }));
  await expectStatus("max_tokens beyond the context is a 400", 400,
                     () => chatText([{ role: "user", content: "Hi" }], { max_tokens: 100000000 }));
  await expectStatus("no messages is a 400", 400, () => client.chat.completions.create({ model: "m" }));
  await expectStatus("temperature 5 is a 400", 400, () => chatText([{ role: "user", content: "Hi" }], { temperature: 5 }));
  await expectStatus("top_logprobs 6 is a 400", 400,
                     () => chatText([{ role: "user", content: "Hi" }], { logprobs: true, top_logprobs: 6 }));
  await expectStatus("n 2 is a 400", 400, () => chatText([{ role: "user", content: "Hi" }], { n: 2 }));
}

async function batchInvariance() {
  const prompts = [];
  for (let i = 0; i < nClients; i++) prompts.push("Question " + i + ": " + "why ".repeat(1 + (i * 7) % 13) + "?");
  const alone = [];
  for (const p of prompts) alone.push((await chatText([{ role: "user", content: p }], { max_tokens: 20 })).choices[0].message.content);
  const together = await Promise.all(prompts.map(p => streamChat([{ role: "user", content: p }], { max_tokens: 20 })));
  const same = together.filter((t, i) => t.text === alone[i]).length;
  check(`batch invariance: ${nClients} concurrent streams equal the answers served alone (${same}/${nClients})`,
        same === nClients, together.map((t, i) => [t.text, alone[i]]).filter(([a, b]) => a !== b));
  check("every stream finished", together.every(t => t.finish === "length" || t.finish === "stop"));
}

(async () => {
  for (const t of [basics, stops, logprobs, seeds, errors, batchInvariance]) {
    try { await t(); } catch (e) { check(t.name + " threw", false, String(e && e.stack || e)); }
  }
  console.log(fails ? `${fails} openai client check(s) failed` : "all openai client checks passed");
  process.exit(fails ? 1 : 0);
})();
