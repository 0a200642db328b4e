// The cluster dashboard: GET /api/dashboard every POLL_MS from one node, moving to the
// next known node when it does not answer. Shows the nodes (live or lost; loops,
// connections, lease age) and the caller's conversations (all of them for an admin).
"use strict";

(() => {
  const C = Coordinator;
  const $ = (id) => document.getElementById(id);
  const POLL_MS = 1500;

  const board = { token: null, nodes: new C.NodeList(C.initialNodes()), timer: null };

  function seconds(value) {
    return value === null || value === undefined ? "–" : `${value.toFixed(1)} s`;
  }

  function nodeRow(node, servedBy) {
    const loops = node.loops.length ? node.loops.join(", ") : "";
    const name = C.el("td", { class: "id" }, node.node_id, node.node_id === servedBy ? C.el("span", { class: "tag" }, "serving this page") : null);
    const url = node.url ? C.el("a", { href: node.url + "/ui/" }, node.url) : "–";
    return C.el(
      "tr",
      { class: `node ${node.status}`, "data-node-id": node.node_id, "data-status": node.status },
      name,
      C.el("td", {}, C.el("span", { class: `badge ${node.status}` }, node.status)),
      C.el("td", {}, url),
      C.el("td", { class: "num", title: loops }, node.loop_count),
      C.el("td", { class: "num" }, node.live ? node.connections : "–"),
      C.el("td", { class: "num" }, seconds(node.lease_age)),
      C.el("td", { class: "num" }, seconds(node.lease_left)),
      C.el("td", {}, node.last_seen ? C.ago(node.last_seen * 1000) : "–"),
    );
  }

  function conversationRow(conv, admin, now) {
    const watchers = Object.entries(conv.connections).map(([node, n]) => `${node}: ${n}`).join(", ");
    const link = `chat.html#conversation=${encodeURIComponent(conv.conversation_id)}&nodes=${encodeURIComponent(board.nodes.urls.join(","))}`;
    return C.el(
      "tr",
      { class: "conversation", "data-conversation-id": conv.conversation_id, "data-owner": conv.owner, "data-state": conv.state },
      C.el("td", { class: "id" }, C.el("a", { href: link }, conv.conversation_id)),
      admin ? C.el("td", {}, conv.user) : null,
      C.el("td", {}, conv.owner || C.el("span", { class: "muted" }, "not running")),
      C.el("td", { class: "num" }, conv.epoch),
      C.el("td", {}, C.el("span", { class: `state state-${conv.state}` }, conv.state || "–")),
      C.el("td", { class: "num" }, conv.events),
      C.el("td", { class: "num" }, conv.applied),
      C.el("td", { class: `num${conv.inbox ? " busy" : ""}` }, conv.inbox),
      C.el("td", {}, watchers || "–"),
      C.el("td", {}, C.ago(conv.last_active || conv.created, now)),
    );
  }

  function render(view) {
    $("board").hidden = false;
    $("whoami").textContent = view.user + (view.admin ? " (admin: the whole cluster)" : "");
    $("whoami").dataset.admin = String(view.admin);
    $("served-by").textContent = `${view.node_id} (${board.nodes.current})`;
    $("served-by").dataset.nodeId = view.node_id;
    $("updated").textContent = new Date(view.time * 1000).toLocaleTimeString();
    const live = view.nodes.filter((n) => n.live).length;
    $("node-summary").textContent = `${live} live, ${view.nodes.length - live} lost`;
    $("nodes-body").replaceChildren(...view.nodes.map((n) => nodeRow(n, view.node_id)));
    $("user-col").hidden = !view.admin;
    const now = view.time * 1000;
    const rows = view.conversations.map((c) => conversationRow(c, view.admin, now));
    $("conversations-body").replaceChildren(...rows);
    $("conversation-summary").textContent = `${view.conversations.length} shown`;
    $("conversations-empty").hidden = rows.length > 0;
    board.nodes.add(view.nodes.filter((n) => n.live && n.url).map((n) => n.url));
  }

  async function poll() {
    const tries = board.nodes.urls.length;
    for (let i = 0; i < tries; i++) {
      const base = board.nodes.current;
      try {
        render(await C.api(base, "/api/dashboard", board.token));
        $("error").hidden = true;
        $("board").dataset.state = "fresh";
        return;
      } catch (err) {
        if (err.status === 401) {
          C.forgetToken();
          $("error").textContent = `authentication failed: ${err.message} (reload to give another token)`;
          $("error").hidden = false;
          clearInterval(board.timer);
          return;
        }
        $("error").textContent = `${base}: ${err.message}; trying another node`;
        $("error").hidden = false;
        board.nodes.next();
      }
    }
    $("board").dataset.state = "stale";
  }

  function start(token) {
    board.token = token;
    $("chat-link").href = "chat.html#nodes=" + encodeURIComponent(board.nodes.urls.join(","));
    poll();
    board.timer = setInterval(poll, POLL_MS);
  }

  window.coordinatorDashboard = board; // for the console and the browser test
  const token = C.takeToken();
  if (token) start(token);
  else C.askToken($("token-form"), start);
})();
