#!/usr/bin/env node
// A real socket.io JavaScript client against the coordinator (run by tests/test_js_client.py).
//
//   node client.mjs --url URL --conversation ID --token TOKEN
//        [--reconnect-url URL2] [--messages K] [--live-messages L] [--wait-stdin]
//        [--timeout-ms MS] [--await-close]
//
// Environment fallbacks: COORDINATOR_URL, COORDINATOR_RECONNECT_URL, CONVERSATION_ID,
// COORDINATOR_TOKEN, MESSAGES, LIVE_MESSAGES, TIMEOUT_MS.
//
// Phase 1: connect to URL (websocket transport only, token in the auth payload), send K
// messages as `oh_user_action` with acks, wait for each one's user event and agent echo,
// disconnect and print `DISCONNECTED {"last_event_id": N}`.
// With --wait-stdin it then waits for one line on stdin (JSON, optional fields
// `reconnect_url` and `expect_through`: the last event id produced while it was away),
// so the caller can make events happen meanwhile.
// Phase 2: reconnect to URL2 (default URL) with `latest_event_id=N`, wait for the missed
// events through `expect_through`, send L more messages and wait for their echoes.
// Every event must have the next id (no gap, no duplicate, replay before live).
// With --await-close it then prints `CLOSE_ME {"last_event_id": N}` and waits for the
// server to close the conversation: a closed notice, its status update, a disconnect.
//
// The last stdout line is a JSON summary; exit code 0 on success, 1 with a reason
// (`{"ok": false, "reason": ...}`) on failure, 2 on bad usage.

import { parseArgs } from "node:util";
import { createInterface } from "node:readline";
import { io } from "socket.io-client";

function usage(message) {
  process.stderr.write(`client.mjs: ${message}\n`);
  process.exit(2);
}

function options() {
  let parsed;
  try {
    parsed = parseArgs({
      options: {
        url: { type: "string" },
        "reconnect-url": { type: "string" },
        conversation: { type: "string" },
        token: { type: "string" },
        messages: { type: "string" },
        "live-messages": { type: "string" },
        "timeout-ms": { type: "string" },
        "wait-stdin": { type: "boolean", default: false },
        "await-close": { type: "boolean", default: false },
      },
      strict: true,
    }).values;
  } catch (err) {
    usage(err.message);
  }
  const env = process.env;
  const opts = {
    url: parsed.url ?? env.COORDINATOR_URL,
    reconnectUrl: parsed["reconnect-url"] ?? env.COORDINATOR_RECONNECT_URL,
    conversation: parsed.conversation ?? env.CONVERSATION_ID,
    token: parsed.token ?? env.COORDINATOR_TOKEN,
    messages: Number(parsed.messages ?? env.MESSAGES ?? 5),
    liveMessages: Number(parsed["live-messages"] ?? env.LIVE_MESSAGES ?? 3),
    timeoutMs: Number(parsed["timeout-ms"] ?? env.TIMEOUT_MS ?? 20000),
    waitStdin: parsed["wait-stdin"],
    awaitClose: parsed["await-close"],
  };
  for (const name of ["url", "conversation", "token"]) {
    if (!opts[name]) usage(`--${name} is required`);
  }
  for (const name of ["messages", "liveMessages", "timeoutMs"]) {
    if (!Number.isInteger(opts[name]) || opts[name] < 0) usage(`${name} must be an integer >= 0`);
  }
  opts.reconnectUrl ??= opts.url;
  return opts;
}

class Failure extends Error {}

function check(condition, reason) {
  if (!condition) throw new Failure(reason);
}

// OpenHands' web client guards, written from its documented event shape: an `oh_event`
// is kept only if it has `id`, `source`, `message` and `timestamp`; actions have a string
// `action` (and `args`), observations a string `observation` (and `content`, `extras`);
// user and agent messages are `source` "user"/"agent" with `action: "message"`. A status
// update is `{status_update: true, type: "info"|"error", id: CODE, message}`.
const isOpenHandsEvent = (e) =>
  typeof e === "object" && e !== null && "id" in e && "source" in e && "message" in e && "timestamp" in e;
