// What the chat and the dashboard share: the token and options from the URL fragment,
// REST calls with a bearer token, the list of node URLs to fail over to, and DOM helpers.
//
// The fragment (`#token=...&nodes=url1,url2&conversation=...`) never reaches a server.
// The token is kept in this tab's sessionStorage and removed from the address bar, so a
// copied URL does not carry it.
"use strict";

const Coordinator = (() => {
  const TOKEN_KEY = "coordinator.token";

  function fragment() {
    return new URLSearchParams(window.location.hash.replace(/^#/, ""));
  }

  // The token from the fragment (then kept and hidden) or from this tab's storage.
  function takeToken() {
    const params = fragment();
    const given = params.get("token");
    if (given) {
      sessionStorage.setItem(TOKEN_KEY, given);
      params.delete("token");
      const rest = params.toString();
      history.replaceState(null, "", window.location.pathname + (rest ? "#" + rest : ""));
      return given;
    }
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function keepToken(token) {
    sessionStorage.setItem(TOKEN_KEY, token);
  }

  function forgetToken() {
    sessionStorage.removeItem(TOKEN_KEY);
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // GET a REST path of one node; rejects with ApiError (status 0: unreachable).
  async function api(base, path, token, timeoutMs = 4000) {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), timeoutMs);
    let resp;
    try {
      resp = await fetch(base + path, {
        headers: { Authorization: "Bearer " + token },
        signal: abort.signal,
        cache: "no-store",
      });
    } catch (err) {
      throw new ApiError(0, `${base} is unreachable`);
    } finally {
      clearTimeout(timer);
    }
    let body = null;
    try {
      body = await resp.json();
    } catch (err) {
      body = null;
    }
    if (!resp.ok) {
      const why = body && body.error ? body.error : `HTTP ${resp.status}`;
      throw new ApiError(resp.status, why);
    }
    return body;
  }

  function cleanUrl(url) {
    try {
      const parsed = new URL(url);
      return parsed.origin;
    } catch (err) {
      return null;
    }
  }

  // Node URLs in the order to try them: the current one first. New ones are learnt from
  // GET /api/nodes (live nodes' advertised URLs) and kept: a node that is down now may
  // come back, and one that is gone for good costs one refused connection.
  class NodeList {
    constructor(initial) {
      this.urls = [];
      this.add(initial);
      this.index = 0;
    }

    add(urls) {
      for (const url of urls) {
        const clean = cleanUrl(url);
        if (clean && !this.urls.includes(clean)) this.urls.push(clean);
      }
    }

    get current() {
      return this.urls[this.index];
    }

    // Move on to the next URL (round robin).
    next() {
      this.index = (this.index + 1) % this.urls.length;
      return this.index;
    }

    // Learn the live nodes' URLs from whichever node answers first; the ids by URL.
    async refresh(token) {
      for (let i = 0; i < this.urls.length; i++) {
        const base = this.urls[(this.index + i) % this.urls.length];
        try {
          const body = await api(base, "/api/nodes", token, 2500);
          this.add(body.nodes.map((n) => n.url));
          return body;
        } catch (err) {
          if (err.status === 401) throw err;
        }
      }
      return null;
    }
  }

  // The starting node list: `#nodes=url1,url2` from the fragment, else this page's node.
  function initialNodes() {
    const given = (fragment().get("nodes") || "").split(",").filter(Boolean);
    return given.length ? given : [window.location.origin];
  }

  // An element with attributes and children (strings become text: nothing is parsed).
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name.startsWith("data-")) node.setAttribute(name, String(value));
      else if (name === "title" || name === "href" || name === "id") node.setAttribute(name, value);
      else node[name] = value;
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function ago(ms, now = Date.now()) {
    if (!ms) return "–";
    const s = Math.max(0, Math.round((now - ms) / 1000));
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    return `${Math.floor(s / 3600)} h ago`;
  }

  // The token form: shown when no token is known; calls `done(token, form)` on submit.
  function askToken(form, done) {
    form.hidden = false;
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const token = form.elements.token.value.trim();
      if (!token) return;
      keepToken(token);
      form.hidden = true;
      done(token, form);
    });
  }

  return { fragment, takeToken, keepToken, forgetToken, api, ApiError, NodeList, initialNodes, el, ago, askToken };
})();
