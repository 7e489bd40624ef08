// agentcard-broker's dashboard: plain JS, no framework, nothing loaded from elsewhere.
// Every value the daemon sends is put in the page as text (textContent), never as HTML.
// Every change is a POST carrying the session's CSRF token from the page's meta tag.
"use strict";

const BASE = "/_broker/ui";
const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const state = { doc: null, pending: new Map(), requests: [], decisions: [], refresh: null };

// ------------------------------------------------------------------ helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function money(cents) {
  if (cents === null || cents === undefined) return "—";
  return "$" + (Number(cents) / 100).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
}

function clock(epoch) {
  return new Date(epoch * 1000).toLocaleTimeString([], { hour12: false });
}

function notice(text, bad) {
  const box = document.getElementById("notice");
  box.textContent = text;
  box.className = bad ? "notice bad" : "notice";
  box.hidden = !text;
}

async function api(method, path, body) {
  const init = { method, credentials: "same-origin", headers: {} };
  if (method !== "GET") {
    init.headers["X-CSRF-Token"] = CSRF;
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body || {});
  }
  const resp = await fetch(BASE + path, init);
  let doc = {};
  try { doc = await resp.json(); } catch (e) { doc = {}; }
  if (!resp.ok) {
    const message = (doc.error && doc.error.message) || `${resp.status} ${resp.statusText}`;
    throw new Error(message);
  }
  return doc;
}

// ------------------------------------------------------------------ WebAuthn (passkeys)

function fromB64url(text) {
  const b64 = text.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((text.length + 3) % 4);
  return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0)).buffer;
}

