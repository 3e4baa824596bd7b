#!/usr/bin/env node
// Opens the server's chat page in headless Chromium, waits (in real time) until the page
// says it finished its first exchange (body data-exchanges="1"), then writes the page's
// DOM and a screenshot. Talks to Chromium over its DevTools pipe (file descriptors 3 and 4,
// NUL-terminated JSON), so it needs no browser-automation package.
//   node scripts/chat-page.js CHROMIUM URL DOM.html SHOT.png [TIMEOUT_SECONDS]
// Exit 0 when the exchange finished and both files are written; 1 on timeout or error.
"use strict";
const { spawn } = require("child_process");
const fs = require("fs");
const os = require("os");
const path = require("path");

const [chrome, url, domPath, shotPath, timeoutArg] = process.argv.slice(2);
if (!chrome || !url || !domPath || !shotPath) {
  console.error("usage: chat-page.js CHROMIUM URL DOM.html SHOT.png [TIMEOUT_SECONDS]");
  process.exit(2);
}
const timeoutMs = 1000 * (+timeoutArg || 120), deadline = Date.now() + timeoutMs;
const profile = fs.mkdtempSync(path.join(os.tmpdir(), "moe-chat-page-"));
const browser = spawn(chrome, ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                               "--remote-debugging-pipe", "--user-data-dir=" + profile, "about:blank"],
                      { stdio: ["ignore", "ignore", "inherit", "pipe", "pipe"] });
const toBrowser = browser.stdio[3], fromBrowser = browser.stdio[4];

let nextId = 1, inbox = "";
const waiting = new Map();
fromBrowser.on("data", chunk => {
  inbox += chunk.toString("utf8");
  let end;
  while ((end = inbox.indexOf("\0")) >= 0) {
    const msg = JSON.parse(inbox.slice(0, end));
    inbox = inbox.slice(end + 1);
    const w = msg.id && waiting.get(msg.id);
    if (!w) continue;
    waiting.delete(msg.id);
    msg.error ? w.reject(new Error(w.method + ": " + msg.error.message)) : w.resolve(msg.result);
  }
});

/* One DevTools command; resolves with its result. */
function send(method, params = {}, sessionId = undefined) {
  const id = nextId++;
  toBrowser.write(JSON.stringify({ id, method, params, sessionId }) + "\0");
  return new Promise((resolve, reject) => waiting.set(id, { resolve, reject, method }));
}

const sleep = ms => new Promise(r => setTimeout(r, ms));

async function main() {
  const { targetId } = await send("Target.createTarget", { url: "about:blank" });
  const { sessionId } = await send("Target.attachToTarget", { targetId, flatten: true });
  const page = (method, params) => send(method, params, sessionId);
  await page("Emulation.setDeviceMetricsOverride", { width: 900, height: 700, deviceScaleFactor: 1, mobile: false });
  await page("Page.navigate", { url });
  const value = async expr => (await page("Runtime.evaluate", { expression: expr, returnByValue: true })).result.value;
  while ((await value("document.body && document.body.dataset.exchanges")) !== "1") {
    if (Date.now() > deadline) throw new Error("the page did not finish its exchange in time");
    await sleep(200);
  }
  fs.writeFileSync(domPath, await value("document.documentElement.outerHTML"));
  const shot = await page("Page.captureScreenshot", { format: "png" });
  fs.writeFileSync(shotPath, Buffer.from(shot.data, "base64"));
}

setTimeout(() => { console.error("chat-page: Chromium did not answer in time"); browser.kill("SIGKILL"); process.exit(1); },
           timeoutMs + 15000).unref();
main().then(() => 0, e => { console.error("chat-page: " + e.message); return 1; }).then(async code => {
  send("Browser.close").catch(() => {});
  await sleep(500);
  browser.kill();
  fs.rmSync(profile, { recursive: true, force: true });
  process.exit(code);
});
