// The status page: polls /api/status with the key typed in (an API key or the metrics token)
// and shows models, live workers, queues, the tunnel, the broker connection and the breaker.
// Every value goes into the page as text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "chatai.apiKey";
const REFRESH_MS = 2000;
let timer = null;

function row(cells, attrs = {}) {
  const tr = document.createElement("tr");
  for (const [k, v] of Object.entries(attrs)) tr.dataset[k] = v;
  for (const cell of cells) {
    const td = document.createElement("td");
    td.textContent = cell === null || cell === undefined ? "–" : String(cell);
    tr.append(td);
  }
  return tr;
}

function rowsOrNone(rows, columns, what) {
  if (rows.length) return rows;
  const tr = document.createElement("tr");
  const td = document.createElement("td");
  td.colSpan = columns;
  td.className = "note";
  td.textContent = what;
  tr.append(td);
  return [tr];
}

function show(id, text, kind) {
  const el = $(id);
  el.textContent = text;
  el.className = kind;
}

function seconds(s) {
  if (s === null || s === undefined) return null;
  if (Math.abs(s) < 120) return `${Math.round(s)} s`;
  if (Math.abs(s) < 7200) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function render(st) {
  show("broker-state", st.broker.connected ? "connected" : "disconnected: " + (st.broker.last_error || "not yet"),
    st.broker.connected ? "ok" : "error");
  if (st.tunnel) {
    show("tunnel-state", st.tunnel.state + (st.tunnel.last_error ? ": " + st.tunnel.last_error : ""),
      st.tunnel.state === "up" ? "ok" : "error");
  } else {
    show("tunnel-state", "none (direct broker connection)", "warn");
  }
  const b = st.breaker;
  show("breaker-state", b.state + (b.detail ? " — " + b.detail : ""),
    b.state === "closed" ? "ok" : b.state === "probably tripped" ? "error" : "warn");
  $("models").tBodies[0].replaceChildren(...rowsOrNone(st.models.map((m) => row([
    m.name, m.workers.ready, m.workers.starting, m.workers.draining, m.capacity, m.in_flight,
    m.queue ? m.queue.waiting : null, m.queue ? m.queue.consumers : null,
    m.state, m.on_demand ? "yes" : "no", seconds(m.startup_seconds),
    m.prefix_cache_hit_rate === null || m.prefix_cache_hit_rate === undefined ? null
      : `${Math.round(m.prefix_cache_hit_rate * 100)}%`,
  ], { model: m.name, state: m.state })), 12, "No models: no live worker, no autoscaler, none configured."));
  $("workers").tBodies[0].replaceChildren(...rowsOrNone(st.workers.map((w) => row([
    // worker id, node and Slurm job come only with the operator's metrics token: "–" for API keys
    w.worker_id, w.model, w.state, w.node, w.slurm_job_id, `${w.in_flight} / ${w.capacity}`,
    seconds(w.heartbeat_age) + " ago", seconds(w.job_ends_in),
  ], { workerId: w.worker_id ?? "", model: w.model, state: w.state })), 8,
  "No live workers (none has sent a heartbeat lately)."));
  show("updated", "updated " + new Date(st.time * 1000).toLocaleTimeString(), "ok");
}

async function refresh() {
  try {
    const response = await fetch("/api/status", { headers: { Authorization: "Bearer " + $("api-key").value.trim() } });
    if (!response.ok) {
      let message = response.statusText;
      try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    render(await response.json());
  } catch (err) {
    show("updated", "not updated: " + err.message, "error");
  }
}

function start() {
  sessionStorage.setItem(KEY, $("api-key").value.trim());
  clearInterval(timer);
  refresh();
  timer = setInterval(refresh, REFRESH_MS);
}

$("key-form").addEventListener("submit", (e) => { e.preventDefault(); start(); });
const remembered = sessionStorage.getItem(KEY);
if (remembered) { $("api-key").value = remembered; start(); }
