// The chat page: an API key, a model from /v1/models, answers streamed from
// /v1/chat/completions (server-sent events) and rendered as Markdown as they arrive, a stop
// button that aborts the request (the gateway then cancels the generation on the GPU), and
// conversations kept in this browser's localStorage only. The key is kept for this tab only
// (sessionStorage), never in localStorage.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "chatai.conversations";
const KEY = "chatai.apiKey";
const SETTINGS = "chatai.settings";

const state = {
  conversations: JSON.parse(localStorage.getItem(STORE) || "[]"),
  current: null, // id of the open conversation
  controller: null, // AbortController of the stream in progress
  models: {}, // id -> the /v1/models entry (state ready/starting/cold, startup_seconds)
};

function save() {
  localStorage.setItem(STORE, JSON.stringify(state.conversations));
}

function setStatus(text, kind = "") {
  const el = $("chat-status");
  el.textContent = text;
  el.className = kind;
}

function apiKey() {
  return $("api-key").value.trim();
}

function authHeaders() {
  return { Authorization: "Bearer " + apiKey(), "Content-Type": "application/json" };
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (e) {
    return response.statusText || String(response.status);
  }
}

// ------------------------------------------------------------------ models

// A model scaled to zero is listed too ("cold"): the first request waits while a worker starts.
function modelLabel(m) {
  return m.state && m.state !== "ready" ? `${m.id} (${m.state})` : m.id;
}

function startingText(id) {
  const m = state.models[id] || {};
  const about = m.startup_seconds ? `about ${Math.round(m.startup_seconds)} s` : "start-up time not known yet";
  return `Starting a worker for ${id} (${about})…`;
}

async function loadModels(quiet = false) {
  sessionStorage.setItem(KEY, apiKey());
  if (!quiet) setStatus("Loading models…");
  const select = $("model");
  try {
    const response = await fetch("/v1/models", { headers: authHeaders() });
    if (!response.ok) throw new Error(await errorText(response));
    const models = (await response.json()).data;
    const chosen = select.value;
    state.models = Object.fromEntries(models.map((m) => [m.id, m]));
    select.replaceChildren(...models.map((m) => new Option(modelLabel(m), m.id)));
    if (chosen && state.models[chosen]) select.value = chosen;
    select.disabled = models.length === 0;
    if (quiet) return;
    const cold = models.filter((m) => m.state && m.state !== "ready").length;
    setStatus(models.length ? `${models.length} model(s) available` + (cold ? `, ${cold} not running yet: the first `
      + "request starts a worker." : ".") : "This service lists no models.", models.length ? "ok" : "warn");
  } catch (err) {
    if (quiet) return;
    select.replaceChildren(new Option("(no models)", ""));
    select.disabled = true;
    setStatus("Could not list models: " + err.message, "error");
  }
}

// ------------------------------------------------------------------ conversations

function conversation() {
  return state.conversations.find((c) => c.id === state.current) || null;
}

function newConversation() {
  const c = { id: String(Date.now()) + Math.random().toString(16).slice(2, 6), title: "New chat", messages: [] };
  state.conversations.unshift(c);
  state.current = c.id;
  save();
  renderConversations();
  renderMessages();
}

function renderConversations() {
  const list = $("conversations");
  list.replaceChildren(...state.conversations.map((c) => {
    const li = document.createElement("li");
    li.className = c.id === state.current ? "current" : "";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = c.title; // textContent: titles are user text
    open.addEventListener("click", () => { if (!state.controller) { state.current = c.id; renderConversations(); renderMessages(); } });
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.title = "Delete this conversation";
    del.textContent = "×";
    del.addEventListener("click", () => {
      if (state.controller && c.id === state.current) return;
      state.conversations = state.conversations.filter((x) => x.id !== c.id);
      if (state.current === c.id) state.current = state.conversations.length ? state.conversations[0].id : null;
      save();
      renderConversations();
      renderMessages();
    });
    li.append(open, del);
    return li;
  }));
}

function messageElement(message) {
  const div = document.createElement("div");
  div.className = "message " + message.role + (message.stopped ? " stopped" : "") + (message.error ? " failed" : "");
  const content = document.createElement("div");
  content.className = "content";
  if (message.role === "assistant") content.innerHTML = renderMarkdown(message.content); // escaped inside
  else content.textContent = message.content;
  div.append(content);
  if (message.stopped || message.error) {
    const note = document.createElement("div");
    note.className = "note";
    note.textContent = message.error ? "Error: " + message.error : "Stopped.";
    div.append(note);
  }
  return div;
}

