// attune-sse web UI: a live table of executions fed by one EventSource per tab.
//
// The table loads the newest executions once (GET /api/v1/executions), then
// follows /api/v1/executions/stream. The detail view reuses the tab's one
// stream slot: it reopens it with execution_id, and going back resumes the
// table's stream from the last event the table applied (?last_event_id=), so
// nothing is missed either way. The browser's own reconnection sends
// Last-Event-ID; a reconnect we make ourselves (new token, view change) passes
// ?last_event_id=. Updates are applied once per animation frame.
"use strict";

const STATUSES = ["requested", "scheduling", "scheduled", "running", "completed",
                  "failed", "canceling", "cancelled", "timeout", "abandoned"];
const TERMINAL = new Set(["completed", "failed", "cancelled", "timeout", "abandoned"]);
const LARGE_RESULT = 10 * 1024;   // results bigger than this start collapsed
const REFRESH_MARGIN_S = 60;      // refresh the access token this long before it expires
const PAGE = 500;
const INITIAL_ROWS = 1000;

const $ = (id) => document.getElementById(id);
const state = {
  access: sessionStorage.getItem("attune.access"),
  refresh: sessionStorage.getItem("attune.refresh"),
  login: sessionStorage.getItem("attune.login"),
  rows: new Map(),          // execution id -> {data, tr}
  pending: new Map(),       // execution id -> latest data, applied on the next frame
  tableLastId: null,        // last event id the table applied (its resume point)
  lastId: null,             // last event id received on the current stream
  source: null,             // the tab's one EventSource
  view: "login",
  detailId: null,
  refreshTimer: null,
  retryTimer: null,
  retryDelay: 1000,
  frame: null,
  received: 0,              // events received since the page loaded (shown to tests via attuneState)
  recentIds: [],            // the last event ids received, newest last (bounded)
};
window.attuneState = state;  // for the browser tests and the curious

// -- API ----------------------------------------------------------------------