function toB64url(buffer) {
  let bin = "";
  for (const byte of new Uint8Array(buffer)) bin += String.fromCharCode(byte);
  return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function creationOptions(o) {
  return {
    ...o,
    challenge: fromB64url(o.challenge),
    user: { ...o.user, id: fromB64url(o.user.id) },
    excludeCredentials: (o.excludeCredentials || []).map((c) => ({ ...c, id: fromB64url(c.id) })),
  };
}

function requestOptions(o) {
  return {
    ...o,
    challenge: fromB64url(o.challenge),
    allowCredentials: (o.allowCredentials || []).map((c) => ({ ...c, id: fromB64url(c.id) })),
  };
}

function credentialJSON(cred) {
  const r = cred.response;
  const response = { clientDataJSON: toB64url(r.clientDataJSON) };
  if (r.attestationObject) {
    response.attestationObject = toB64url(r.attestationObject);
    if (r.getTransports) response.transports = r.getTransports();
  } else {
    response.authenticatorData = toB64url(r.authenticatorData);
    response.signature = toB64url(r.signature);
    if (r.userHandle) response.userHandle = toB64url(r.userHandle);
  }
  return {
    id: cred.id,
    rawId: toB64url(cred.rawId),
    type: cred.type,
    response,
    clientExtensionResults: cred.getClientExtensionResults(),
    authenticatorAttachment: cred.authenticatorAttachment || undefined,
  };
}

async function passkeyFor(purpose) {
  const options = await api("POST", "/api/passkey/authenticate/options", { for: purpose });
  const cred = await navigator.credentials.get({ publicKey: requestOptions(options) });
  await api("POST", "/api/passkey/authenticate/verify", { credential: credentialJSON(cred) });
}

async function registerPasskey() {
  try {
    if (state.doc && state.doc.passkeys > 0) await passkeyFor("register");
    const options = await api("POST", "/api/passkey/register/options");
    const cred = await navigator.credentials.create({ publicKey: creationOptions(options) });
    const done = await api("POST", "/api/passkey/register/verify", { credential: credentialJSON(cred) });
    notice(`Passkey registered (${done.passkeys} in all).`);
    await loadState();
  } catch (e) {
    notice(`Passkey not registered: ${e.message}`, true);
  }
}

// ------------------------------------------------------------------ approvals

async function decide(approval, approve) {
  const verb = approve ? "approve" : "deny";
  try {
    if (approve && approval.require_passkey) await passkeyFor(approval.id);
    await api("POST", `/api/approvals/${encodeURIComponent(approval.id)}/${verb}`);
    notice(`${approve ? "Approved" : "Denied"}: ${approval.method} ${approval.path}`);
  } catch (e) {
    notice(`Could not ${verb} ${approval.id}: ${e.message}`, true);
  }
  scheduleRefresh();
}

function approvalCard(a) {
  const left = Math.max(0, Math.round(a.expires_at - Date.now() / 1000));
  const perUser = a.user !== null && a.user !== undefined;
  const actions = perUser
    ? el("p", { class: "muted" }, `The end user ${a.user} (${a.client}) decides, through the link they were sent.`)
    : el("div", { class: "actions" },
        el("button", { type: "button", class: "approve", "data-action": "approve", onclick: () => decide(a, true) },
          a.require_passkey ? "Approve with passkey" : "Approve"),
        el("button", { type: "button", class: "deny", "data-action": "deny", onclick: () => decide(a, false) }, "Deny"));
  return el("article", { class: "card", "data-approval": a.id },
    el("div", { class: "card-head" },
      el("span", { class: "amount", "data-field": "amount" }, money(a.amount_cents)),
      el("span", { class: "call" }, el("b", {}, a.method), " ", a.path),
      el("span", { class: "muted expires", "data-expires": a.expires_at }, `${left}s left`)),
    el("dl", {},
      el("dt", {}, "Route"), el("dd", {}, a.route),
      a.tools.length ? el("dt", {}, "Tools") : null, a.tools.length ? el("dd", {}, a.tools.join(", ")) : null,
      el("dt", {}, "Why held"), el("dd", {}, a.reasons.join("; ") || "—"),
      el("dt", {}, "Id"), el("dd", {}, el("code", {}, a.id))),
    a.arguments ? el("pre", { class: "arguments" }, a.arguments) : null,
    actions);
}

function renderApprovals() {
  const list = [...state.pending.values()].sort((x, y) => x.created_at - y.created_at);
  document.getElementById("approvals").replaceChildren(...list.map(approvalCard));
  document.getElementById("pending-count").textContent = String(list.length);
  document.getElementById("no-approvals").hidden = list.length > 0;
  const rows = state.decisions.slice(0, 20).map((a) =>
    el("tr", { "data-decision": a.id },
      el("td", {}, clock(a.decided_at || a.expires_at)),
      el("td", {}, el("b", {}, a.method), " ", a.path, a.tools.length ? ` (${a.tools.join(", ")})` : ""),
      el("td", {}, money(a.amount_cents)),
      el("td", {}, el("span", { class: `badge ${a.state}` }, a.state)),
      el("td", {}, a.decided_by || "—")));
  document.querySelector("#decisions tbody").replaceChildren(...rows);
  document.getElementById("no-decisions").hidden = rows.length > 0;
  document.getElementById("decisions").hidden = rows.length === 0;
}

function tickExpiries() {
  for (const node of document.querySelectorAll("[data-expires]")) {
    const left = Math.max(0, Math.round(Number(node.dataset.expires) - Date.now() / 1000));
    node.textContent = `${left}s left`;
  }
}

// ------------------------------------------------------------------ routes

function budgetBar(budget) {
  if (!budget) return el("span", { class: "muted" }, "—");
  const used = budget.used === null || budget.used === undefined ? null : Number(budget.used);
  const total = Number(budget.amount_cents);
  const share = used === null || total <= 0 ? 0 : Math.min(1, used / total);
  const bar = el("div", { class: "bar", role: "meter", "aria-valuemin": 0, "aria-valuemax": total, "aria-valuenow": used ?? 0 },
    el("div", { class: share > 0.9 ? "fill high" : "fill" }));
  bar.firstChild.style.width = `${(share * 100).toFixed(1)}%`;
  const text = used === null
    ? `unknown of ${money(total)} per ${budget.per}`
    : `${money(used)} used, ${money(budget.left)} left of ${money(total)} per ${budget.per}${budget.each_user ? " (each user)" : ""}`;
  return el("div", { class: "budget" }, bar, el("span", { class: "muted" }, text));
}

async function startLogin(route, button) {
  button.disabled = true;
  try {
    const doc = await api("POST", `/api/login/${encodeURIComponent(route)}`);
    if (!/^https?:\/\//.test(doc.url)) throw new Error("the sign-in address is not a web page");
    const link = el("a", { href: doc.url, target: "_blank", rel: "noopener noreferrer" }, "open the sign-in page");
    const box = document.getElementById("notice");
    box.replaceChildren(`Sign in for route ${route}: `, link, " (opened in a new tab if your browser allowed it).");
    box.className = "notice";
    box.hidden = false;
    window.open(doc.url, "_blank", "noopener,noreferrer");
    watchLogin(route);
  } catch (e) {
    notice(`Login for ${route} did not start: ${e.message}`, true);
  } finally {
    button.disabled = false;
  }
}

function watchLogin(route) {
  // the daemon waits for the browser's return to its loopback callback: look until it is done
  const started = Date.now();
  const timer = setInterval(async () => {
    await loadState();
    const note = state.doc && state.doc.logins[route];
    if ((note && note.ok !== null) || Date.now() - started > 310000) clearInterval(timer);
  }, 1500);
}

function renderRoutes(doc) {
  const rows = doc.routes.map((r) => {
    const note = doc.logins[r.name];
    const oauth = r.auth === "oauth" && r.state !== "per_user";
    const login = oauth
      ? el("button", { type: "button", class: "quiet", "data-login": r.name, onclick: (ev) => startLogin(r.name, ev.target) },
          r.state === "ready" ? "Log in again" : "Log in")
      : null;
    const state = el("span", { class: `badge ${r.state || "unknown"}` }, r.state || "unknown");
    const details = [r.mode ? `${r.mode} mode` : null, r.users !== undefined && r.users !== null ? `${r.users} users` : null,
      r.expires_at ? `until ${new Date(r.expires_at).toLocaleString()}` : null, r.reason].filter(Boolean).join(" · ");
    return el("tr", { "data-route": r.name },
      el("td", {}, el("b", {}, r.name), el("div", { class: "muted" }, r.prefix)),
      el("td", { class: "muted" }, r.upstream),
      el("td", {}, r.auth),
      el("td", {}, state, details ? el("div", { class: "muted small" }, details) : null,
        note ? el("div", { class: note.ok === false ? "small bad" : "small" }, note.message) : null),
      el("td", {}, budgetBar(r.budget)),
      el("td", { class: "num" }, r.requests),
      el("td", {}, login));
  });
  document.querySelector("#routes tbody").replaceChildren(...rows);
}

// ------------------------------------------------------------------ requests

function requestRow(q) {
  const bad = q.status >= 400;
  return el("tr", { "data-request": q.id, class: bad ? "bad" : "" },
    el("td", {}, clock(q.at)),
    el("td", {}, q.route || "—"),
    el("td", {}, el("b", {}, q.method), " ", q.path),
    el("td", { class: "num" }, el("span", { class: bad ? "badge error" : "badge ok" }, q.status)),
    el("td", { class: "num" }, `${q.duration_ms} ms`),
    el("td", {}, q.error || ""),
    el("td", { class: "muted" }, q.user ? `${q.client} / ${q.user}` : ""));
}

function renderRequests() {
  const rows = state.requests.slice(0, 50).map(requestRow);
  document.querySelector("#requests tbody").replaceChildren(...rows);
  document.getElementById("no-requests").hidden = rows.length > 0;
  document.getElementById("requests").hidden = rows.length === 0;
}

// ------------------------------------------------------------------ state and events

function render() {
  const doc = state.doc;
  const up = Math.round(doc.uptime_s);
  document.getElementById("summary").textContent =
    `v${doc.version} · pid ${doc.pid} · ${doc.listen.join(", ")} · up ${up}s` + (doc.config.error ? " · config error" : "");
  renderRoutes(doc);
  renderApprovals();
  renderRequests();
  const count = doc.passkeys;
  document.getElementById("passkey-text").textContent = count === null
    ? "The secret store could not be read."
    : count === 0
      ? "No passkey yet. Routes with require_passkey: true need one to approve: register it here, once."
      : `${count} passkey${count === 1 ? "" : "s"} registered. Adding another asks for one you have.`;
  document.getElementById("passkey-register").textContent = count ? "Add another passkey" : "Register a passkey";
}

async function loadState() {
  try {
    const doc = await api("GET", "/api/state");
    state.doc = doc;
    state.pending = new Map(doc.approvals.pending.map((a) => [a.id, a]));
    state.decisions = doc.approvals.recent;
    state.requests = doc.requests;
    render();
  } catch (e) {
    notice(`The daemon did not answer: ${e.message}. Run \`agentcard-broker dashboard\` if the session ended.`, true);
  }
}

function scheduleRefresh() {
  if (state.refresh) return;
  state.refresh = setTimeout(() => { state.refresh = null; loadState(); }, 400);
}

function listen() {
  const live = document.getElementById("live");
  const source = new EventSource(BASE + "/api/events");
  source.addEventListener("open", () => { live.textContent = "live"; live.className = "live on"; });
  source.addEventListener("error", () => { live.textContent = "reconnecting"; live.className = "live off"; });
  source.addEventListener("request", (ev) => {
    const q = JSON.parse(ev.data).request;
    state.requests.unshift(q);
    state.requests.length = Math.min(state.requests.length, 50);
    renderRequests();
    scheduleRefresh(); // budgets and request counts moved
  });
  source.addEventListener("approval", (ev) => {
    const a = JSON.parse(ev.data).approval;
    if (a.state === "pending") state.pending.set(a.id, a);
    else {
      state.pending.delete(a.id);
      state.decisions = [a, ...state.decisions.filter((d) => d.id !== a.id)];
    }
    renderApprovals();
  });
}

document.getElementById("passkey-register").addEventListener("click", registerPasskey);
document.getElementById("logout").addEventListener("click", async () => {
  try { await api("POST", "/api/logout"); } catch (e) { /* the session is gone either way */ }
  window.location.reload();
});
loadState();
listen();
setInterval(tickExpiries, 1000);
setInterval(loadState, 10000);