const isOpenHandsAction = (e) => isOpenHandsEvent(e) && typeof e.action === "string";
const isOpenHandsObservation = (e) => isOpenHandsEvent(e) && typeof e.observation === "string";
const isUserMessage = (e) => isOpenHandsAction(e) && e.source === "user" && e.action === "message";
const isAssistantMessage = (e) => isOpenHandsAction(e) && e.source === "agent" && e.action === "message";
const isStatusUpdate = (e) =>
  typeof e === "object" && e !== null && e.status_update === true &&
  (e.type === "info" || e.type === "error") && typeof e.id === "string" && typeof e.message === "string";

// Why `event` fails OpenHands' guards, or null.
function shapeProblem(event) {
  if (event && event.status_update !== undefined) return isStatusUpdate(event) ? null : "a malformed status update";
  if (!isOpenHandsEvent(event)) return "not an OpenHands event (id, source, message, timestamp)";
  if (!Number.isInteger(event.id)) return "an id that is not an integer";
  if (typeof event.message !== "string") return "a message that is not a string";
  if (isOpenHandsAction(event)) {
    if (typeof event.args !== "object" || event.args === null) return "an action without args";
    if (event.action === "message" && !(isUserMessage(event) || isAssistantMessage(event))) {
      return "a message action from neither user nor agent";
    }
    if (isUserMessage(event) || isAssistantMessage(event)) {
      if (typeof event.args.content !== "string") return "a message without content";
    }
    return null;
  }
  if (isOpenHandsObservation(event)) {
    if (typeof event.content !== "string") return "an observation without string content";
    if (typeof event.extras !== "object" || event.extras === null) return "an observation without extras";
    if (event.observation === "agent_state_changed" && typeof event.extras.agent_state !== "string") {
      return "a state change without extras.agent_state";
    }
    return null;
  }
  return "neither an action nor an observation";
}

// The fields a summary keeps of an event.
function brief(event) {
  return {
    id: event.id,
    source: event.source ?? null,
    action: event.action ?? event.observation ?? null,
    content: event.args?.content ?? null,
  };
}

// One socket.io connection that records every `oh_event` in arrival order.
class Session {
  constructor(url, query, token, timeoutMs) {
    this.url = url;
    this.timeoutMs = timeoutMs;
    this.events = [];
    this.updates = [];
    // OpenHands' client starts at "loading", its input disabled, and follows the logged
    // agent_state_changed observations.
    this.agentState = "loading";
    this.badShapes = [];
    this.waiters = new Set();
    this.dropped = null;
    this.socket = io(url, {
      transports: ["websocket"],
      query,
      auth: { token },
      reconnection: false,
      autoConnect: false,
      forceNew: true,
      timeout: timeoutMs,
    });
    // Registered before connecting, so replayed events sent right after the handshake
    // are not missed.
    // Every event is checked against OpenHands' guards; status updates (no event id)
    // are kept apart from the logged events.
    this.socket.on("oh_event", (event) => {
      const problem = shapeProblem(event);
      if (problem) this.badShapes.push(`${problem}: ${JSON.stringify(event)}`);
      if (event && event.status_update === true) this.updates.push(event);
      else this.events.push(event);
      if (event?.observation === "agent_state_changed") this.agentState = event.extras?.agent_state;
      this.wake();
    });
    this.socket.on("disconnect", (reason) => {
      if (reason !== "io client disconnect") this.dropped = reason;
      this.wake();
    });
  }

  connect() {
    return new Promise((resolve, reject) => {
      this.socket.once("connect", () => resolve(this));
      this.socket.once("connect_error", (err) => {
        const detail = err.data ? ` ${JSON.stringify(err.data)}` : "";
        reject(new Failure(`connect_error from ${this.url}: ${err.message}${detail}`));
      });
      this.socket.connect();
    });
  }

  wake() {
    for (const waiter of this.waiters) waiter();
  }

  // Resolve once predicate() holds; fail after the timeout or if the server dropped us.
  waitFor(predicate, what) {
    return new Promise((resolve, reject) => {
      let timer = null;
      const waiter = () => {
        if (predicate()) {
          this.waiters.delete(waiter);
          clearTimeout(timer);
          resolve();
        } else if (this.dropped) {
          this.waiters.delete(waiter);
          clearTimeout(timer);
          reject(new Failure(`server disconnected (${this.dropped}) while waiting for ${what}`));
        }
      };
      timer = setTimeout(() => {
        this.waiters.delete(waiter);
        const ids = this.events.map((e) => e.id);
        reject(new Failure(`timed out after ${this.timeoutMs} ms waiting for ${what}; ids seen: ${JSON.stringify(ids)}`));
      }, this.timeoutMs);
      this.waiters.add(waiter);
      waiter();
    });
  }