async function api(path, options = {}) {
  const headers = {"Content-Type": "application/json", ...(options.headers || {})};
  if (state.access && !options.noAuth) headers.Authorization = `Bearer ${state.access}`;
  const response = await fetch(path, {...options, headers});
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.error || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

function saveTokens(data) {
  state.access = data.access_token;
  if (data.refresh_token) state.refresh = data.refresh_token;
  sessionStorage.setItem("attune.access", state.access);
  if (state.refresh) sessionStorage.setItem("attune.refresh", state.refresh);
  scheduleRefresh();
}

function tokenExpiry(token) {
  try {
    const payload = JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
    return payload.exp;
  } catch (e) {
    return null;
  }
}

function scheduleRefresh() {
  clearTimeout(state.refreshTimer);
  const exp = tokenExpiry(state.access);
  if (!exp) return;
  const delay = Math.max(5, exp - Date.now() / 1000 - REFRESH_MARGIN_S) * 1000;
  state.refreshTimer = setTimeout(() => refreshToken().then(reconnect, logout), delay);
}

async function refreshToken() {
  if (!state.refresh) throw new Error("no refresh token");
  const body = await api("/auth/refresh", {
    method: "POST", noAuth: true, headers: {Authorization: `Bearer ${state.refresh}`},
  });
  saveTokens(body.data);
}

// -- the stream ---------------------------------------------------------------

function setConnection(status) {
  const el = $("connection");
  el.textContent = status;
  el.className = `conn ${status}`;
  el.dataset.status = status;
}

function streamUrl(resumeFrom) {
  const params = new URLSearchParams({token: state.access});
  if (state.view === "detail") params.set("execution_id", state.detailId);
  if (resumeFrom !== null && resumeFrom !== undefined) params.set("last_event_id", resumeFrom);
  return `/api/v1/executions/stream?${params}`;
}

function connect(resumeFrom) {
  if (state.source) state.source.close();
  clearTimeout(state.retryTimer);
  const source = new EventSource(streamUrl(resumeFrom));
  state.source = source;
  setConnection("reconnecting");  // until onopen
  source.onopen = () => {
    state.retryDelay = 1000;
    setConnection("live");
  };
  source.onmessage = (message) => onEvent(message);
  source.addEventListener("reset", () => loadTable());  // history has a hole: reload what we show
  source.addEventListener("signed_out", () => {
    // The server ended the stream: this identity was frozen or deleted.
    logout("Signed out: this identity was frozen or deleted.");
  });
  source.addEventListener("token_expired", () => {
    // The server ends the stream when the token it was opened with expires.
    refreshToken().then(reconnect, logout);
  });
  source.onerror = () => {
    if (source !== state.source) return;
    if (source.readyState === EventSource.CONNECTING) {
      setConnection("reconnecting");   // the browser retries by itself, with Last-Event-ID
      return;
    }
    // Closed for good (an HTTP error such as 401 or 503): retry ourselves, from where we were.
    setConnection(navigator.onLine ? "reconnecting" : "offline");
    state.retryTimer = setTimeout(() => refreshToken().then(reconnect, reconnect), state.retryDelay);
    state.retryDelay = Math.min(state.retryDelay * 2, 30000);
  };
}

function resumePoint() {
  return state.view === "detail" ? state.lastId : state.tableLastId;
}

function reconnect() {
  const from = resumePoint();
  connect(from);
  // No event applied yet, so nothing to resume from: read the table again instead.
  if ((from === null || from === undefined) && state.view === "table") loadTable().catch(() => {});
}

function onEvent(message) {
  const id = Number(message.lastEventId);
  let doc;
  try {
    doc = JSON.parse(message.data);
  } catch (e) {
    return;
  }
  state.lastId = id;
  state.received++;
  state.recentIds.push(id);
  if (state.recentIds.length > 10000) state.recentIds.splice(0, 5000);
  if (state.view === "table") state.tableLastId = id;
  const data = doc.data;
  if (!data || data.id === undefined) return;
  state.pending.set(data.id, data);
  if (state.view === "detail" && data.id === state.detailId) showDetail(data);
  if (!state.frame) state.frame = requestAnimationFrame(flush);
}

// -- the table ----------------------------------------------------------------

function flush() {
  state.frame = null;
  const tbody = $("executions").tBodies[0];
  for (const data of state.pending.values()) upsertRow(tbody, data);
  state.pending.clear();
  updateCounts();
}

function upsertRow(tbody, data) {
  let row = state.rows.get(data.id);
  if (!row) {
    const tr = document.createElement("tr");
    tr.dataset.id = data.id;
    for (let i = 0; i < 5; i++) tr.appendChild(document.createElement("td"));
    tr.cells[0].textContent = data.id;
    row = {data, tr, badge: document.createElement("span")};
    tr.cells[2].appendChild(row.badge);
    state.rows.set(data.id, row);
    // Newest first: ids grow, so a new row almost always goes on top.
    let before = tbody.firstChild;
    while (before && Number(before.dataset.id) > data.id) before = before.nextSibling;
    tbody.insertBefore(tr, before);
  }
  row.data = data;
  const {tr, badge} = row;
  tr.cells[1].textContent = data.action_ref;
  if (badge.textContent !== data.status) {
    badge.textContent = data.status;
    badge.className = `status status-${data.status}`;
  }
  tr.dataset.status = data.status;
  tr.cells[3].textContent = formatTime(data.updated);
  tr.cells[4].textContent = duration(data);
  applyFilter(row);
}

function formatTime(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "";
}

function duration(data) {
  if (!data.created) return "";
  const end = TERMINAL.has(data.status) ? new Date(data.updated) : new Date();
  const seconds = Math.max(0, (end - new Date(data.created)) / 1000);
  return seconds < 60 ? `${seconds.toFixed(1)} s` : `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

function applyFilter(row) {
  const status = $("filter-status").value;
  const action = $("filter-action").value.trim().toLowerCase();
  const visible = (!status || row.data.status === status)
    && (!action || (row.data.action_ref || "").toLowerCase().includes(action));
  row.tr.classList.toggle("hidden", !visible);
}

function updateCounts() {
  let shown = 0;
  for (const row of state.rows.values()) if (!row.tr.classList.contains("hidden")) shown++;
  $("counts").textContent = `${shown} of ${state.rows.size} shown`;
}

async function loadTable() {
  // Subscribe first, then read: an update in between arrives on the stream as well.
  const rows = [];
  for (let page = 1; rows.length < INITIAL_ROWS; page++) {
    const body = await api(`/api/v1/executions?per_page=${PAGE}&page=${page}`);
    rows.push(...body.data);
    if (body.data.length < PAGE) break;
  }
  const tbody = $("executions").tBodies[0];
  for (const data of rows) {
    if (!state.pending.has(data.id)) upsertRow(tbody, data);
  }
  updateCounts();
}

function tickDurations() {
  // Running executions' durations grow: refresh them every second.
  for (const row of state.rows.values()) {
    if (!TERMINAL.has(row.data.status)) row.tr.cells[4].textContent = duration(row.data);
  }
}

// -- the detail view ----------------------------------------------------------

async function openDetail(id) {
  state.view = "detail";
  state.detailId = id;
  state.lastId = state.tableLastId;
  show("detail-view");
  $("detail-id").textContent = id;
  $("detail-error").textContent = "";
  $("detail-fields").replaceChildren();
  $("detail-result").replaceChildren();
  $("cancel").hidden = true;
  connect(state.tableLastId);  // the tab's one stream, now for this execution only
  try {
    const body = await api(`/api/v1/executions/${id}`);
    if (state.view === "detail" && state.detailId === id) showDetail(body.data);
  } catch (error) {
    if (state.view === "detail" && state.detailId === id) $("detail-error").textContent = error.message;
  }
}

async function requestCancel() {
  const id = state.detailId;
  $("detail-error").textContent = "";
  try {
    const body = await api(`/api/v1/executions/${id}`, {method: "PATCH", body: JSON.stringify({status: "canceling"})});
    if (state.view === "detail" && state.detailId === id) showDetail(body.data);
  } catch (error) {
    // 403: this identity may read the execution but not change it; the page stays as it was.
    $("detail-error").textContent = error.message;
  }
}

function showDetail(data) {
  $("cancel").hidden = TERMINAL.has(data.status) || data.status === "canceling";
  const fields = $("detail-fields");
  fields.replaceChildren();
  for (const key of ["id", "action_ref", "status", "created", "updated"]) {
    const dt = document.createElement("dt");
    dt.textContent = key;
    const dd = document.createElement("dd");
    if (key === "status") {
      const badge = document.createElement("span");
      badge.className = `status status-${data.status}`;
      badge.textContent = data.status;
      dd.appendChild(badge);
    } else {
      dd.textContent = key === "created" || key === "updated" ? new Date(data[key]).toLocaleString() : data[key];
    }
    fields.append(dt, dd);
  }
  fields.append(Object.assign(document.createElement("dt"), {textContent: "duration"}),
                Object.assign(document.createElement("dd"), {textContent: duration(data)}));
  const box = $("detail-result");
  box.replaceChildren();
  if (data.result === null || data.result === undefined) {
    box.textContent = "(no result yet)";
    return;
  }
  const pre = document.createElement("pre");
  pre.textContent = JSON.stringify(data.result, null, 2);
  if (pre.textContent.length > LARGE_RESULT) {
    const details = document.createElement("details");
    const summary = document.createElement("summary");
    summary.textContent = `Large result (${Math.round(pre.textContent.length / 1024)} KB): show`;
    details.append(summary, pre);
    box.appendChild(details);
  } else {
    box.appendChild(pre);
  }
}

function closeDetail() {
  state.view = "table";
  state.detailId = null;
  show("table-view");
  connect(state.tableLastId);  // back to every execution, from where the table left off
}

// -- views, login -------------------------------------------------------------

function show(id) {
  for (const view of ["login-view", "table-view", "detail-view"]) $(view).hidden = view !== id;
  $("logout").hidden = id === "login-view";
  $("user").textContent = id === "login-view" ? "" : state.login || "";
}

async function start() {
  state.view = "table";
  show("table-view");
  scheduleRefresh();
  connect(null);
  try {
    await loadTable();
  } catch (error) {
    if (error.status === 401) {
      await refreshToken().then(reconnect, logout);  // reconnect reads the table again
    } else {
      throw error;
    }
  }
}

function logout(reason) {
  // A reason: a message (the server signed us out), or the error of a refresh it refused.
  const message = typeof reason === "string" ? reason : reason instanceof Error ? reason.message : "";
  if (state.source) state.source.close();
  state.source = null;
  clearTimeout(state.refreshTimer);
  clearTimeout(state.retryTimer);
  sessionStorage.clear();
  Object.assign(state, {access: null, refresh: null, login: null, view: "login", tableLastId: null, lastId: null});
  state.rows.clear();
  $("executions").tBodies[0].replaceChildren();
  setConnection("offline");
  show("login-view");
  $("login-error").textContent = message;
}

document.addEventListener("DOMContentLoaded", () => {
  const select = $("filter-status");
  for (const status of STATUSES) select.appendChild(new Option(status, status));
  const refilter = () => { for (const row of state.rows.values()) applyFilter(row); updateCounts(); };
  select.addEventListener("change", refilter);
  $("filter-action").addEventListener("input", refilter);
  $("executions").tBodies[0].addEventListener("click", (event) => {
    const tr = event.target.closest("tr");
    if (tr) openDetail(Number(tr.dataset.id));
  });
  $("back").addEventListener("click", closeDetail);
  $("cancel").addEventListener("click", requestCancel);
  $("logout").addEventListener("click", () => logout());
  window.addEventListener("offline", () => setConnection("offline"));
  window.addEventListener("online", () => { if (state.source) reconnect(); });
  setInterval(tickDurations, 1000);

  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    $("login-error").textContent = "";
    try {
      const body = await api("/auth/login", {
        method: "POST", noAuth: true,
        body: JSON.stringify({login: form.get("login"), password: form.get("password")}),
      });
      state.login = form.get("login");
      sessionStorage.setItem("attune.login", state.login);
      saveTokens(body.data);
      event.target.reset();
      await start();
    } catch (error) {
      $("login-error").textContent = error.message;
    }
  });

  if (state.access) start().catch(logout); else show("login-view");
});