function renderMessages() {
  const c = conversation();
  $("messages").replaceChildren(...(c ? c.messages.map(messageElement) : []));
}

// ------------------------------------------------------------------ streaming

function requestBody(c, model) {
  const body = {
    model,
    stream: true,
    messages: c.messages.filter((m) => !m.error).map((m) => ({ role: m.role, content: m.content })),
  };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const temperature = parseFloat($("temperature").value);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  const extra = $("extra-params").value.trim();
  if (extra) Object.assign(body, JSON.parse(extra)); // a JSON error is shown to the user
  return body;
}

// Server-sent events: "data: {...}" lines, events separated by a blank line, "[DONE]" at the end.
// Comment lines (": ...") are the gateway's word while a cold model's worker starts.
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    const batch = [];
    let note = null;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data:")) batch.push(line.slice(5).trim());
        else if (line.startsWith(":")) note = line.slice(1).trim();
      }
    }
    if (batch.length || note) yield { batch, note }; // what one network read brought: rendered once
  }
}

async function send(text) {
  const model = $("model").value;
  if (!model) { setStatus("Connect with an API key and pick a model first.", "warn"); return; }
  if (!conversation()) newConversation();
  const c = conversation();
  c.messages.push({ role: "user", content: text });
  if (c.title === "New chat") c.title = text.slice(0, 40);
  let body;
  try {
    body = requestBody(c, model);
  } catch (err) {
    c.messages.pop();
    setStatus("Extra parameters are not valid JSON: " + err.message, "error");
    return;
  }
  const answer = { role: "assistant", content: "", model };
  c.messages.push(answer);
  save();
  renderConversations();
  renderMessages();
  const bubble = $("messages").lastElementChild;
  const content = bubble.querySelector(".content");
  bubble.classList.add("streaming");

  const controller = new AbortController();
  state.controller = controller;
  $("send").disabled = true;
  $("stop").disabled = false;
  const cold = (state.models[model] || {}).state !== "ready";
  setStatus(cold ? startingText(model) : "Generating…", "busy");
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: authHeaders(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    let generating = !cold;
    outer: for await (const { batch, note } of sseData(response)) {
      if (note && !generating) setStatus(note.charAt(0).toUpperCase() + note.slice(1) + "…", "busy");
      if (batch.length && !generating) { generating = true; setStatus("Generating…", "busy"); }
      for (const data of batch) {
        if (data === "[DONE]") break outer;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || "the generation failed");
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) answer.content += delta.content;
      }
      content.innerHTML = renderMarkdown(answer.content);
    }
    setStatus("Done.", "ok");
  } catch (err) {
    if (controller.signal.aborted) {
      answer.stopped = true;
      setStatus("Stopped.", "ok");
    } else {
      answer.error = err.message;
      setStatus("Error: " + err.message, "error");
    }
  } finally {
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    save();
    renderMessages();
    if (cold) loadModels(true); // the model's state has changed: refresh the list, quietly
  }
}

// ------------------------------------------------------------------ wiring

function loadSettings() {
  const s = JSON.parse(localStorage.getItem(SETTINGS) || "{}");
  for (const id of ["max-tokens", "temperature", "extra-params"]) if (s[id] !== undefined) $(id).value = s[id];
}

function saveSettings() {
  const s = {};
  for (const id of ["max-tokens", "temperature", "extra-params"]) s[id] = $(id).value;
  localStorage.setItem(SETTINGS, JSON.stringify(s));
}

$("key-form").addEventListener("submit", (e) => { e.preventDefault(); loadModels(); });
$("new-chat").addEventListener("click", () => { if (!state.controller) newConversation(); });
$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
for (const id of ["max-tokens", "temperature", "extra-params"]) $(id).addEventListener("change", saveSettings);
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});

loadSettings();
state.current = state.conversations.length ? state.conversations[0].id : null;
renderConversations();
renderMessages();
const remembered = sessionStorage.getItem(KEY);
if (remembered) { $("api-key").value = remembered; loadModels(); }