  // Send messages one by one, each acknowledged; returns the acked event ids.
  async send(contents) {
    const ids = [];
    for (const content of contents) {
      let ack;
      try {
        ack = await this.socket
          .timeout(this.timeoutMs)
          .emitWithAck("oh_user_action", { action: "message", args: { content } });
      } catch (err) {
        throw new Failure(`no ack for ${JSON.stringify(content)}: ${err.message}`);
      }
      check(ack && ack.ok === true && Number.isInteger(ack.id), `action ${JSON.stringify(content)} was not accepted: ack ${JSON.stringify(ack)}`);
      ids.push(ack.id);
    }
    return ids;
  }

  // Every sent message has its user event (under the acked id) and an agent echo.
  answered(contents, ackIds) {
    const byId = new Map(this.events.map((e) => [e.id, e]));
    const echoed = new Set(
      this.events.filter((e) => e.source === "agent" && e.action === "message").map((e) => e.args?.content),
    );
    return contents.every((content, i) => {
      const user = byId.get(ackIds[i]);
      return user && user.source === "user" && user.args?.content === content && echoed.has(content);
    });
  }

  // Resolve once the server disconnected us (after a status update); fail after the timeout.
  waitClosed() {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters.delete(waiter);
        reject(new Failure(`not closed by the server within ${this.timeoutMs} ms`));
      }, this.timeoutMs);
      const waiter = () => {
        if (this.dropped && this.updates.length > 0) {
          this.waiters.delete(waiter);
          clearTimeout(timer);
          resolve();
        }
      };
      this.waiters.add(waiter);
      waiter();
    });
  }

  close() {
    this.socket.disconnect();
  }
}

// Ids must go up by exactly one from `first` (when given) with no duplicate.
function checkContiguous(events, first, where) {
  const ids = events.map((e) => e.id);
  check(ids.every((id) => Number.isInteger(id)), `${where}: an event without an integer id: ${JSON.stringify(ids)}`);
  check(new Set(ids).size === ids.length, `${where}: duplicate event ids: ${JSON.stringify(ids)}`);
  ids.forEach((id, i) => {
    const expected = (first ?? ids[0]) + i;
    check(id === expected, `${where}: expected event id ${expected} at position ${i}, got ${id}: ${JSON.stringify(ids)}`);
  });
}

function readLine(timeoutMs) {
  return new Promise((resolve, reject) => {
    const rl = createInterface({ input: process.stdin });
    const timer = setTimeout(() => {
      rl.close();
      reject(new Failure(`no line on stdin within ${timeoutMs} ms`));
    }, timeoutMs);
    rl.once("line", (line) => {
      clearTimeout(timer);
      resolve(line); // before close(), whose "close" event would resolve with ""
      rl.close();
    });
    rl.once("close", () => {
      clearTimeout(timer);
      resolve("");
    });
  });
}

