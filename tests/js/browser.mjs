#!/usr/bin/env node
// Drives Debian's Chromium (/usr/bin/chromium, never a downloaded browser) with
// playwright-core for tests/test_browser.py and tests/screenshots.py.
//
//   node browser.mjs [--executable /usr/bin/chromium]
//
// Reads one JSON command per line on stdin and answers each with one JSON line on stdout:
//   {"cmd": "open", "page": NAME, "url": URL}            a new tab named NAME
//   {"cmd": "goto", "page": NAME, "url": URL}
//   {"cmd": "wait", "page": NAME, "js": EXPR, "timeout_ms": N}   until EXPR is truthy
//   {"cmd": "eval", "page": NAME, "js": EXPR}             EXPR's value (JSON)
//   {"cmd": "type", "page": NAME, "selector": CSS, "text": TEXT}   then Enter
//   {"cmd": "screenshot", "page": NAME, "path": FILE, "full_page": BOOL}
//   {"cmd": "close"}
// Answers: {"ok": true, "value": ...} or {"ok": false, "error": "..."}; every answer
// carries "errors": the page errors and console errors seen since the previous answer.
// EXPR is a JavaScript expression evaluated in the page.

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

const { values } = parseArgs({
  options: { executable: { type: "string", default: "/usr/bin/chromium" } },
});

// The flags a sandboxed machine without a network needs (no calls home, no GPU).
const FLAGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

const profile = mkdtempSync(join(tmpdir(), "coordinator-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: values.executable,
  headless: true,
  args: FLAGS,
  viewport: { width: 1200, height: 820 },
});
const pages = new Map();
let errors = [];

function watch(name, page) {
  page.on("pageerror", (err) => errors.push(`${name}: ${err.message}`));
  page.on("console", (msg) => {
    if (msg.type() !== "error") return;
    // A failed load names its URL only in its location: keep it, so a test can tell whose.
    const where = msg.location() && msg.location().url ? ` (${msg.location().url})` : "";
    errors.push(`${name}: console: ${msg.text()}${where}`);
  });
}

function page(name) {
  const found = pages.get(name);
  if (!found) throw new Error(`no page named ${name}`);
  return found;
}

// Evaluate `js` every 100 ms until it is truthy. Not waitForFunction: its polling evals
// a string inside the page, which the pages' Content-Security-Policy (rightly) forbids.
async function poll(tab, js, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await tab.evaluate(js);
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`not true within ${timeoutMs} ms: ${js}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

async function run(command) {
  switch (command.cmd) {
    case "open": {
      const tab = await context.newPage();
      watch(command.page, tab);
      pages.set(command.page, tab);
      await tab.goto(command.url);
      return null;
    }
    case "goto":
      await page(command.page).goto(command.url);
      return null;
    case "wait":
      return await poll(page(command.page), command.js, command.timeout_ms ?? 20000);
    case "eval":
      return await page(command.page).evaluate(command.js);
    case "type": {
      const tab = page(command.page);
      await tab.fill(command.selector, command.text);
      await tab.press(command.selector, "Enter");
      return null;
    }
    case "screenshot":
      await page(command.page).screenshot({ path: command.path, fullPage: Boolean(command.full_page) });
      return command.path;
    default:
      throw new Error(`unknown command ${command.cmd}`);
  }
}

async function close() {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let answer;
  let command = {};
  try {
    command = JSON.parse(line);
    if (command.cmd === "close") break;
    answer = { ok: true, value: (await run(command)) ?? null };
  } catch (err) {
    answer = { ok: false, error: String(err && err.message ? err.message : err) };
  }
  answer.errors = errors;
  errors = [];
  process.stdout.write(JSON.stringify(answer) + "\n");
}
await close();
process.stdout.write(JSON.stringify({ ok: true, value: "closed", errors }) + "\n");
