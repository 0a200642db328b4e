// The browser chat: one socket.io connection (websocket transport) to one node at a time.
//
// Every event is shown with its id and source. When the node goes away (killed, drained,
// unreachable) the page connects to the next node it knows with latest_event_id = the
// last id it saw, so the server replays exactly what was missed: no gap, no duplicate.
// A message not acknowledged yet is sent again after the reconnection with the same
// client_action_id, which the server recognises (it is logged once).
"use strict";

(() => {
  const C = Coordinator;
  const $ = (id) => document.getElementById(id);
  const OWNER_POLL_MS = 2000;
  const NODES_POLL_MS = 5000;
  const ACK_TIMEOUT_MS = 10000;

  const chat = {
    token: null,
    conversation: null,
    settings: null,
    nodes: new C.NodeList(C.initialNodes()),
    socket: null,
    lastId: -1,
    nodeId: "",
    failures: 0, // consecutive failed connections, for the back-off
    duplicates: 0, // events received twice (never expected; shown for tests)
    gaps: 0, // ids skipped (never expected)
    pending: new Map(), // client_action_id -> action, until acknowledged
    stopped: false,
  };

  function status(text, kind) {
    const node = $("conn-state");
    node.textContent = text;
    node.dataset.state = kind;
  }

  function showError(text) {
    const node = $("error");
    node.textContent = text;
    node.hidden = !text;
  }

  // What a row shows of an event (OpenHands' shape): a message's text, a state change's
  // message and state, an observation's content.
  function contentOf(event) {
    const args = event.args;
    if (event.observation === "agent_state_changed") {
      const state = event.extras?.agent_state;
      return `${event.message ?? ""}${state ? ` (agent ${state})` : ""}`;
    }
    if (args && typeof args === "object" && typeof args.content === "string") return args.content;
    if (typeof event.observation === "string") return String(event.content || event.message || event.observation);
    return String(event.message ?? JSON.stringify(args ?? {}));
  }

  // A transient status update ({status_update, type, id: CODE, message}): shown, not counted.
  function onStatusUpdate(update) {
    const row = C.el(
      "li",
      { class: `status-update ${update.type === "error" ? "error" : "info"}`, "data-code": String(update.id ?? "") },
      C.el("span", { class: "source" }, "status"),
      C.el("span", { class: "content" }, `${update.message ?? ""} [${update.id ?? ""}]`),
    );
    $("events").append(row);
  }

  function counters() {
    const list = $("events");
    list.dataset.lastId = String(chat.lastId);
    list.dataset.duplicates = String(chat.duplicates);
    list.dataset.gaps = String(chat.gaps);
  }

  // One event, received through the node at `via` (its URL).
  function onEvent(event, via) {
    if (event && event.status_update === true) return onStatusUpdate(event);
    if (!event || typeof event.id !== "number") return;
    if (event.id <= chat.lastId) {
      chat.duplicates += 1;
      counters();
      return;
    }
    if (chat.lastId >= 0 && event.id !== chat.lastId + 1) chat.gaps += 1;
    chat.lastId = event.id;
    const source = String(event.source ?? "?");
    const row = C.el(
      "li",
      { class: `event source-${source}`, "data-id": event.id, "data-source": source, "data-via": via, title: `received through ${via}` },
      C.el("span", { class: "id" }, `#${event.id}`),
      C.el("span", { class: "source" }, source),
      C.el("span", { class: "content" }, contentOf(event)),
    );
    const list = $("events");
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    list.append(row);
    if (atBottom) list.scrollTop = list.scrollHeight;
    counters();
  }

  async function describe() {
    const base = chat.nodes.current;
    try {
      const nodes = await chat.nodes.refresh(chat.token);
      if (nodes && base === chat.nodes.current) {
        chat.nodeId = nodes.node_id;
        $("node").textContent = `${nodes.node_id} (${base})`;
        $("node").dataset.nodeId = nodes.node_id;
        $("known-nodes").textContent = chat.nodes.urls.join(", ");
      }
    } catch (err) {
      if (err.status === 401) return fatal(`authentication failed: ${err.message}`);
    }
    await describeOwner();
  }

  async function describeOwner() {
    const base = chat.nodes.current;
    if (!chat.socket || !chat.socket.connected) return;
    try {
      const conv = await C.api(base, `/api/conversations/${encodeURIComponent(chat.conversation)}`, chat.token);
      const owner = conv.owner || "";
      const node = $("owner");
      node.textContent = owner ? owner + (owner === chat.nodeId ? " (this node)" : "") : "none right now";
      node.dataset.owner = owner;
      $("agent-state").textContent = conv.state || "–";
    } catch (err) {
      // The next poll tries again; a lost node is noticed by the socket.
    }
  }

  function fatal(text) {
    chat.stopped = true;
    status("stopped", "error");
    showError(text);
    if (chat.socket) chat.socket.close();
  }

  function connect() {
    if (chat.stopped) return;
    const url = chat.nodes.current;
    status(`connecting to ${url}`, "connecting");
    const auth = { token: chat.token };
    if (chat.settings) auth.settings = chat.settings;
    const socket = io(url, {
      transports: ["websocket"],
      query: { conversation_id: chat.conversation, latest_event_id: String(chat.lastId) },
      auth,
      reconnection: false,
      forceNew: true,
      timeout: 5000,
    });
    chat.socket = socket;
    socket.on("oh_event", (event) => onEvent(event, url));
    socket.on("connect", () => {
      chat.failures = 0;
      status("connected", "connected");
      showError("");
      describe();
      resend();
    });
    socket.on("connect_error", (err) => {
      const why = String(err && err.message ? err.message : err);
      if (why.startsWith("authentication failed") || why.startsWith("forbidden")) return fatal(why);
      moveOn(`${url}: ${why}`);
    });
    socket.on("disconnect", (reason) => {
      if (reason === "io client disconnect") return;
      moveOn(`${url}: ${reason}`);
    });
  }

  // The node went away or refused: try the next one, backing off once all were tried.
  function moveOn(why) {
    if (chat.stopped || !chat.socket) return;
    const old = chat.socket;
    chat.socket = null;
    old.off();
    old.close();
    chat.failures += 1;
    chat.nodes.next();
    const round = Math.floor((chat.failures - 1) / Math.max(1, chat.nodes.urls.length));
    const delay = chat.failures <= chat.nodes.urls.length ? 200 : Math.min(5000, 500 * 2 ** round);
    status(`reconnecting (${why})`, "reconnecting");
    setTimeout(connect, delay);
  }

  function send(action, clientActionId) {
    const socket = chat.socket;
    if (!socket || !socket.connected) return; // sent again once connected
    socket.timeout(ACK_TIMEOUT_MS).emit("oh_user_action", { ...action, client_action_id: clientActionId }, (err, ack) => {
      if (err) return; // no answer: kept, sent again after the next connection
      if (ack && ack.ok) {
        chat.pending.delete(clientActionId);
      } else {
        chat.pending.delete(clientActionId);
        showError(`not sent: ${ack && ack.error ? ack.error : "refused"}`);
      }
      $("pending").textContent = String(chat.pending.size);
    });
  }

  function resend() {
    for (const [clientActionId, action] of chat.pending) send(action, clientActionId);
  }

  function onSubmit(ev) {
    ev.preventDefault();
    const input = $("message");
    const text = input.value;
    if (!text.trim()) return;
    input.value = "";
    const clientActionId = crypto.randomUUID().replace(/-/g, "");
    const action = { action: "message", args: { content: text } };
    chat.pending.set(clientActionId, action);
    $("pending").textContent = String(chat.pending.size);
    send(action, clientActionId);
  }

  function start(token, form) {
    chat.token = token;
    const params = C.fragment();
    const typed = form ? form.elements.conversation.value.trim() : "";
    chat.conversation = params.get("conversation") || typed || "web-" + crypto.randomUUID().slice(0, 8);
    const settings = params.get("settings");
    if (settings) {
      try {
        chat.settings = JSON.parse(settings);
      } catch (err) {
        return fatal("the settings in the URL are not JSON");
      }
    }
    $("conversation").textContent = chat.conversation;
    $("chat").hidden = false;
    $("send-form").addEventListener("submit", onSubmit);
    $("dashboard-link").href = "dashboard.html#nodes=" + encodeURIComponent(chat.nodes.urls.join(","));
    counters();
    connect();
    setInterval(describeOwner, OWNER_POLL_MS);
    setInterval(() => chat.socket && chat.socket.connected && chat.nodes.refresh(chat.token).catch(() => {}), NODES_POLL_MS);
  }

  window.coordinatorChat = chat; // for the console and the browser test
  const token = C.takeToken();
  if (token) start(token);
  else C.askToken($("token-form"), start);
})();