async function run(opts, summary) {
  const { conversation, token, timeoutMs } = opts;

  // Phase 1: connect, send, wait for the echoes, disconnect.
  const first = new Session(opts.url, { conversation_id: conversation }, token, timeoutMs);
  summary.phase1 = { url: opts.url, sent: [], ack_ids: [], events: first.events };
  await first.connect();
  await first.waitFor(() => first.agentState !== "loading", "a state that enables OpenHands' input");
  summary.phase1.input_enabled_by = first.agentState;
  const contents1 = Array.from({ length: opts.messages }, (_, i) => `js-${conversation}-a${i}`);
  summary.phase1.sent = contents1;
  summary.phase1.ack_ids = await first.send(contents1);
  await first.waitFor(() => first.answered(contents1, summary.phase1.ack_ids), "the echoes of phase 1");
  await first.waitFor(() => first.agentState === "awaiting_user_input", "the agent awaiting input again");
  summary.phase1.states = first.events.filter((e) => e.observation === "agent_state_changed").map((e) => e.extras.agent_state);
  first.close();
  check(first.events.length > 0, "phase 1 received no event");
  checkContiguous(first.events, null, "phase 1");
  const lastId = first.events[first.events.length - 1].id;
  summary.last_event_id = lastId;
  process.stdout.write(`DISCONNECTED ${JSON.stringify({ last_event_id: lastId })}\n`);

  // The caller makes events happen while we are away, then tells us to go on.
  let expectThrough = null;
  let reconnectUrl = opts.reconnectUrl;
  if (opts.waitStdin) {
    const line = (await readLine(Math.max(timeoutMs, 60000))).trim();
    if (line) {
      let go;
      try {
        go = JSON.parse(line);
      } catch {
        throw new Failure(`stdin line is not JSON: ${line}`);
      }
      expectThrough = go.expect_through ?? null;
      reconnectUrl = go.reconnect_url ?? reconnectUrl;
    }
  }

  // Phase 2: reconnect (maybe elsewhere) with latest_event_id: replay, then live.
  const second = new Session(reconnectUrl, { conversation_id: conversation, latest_event_id: String(lastId) }, token, timeoutMs);
  summary.phase2 = { url: reconnectUrl, latest_event_id: lastId, expect_through: expectThrough, sent: [], ack_ids: [], events: second.events };
  await second.connect();
  if (expectThrough !== null) {
    check(Number.isInteger(expectThrough) && expectThrough >= lastId, `bad expect_through ${expectThrough}`);
    if (expectThrough > lastId) {
      await second.waitFor(
        () => second.events.some((e) => e.id >= expectThrough),
        `the replay of events ${lastId + 1}..${expectThrough}`,
      );
    }
    const replayed = second.events.filter((e) => e.id <= expectThrough);
    checkContiguous(replayed, lastId + 1, "replay");
    check(replayed.length === expectThrough - lastId, `replay: expected ${expectThrough - lastId} events, got ${replayed.length}`);
    summary.phase2.replayed = replayed.length;
  }
  const contents2 = Array.from({ length: opts.liveMessages }, (_, i) => `js-${conversation}-b${i}`);
  summary.phase2.sent = contents2;
  summary.phase2.ack_ids = await second.send(contents2);
  await second.waitFor(() => second.answered(contents2, summary.phase2.ack_ids), "the echoes of phase 2");
  if (opts.awaitClose) {
    const last = second.events[second.events.length - 1].id;
    process.stdout.write(`CLOSE_ME ${JSON.stringify({ last_event_id: last })}\n`);
    await second.waitClosed();
    const closed = second.updates.find((u) => u.id === "STATUS$CONVERSATION_CLOSED");
    check(closed && closed.type === "info", `no closed status update: ${JSON.stringify(second.updates)}`);
    const notice = second.events[second.events.length - 1];
    check(
      isOpenHandsObservation(notice) && notice.observation === "agent_state_changed" && notice.extras.agent_state === "stopped",
      `the last event is not the closed notice: ${JSON.stringify(notice)}`,
    );
    summary.phase2.updates = second.updates;
  }
  second.close();
  checkContiguous(second.events, lastId + 1, "phase 2 (replay then live)");
  for (const session of [first, second]) {
    check(session.badShapes.length === 0, `events OpenHands' client would drop: ${session.badShapes.join("; ")}`);
  }
  summary.checked_shapes = first.events.length + second.events.length + first.updates.length + second.updates.length;
  for (const id of summary.phase2.ack_ids) {
    check(expectThrough === null || id > expectThrough, `live action got id ${id}, not after the replayed ${expectThrough}`);
  }
}

async function main() {
  const opts = options();
  const summary = { ok: false, conversation_id: opts.conversation };
  let code = 0;
  try {
    await run(opts, summary);
    summary.ok = true;
  } catch (err) {
    summary.reason = err instanceof Failure ? err.message : `unexpected error: ${err?.stack ?? err}`;
    process.stderr.write(`client.mjs: FAILED: ${summary.reason}\n`);
    code = 1;
  }
  for (const phase of [summary.phase1, summary.phase2]) {
    if (phase) phase.events = phase.events.map(brief);
  }
  process.stdout.write(`${JSON.stringify(summary)}\n`, () => process.exit(code));
}

main();
