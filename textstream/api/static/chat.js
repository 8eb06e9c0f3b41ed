"use strict";
async function copyText(value, button) {
  let ok = false;
  try { await navigator.clipboard.writeText(value); ok = true; } catch (e) {
    // navigator.clipboard exists only on https or localhost: fall back to a selection.
    const area = document.createElement("textarea");
    area.value = value; area.setAttribute("readonly", "");
    area.style.position = "fixed"; area.style.opacity = "0";
    document.body.append(area); area.select();
    try { ok = document.execCommand("copy"); } catch (e2) { ok = false; }
    area.remove();
  }
  button.dataset.label = button.dataset.label || button.textContent;
  button.textContent = ok ? "Copied" : "Copy failed";
  setTimeout(() => { button.textContent = button.dataset.label; }, 1500);
}

/* The chat. Conversations live in localStorage; the API key in sessionStorage.
   A turn is POST /jobs with the whole conversation as chat messages, then an
   EventSource on its events. Every event's id is a Redis Stream entry id: the page
   keeps the last one it applied, drops anything not newer (so a replay never
   duplicates text), and after a reload reopens the stream from there. EventSource
   cannot send headers: with API keys on, POST /jobs returns a token for the stream. */
const $ = (id) => document.getElementById(id);
const STORE = {
  chats: "textstream-chats", current: "textstream-current", settings: "textstream-settings", key: "textstream-key",
  drawing: "textstream-drawing",  // the id of the chat being drawn, until the frame after
};
const uid = () => Date.now().toString(36) + Math.random().toString(36).slice(2, 8);

function readJSON(name, fallback) {
  try { return JSON.parse(localStorage.getItem(name)) ?? fallback; } catch (e) { return fallback; }
}
let chats = readJSON(STORE.chats, []);
if (!Array.isArray(chats)) chats = [];
chats = chats.filter((c) => c && typeof c.id === "string" && Array.isArray(c.messages));
let settings = Object.assign({ max_new_tokens: "512", temperature: "0", top_p: "1", model: "" }, readJSON(STORE.settings, {}));
let current = null, active = null, health = null, healthTimer = 0, saveTimer = 0;
const views = new Map();  // message -> its element, for the chat on screen

function saveNow() {
  clearTimeout(saveTimer); saveTimer = 0;
  for (;;) {
    try { localStorage.setItem(STORE.chats, JSON.stringify(chats)); break; } catch (e) {
      const oldest = chats.filter((c) => c !== current && (!active || c !== active.chat))
        .sort((a, b) => a.updated - b.updated)[0];
      if (!oldest) break;  // storage is full even with one chat: keep it in memory
      chats.splice(chats.indexOf(oldest), 1);
    }
  }
  if (current) localStorage.setItem(STORE.current, current.id);
}
function saveSoon() { if (!saveTimer) saveTimer = setTimeout(saveNow, 700); }

function chatTitle(chat) {
  const first = chat.messages.find((m) => m.role === "user");
  return first ? first.content.replace(/\s+/g, " ").slice(0, 60) : "New chat";
}
function newChat() {
  const chat = { id: uid(), system: current ? current.system || "" : "", created: Date.now(), updated: Date.now(), messages: [] };
  chats.push(chat);
  return chat;
}

// -- drawing ----------------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}
function button(label, className, onClick) {
  const b = el("button", className, label);
  b.type = "button";
  b.addEventListener("click", onClick);
  return b;
}

function renderChatList() {
  const list = $("chats");
  list.replaceChildren();
  for (const chat of [...chats].sort((a, b) => b.updated - a.updated)) {
    const item = el("li", chat === current ? "current" : "");
    const open = button(chatTitle(chat), "open", () => { selectChat(chat); document.body.classList.remove("sidebar-open"); });
    open.title = chatTitle(chat);
    const remove = button("×", "delete", () => deleteChat(chat));
    remove.setAttribute("aria-label", "Delete this chat");
    item.append(open, remove);
    list.append(item);
  }
}

/* A chat that took the page down while it was drawn would take it down again on every
   visit (it is the current chat). So the chat's id is kept in localStorage from
   before it is drawn until the frame after; an id found there at start means that
   drawing never ended: that chat is shown as plain text (chat.plain) until asked. */
let drawings = 0;
function drawing(chat) {
  const mine = ++drawings;
  localStorage.setItem(STORE.drawing, chat.id);
  requestAnimationFrame(() => setTimeout(() => {
    if (mine === drawings) localStorage.removeItem(STORE.drawing);
  }));
}
function markCrashedChat() {
  const id = localStorage.getItem(STORE.drawing), chat = chats.find((c) => c.id === id);
  if (chat) { chat.plain = true; saveNow(); }
  localStorage.removeItem(STORE.drawing);
}

function plainNote() {
  const note = el("div", "", "This chat stopped the page the last time it was drawn, so it is shown as plain text.");
  note.id = "plain-note";
  note.append(button("Show formatted", "ghost", () => { delete current.plain; saveNow(); renderThread(); }));
  return note;
}

function renderThread() {
  const thread = $("thread");
  drawing(current);
  thread.replaceChildren(); views.clear();
  if (current.plain) thread.append(plainNote());
  for (const msg of current.messages) thread.append(messageView(msg));
  $("empty").hidden = current.messages.length > 0;
  $("chat-title").textContent = chatTitle(current);
  $("system").value = current.system || "";
  updateActions();
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function messageView(msg) {
  if (msg.role === "user") {
    const bubble = el("div", "msg user", msg.content);
    views.set(msg, bubble);
    return bubble;
  }
  const view = el("article", "msg assistant");
  const thinking = el("details", "thinking");
  thinking.append(el("summary", "", "Reasoning"), el("div", "thinking-body"));
  const foot = el("div", "msg-foot"), actions = el("span", "actions");
  actions.append(
    button("Copy", "ghost copy", (e) => copyText(msg.content.trim(), e.currentTarget)),
    button("Regenerate", "ghost regenerate", regenerate));
  // The figures first: the actions, hidden while the answer streams, sit at the
  // end, so that showing them does not move the figures.
  foot.append(el("span", "msg-stats"), actions);
  view.append(thinking, el("div", "answer markdown"), el("div", "note"), foot);
  views.set(msg, view);
  paintMessage(msg);
  return view;
}

const NOTES = { stopped: "Stopped.", interrupted: "Interrupted: this answer did not finish." };
function paintMessage(msg) {
  const view = views.get(msg);
  if (!view || msg.role !== "assistant") return;
  const [thinking, answer, note, foot] = view.children;
  thinking.hidden = !msg.thinking;
  thinking.lastChild.textContent = msg.thinking || "";
  const source = msg.content.trimStart();
  answer.classList.toggle("plain", Boolean(current.plain));  // views: the chat on screen
  if (source && current.plain) answer.textContent = source;
  else if (source) answer.replaceChildren(markdown(source));
  else answer.replaceChildren(...(msg.status === "streaming" ? [el("span", "dots")] : []));
  note.textContent = msg.status === "error" ? msg.error || "The answer failed." : NOTES[msg.status] || "";
  note.className = "note" + (msg.status === "error" ? " bad" : "");
  view.classList.toggle("streaming", msg.status === "streaming");
  foot.querySelector(".copy").hidden = !source;
  const s = msg.stats || {}, parts = [];
  if (s.tokens !== undefined) parts.push(s.tokens + " tokens");
  if (s.ttft_ms !== undefined) parts.push(s.ttft_ms + " ms to first token");
  if (s.rate !== undefined) parts.push(s.rate + " tokens/s");
  if (s.finish_reason === "length") parts.push("cut at max tokens");
  if (s.regenerated) parts.push("new answer at temperature " + s.regenerated);
  if (s.model) parts.push(s.model);
  foot.querySelector(".msg-stats").textContent = parts.join(" · ");
}

/* While tokens stream the answer is drawn again from its whole text, so one drawing
   costs more as the answer grows: the next one waits 50 ms or four times what the
   last one took, whichever is longer, and drawing keeps to a fifth of the time. */
let paintTimer = 0, paintCost = 0;
function paintSoon(msg) {
  if (paintTimer) return;
  paintTimer = setTimeout(() => { paintTimer = 0; paintKeepingScroll(msg); }, Math.max(50, 4 * paintCost));
}
function paintKeepingScroll(msg) {
  const started = performance.now(), box = $("messages");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 120;
  if (msg.role === "assistant" && current.messages.includes(msg)) drawing(current);
  paintMessage(msg);
  if (atBottom) box.scrollTop = box.scrollHeight;  // reads the layout: its cost is counted
  paintCost = performance.now() - started;
}

function updateActions() {
  const last = current.messages[current.messages.length - 1];
  for (const [msg, view] of views) {
    const regen = view.querySelector(".regenerate");
    if (regen) regen.hidden = msg !== last || Boolean(active);
  }
  $("send").disabled = Boolean(active);
  $("stop").disabled = !active;
}

function setStatus(value, bad) { $("status").textContent = value; $("status").className = bad ? "error" : ""; }
function resetFigures() { for (const id of ["queue", "ttft", "rate", "tokens"]) $(id).textContent = "–"; }

function selectChat(chat) {
  current = chat;
  renderThread(); renderChatList(); saveNow();
}
function deleteChat(chat) {
  if (active && active.chat === chat) stop();
  chats.splice(chats.indexOf(chat), 1);
  if (chat === current) current = [...chats].sort((a, b) => b.updated - a.updated)[0] || newChat();
  renderThread(); renderChatList(); saveNow();
}
function startNewChat() {
  const empty = chats.find((c) => !c.messages.length);
  selectChat(empty || newChat());
  document.body.classList.remove("sidebar-open");
  $("prompt").focus();
}

// -- the server ------------------------------------------------------------------------

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = $("key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}
function errorText(reply, response) {
  return (reply && reply.error && reply.error.message) || (response && (response.status + " " + response.statusText)) || "error";
}

async function loadHealth() {
  clearTimeout(healthTimer);
  try { health = await (await fetch("/health", { cache: "no-store" })).json(); } catch (e) { health = null; }
  const models = health && Array.isArray(health.models) ? health.models : [];
  const picker = $("model-picker");
  picker.hidden = models.length < 2;
  $("model").hidden = models.length > 1;
  if (models.length > 1) {
    if ([...picker.options].map((o) => o.value).join("\n") !== models.join("\n")) {
      picker.replaceChildren(...models.map((name) => { const o = el("option", "", name); o.value = name; return o; }));
    }
    picker.value = models.includes(settings.model) ? settings.model : models[0];
  } else {
    const name = health ? models[0] || health.model || "waiting for a worker" : "unreachable";
    $("model").textContent = "model: " + name;
    $("model").title = name;
  }
  if (health) $("key-bar").hidden = !health.auth;
  healthTimer = setTimeout(loadHealth, models.length ? 30000 : 3000);
}

/** The sampling fields for POST /jobs, or null (and a message) when one is invalid. */
function readParams() {
  const body = {}, bad = (text) => { setStatus(text, true); showSettings(true); return null; };
  const max = $("max_tokens").value.trim();
  if (max) {
    const n = Number(max);
    if (!Number.isInteger(n) || n < 1) return bad("max tokens must be a whole number of at least 1");
    body.max_new_tokens = n;
  }
  const temperature = Number($("temperature").value.trim() || 0);
  if (!(temperature >= 0)) return bad("temperature must be 0 or more");
  const topP = Number($("top_p").value.trim() || 1);
  if (!(topP > 0 && topP <= 1)) return bad("top_p must be above 0 and at most 1");
  body.temperature = temperature; body.top_p = topP;
  // Only a server with several models takes a `model` field.
  if (health && Array.isArray(health.models) && health.models.length > 1) body.model = $("model-picker").value;
  return body;
}

/** The chat as messages for the API, up to (not including) `upTo`. */
function conversation(chat, upTo) {
  const messages = [];
  if ((chat.system || "").trim()) messages.push({ role: "system", content: chat.system.trim() });
  for (const msg of chat.messages) {
    if (msg === upTo) break;
    if (msg.role === "user") messages.push({ role: "user", content: msg.content });
    else if (msg.content.trim()) messages.push({ role: "assistant", content: msg.content.trim() });
  }
  return messages;
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (active || !text) return;
  const params = readParams();
  if (!params) return;
  current.messages.push({ role: "user", content: text });
  $("prompt").value = ""; fitPrompt();
  await ask(current, params, text);
}

/* Regenerate asks for a new answer: never the cached one (use_cache false), with a
   new seed; and at temperature 0, which picks the same answer every time, at
   REGENERATE_TEMPERATURE instead. The status line and the answer's figures say so. */
const REGENERATE_TEMPERATURE = 0.7;
function regenerate() {
  if (active) return;
  const chat = current, last = chat.messages[chat.messages.length - 1];
  if (last && last.role === "assistant") chat.messages.pop();
  const params = readParams();
  if (!params || !chat.messages.length) { renderThread(); return; }
  params.use_cache = false;
  params.seed = Math.floor(Math.random() * 2 ** 31);
  if (!params.temperature) params.temperature = REGENERATE_TEMPERATURE;
  ask(chat, params, undefined, "regenerating: a new answer at temperature " + params.temperature);
}

/** One answer being followed: what the live figures and Stop need. */
function newRun(chat, msg, sentAt) {
  return { chat, msg, sentAt, firstAt: 0, lastAt: 0, pieces: 0, source: null, started: false, stopAsked: false };
}

async function ask(chat, params, typed, saying) {
  const msg = { role: "assistant", content: "", thinking: "", status: "streaming", stats: {} };
  if (params.use_cache === false) msg.stats.regenerated = params.temperature;
  chat.messages.push(msg);
  chat.updated = Date.now();
  const run = active = newRun(chat, msg, performance.now());
  if (chat === current) renderThread();
  updateActions(); renderChatList(); saveNow();
  resetFigures(); setStatus(saying || "sending");
  const body = { messages: conversation(chat, msg), ...params };
  let response, reply;
  try {
    response = await fetch("/jobs", { method: "POST", headers: headers(true), body: JSON.stringify(body) });
    reply = await response.json().catch(() => null);
  } catch (e) { refused(run, typed, "cannot reach the server"); return; }
  if (!response.ok) {
    if (response.status === 401) { $("key-bar").hidden = false; $("key").focus(); }
    refused(run, typed, errorText(reply, response));
    return;
  }
  msg.job = { id: reply.id, events: reply.events_url, status: reply.status_url, token: reply.events_token || "", last: "" };
  saveNow();
  if (run.stopAsked) cancel(run);
  follow(run);
}

/** Nothing was queued: take the turn back, so that fixing the cause and pressing
    Send again is enough (a regenerated turn keeps the error to retry from). */
function refused(run, typed, reason) {
  const { chat, msg } = run;
  if (typed !== undefined) {
    chat.messages.splice(chat.messages.indexOf(msg) - 1, 2);
    if (!$("prompt").value) { $("prompt").value = typed; fitPrompt(); }
  } else {
    msg.status = "error"; msg.error = reason;
  }
  active = null;
  if (chat === current) renderThread();
  updateActions(); renderChatList(); saveNow();
  setStatus(reason, true);
}

/** Newer Redis Stream entry id? ("1700000000000-3" > "1700000000000-2") */
function isAfter(id, than) {
  if (!than) return true;
  const [a, b] = id.split("-").map(Number), [c, d] = than.split("-").map(Number);
  return a > c || (a === c && b > d);
}

function follow(run) {
  const { msg } = run, job = msg.job, query = new URLSearchParams();
  if (job.token) query.set("access_token", job.token);
  if (job.last) query.set("last_event_id", job.last);  // resuming after a reload
  const source = new EventSource(job.events + (query.toString() ? "?" + query : ""));
  run.source = source;
  const data = (e) => { try { return JSON.parse(e.data); } catch (err) { return {}; } };
  // The browser resumes a dropped connection with Last-Event-ID by itself; anything
  // at or before the last applied id is a replay and is dropped.
  const fresh = (e) => {
    if (!e.lastEventId) return true;
    if (!isAfter(e.lastEventId, job.last)) return false;
    job.last = e.lastEventId;
    return true;
  };
  source.addEventListener("open", () => {
    if ($("status").textContent === "reconnecting…") setStatus(run.started ? "generating" : "queued");
  });
  source.addEventListener("queued", (e) => {
    fresh(e);  // repeats come without an id: they only refresh the position
    if (run.started) return;
    const d = data(e);
    $("queue").textContent = d.position ? "#" + d.position + (d.workers === 0 ? " (no worker yet)" : "") : "–";
    setStatus("queued");
  });
  for (const name of ["started", "resumed"]) {
    source.addEventListener(name, (e) => {
      if (!fresh(e)) return;
      run.started = true;
      $("queue").textContent = "–";
      setStatus("generating");
    });
  }
  source.addEventListener("thinking", (e) => {
    if (!fresh(e)) return;
    msg.thinking = (msg.thinking || "") + (data(e).text || "");
    firstPiece(run); paintSoon(msg);
  });
  source.addEventListener("token", (e) => {
    if (!fresh(e)) return;
    msg.content += data(e).text || "";
    run.pieces += 1;
    run.started = true;
    firstPiece(run);
    if (!run.saidGenerating && !run.stopAsked) {
      run.saidGenerating = true;
      setStatus(msg.stats.regenerated !== undefined ? "generating a new answer" : "generating");
    }
    $("tokens").textContent = run.pieces;
    run.lastAt = performance.now();
    const seconds = (run.lastAt - run.firstAt) / 1000;
    if (run.pieces > 1 && seconds > 0) $("rate").textContent = ((run.pieces - 1) / seconds).toFixed(1);
    paintSoon(msg); saveSoon();
  });
  source.addEventListener("done", (e) => { if (fresh(e)) finish(run, "done", data(e)); });
  source.addEventListener("error", (e) => {
    if (e.data !== undefined) {  // the server's `error` event: the job ended
      if (!fresh(e)) return;
      const d = data(e), cancelled = d.error && d.error.type === "cancelled";
      finish(run, cancelled ? "stopped" : "error", d);
    } else if (run.source === source && source.readyState === EventSource.CLOSED) {
      // The browser gave up (the server refused the reconnect, e.g. an expired
      // stream token): follow the job by polling its status instead.
      source.close(); run.source = null;
      poll(run);
    } else if (run.source === source) {
      setStatus("reconnecting…", true);
    }
  });
}

function firstPiece(run) {
  if (run.firstAt) return;
  run.firstAt = performance.now();
  if (run.sentAt) {
    run.msg.stats.ttft_ms = Math.round(run.firstAt - run.sentAt);
    $("ttft").textContent = run.msg.stats.ttft_ms + " ms";
  }
}

async function poll(run) {
  if (active !== run) return;
  let response;
  try { response = await fetch(run.msg.job.status, { headers: headers(), cache: "no-store" }); } catch (e) {
    setStatus("reconnecting…", true);
    setTimeout(() => poll(run), 2000);
    return;
  }
  const reply = await response.json().catch(() => null);
  if (response.status === 404) { finish(run, "interrupted"); return; }
  if (!response.ok || !reply) { finish(run, "error", { error: { message: errorText(reply, response) } }); return; }
  run.msg.content = reply.text || "";
  run.msg.job.last = reply.last_event_id || run.msg.job.last;
  paintKeepingScroll(run.msg);
  if (reply.status === "done") finish(run, "done", reply);
  else if (reply.status === "cancelled") finish(run, "stopped");
  else if (reply.status === "error") finish(run, "error", reply);
  else { setStatus(reply.status === "queued" ? "queued" : "generating"); setTimeout(() => poll(run), 1000); }
}

function finish(run, status, d) {
  if (run.source) { run.source.close(); run.source = null; }  // or it would reconnect
  const { msg, chat } = run;
  msg.status = status;
  // The figures of what arrived, for a stopped or broken answer too.
  const seconds = (run.lastAt - run.firstAt) / 1000;  // first to last token, as shown live
  if (run.firstAt && run.pieces > 1 && seconds > 0) msg.stats.rate = ((run.pieces - 1) / seconds).toFixed(1);
  if (run.pieces) msg.stats.tokens = run.pieces;
  if (status === "done" && d) {
    const tokens = d.usage ? d.usage.completion_tokens : run.pieces;
    Object.assign(msg.stats, { tokens, finish_reason: d.finish_reason, model: d.model });
    $("tokens").textContent = tokens;
  }
  if (status === "error") msg.error = (d && d.error && d.error.message) || "The answer failed.";
  if (msg.job) msg.job = { id: msg.job.id };  // the stream token is of no further use
  chat.updated = Date.now();
  active = null;
  clearTimeout(paintTimer); paintTimer = 0;
  paintKeepingScroll(msg);
  updateActions();
  renderChatList(); saveNow();
  $("queue").textContent = "–";
  if (status === "done") setStatus(FINISHED[d && d.finish_reason] || "done");
  else if (status === "stopped") setStatus("stopped");
  else setStatus(status === "interrupted" ? "interrupted" : msg.error, true);
}

/** A finished answer's status in words (finish_reason is the API's). */
const FINISHED = {
  stop: "done",
  length: "done: cut at max tokens (raise it in Settings)",
  content_filter: "done: stopped by a filter",
};

function stop() {
  const run = active;
  if (!run) return;
  run.stopAsked = true;
  setStatus("stopping");
  if (run.msg.job) cancel(run);  // else: cancelled as soon as POST /jobs answers
}
async function cancel(run) {
  try {
    const response = await fetch("/jobs/" + encodeURIComponent(run.msg.job.id), { method: "DELETE", headers: headers() });
    // 409: it had finished already; the stream brings its end either way.
    if (!response.ok && response.status !== 409 && active === run) {
      setStatus(errorText(await response.json().catch(() => null), response), true);
    }
  } catch (e) { if (active === run) setStatus("cannot reach the server to stop", true); }
}

/** After a reload: reopen an answer that was still streaming, from its last event. */
function resumeStreaming() {
  for (const chat of chats) {
    for (const msg of chat.messages) {
      if (msg.role !== "assistant" || msg.status !== "streaming") continue;
      if (!active && msg.job && msg.job.id && msg.job.events) {
        active = newRun(chat, msg, 0);  // no time to first token after a reload
        setStatus("resuming");
        follow(active);
      } else {
        msg.status = "interrupted";  // reloaded before the server answered POST /jobs
      }
    }
  }
}

// -- controls ----------------------------------------------------------------------------

function fitPrompt() {
  const box = $("prompt");
  box.style.height = "auto";
  box.style.height = Math.min(box.scrollHeight + 2, 200) + "px";
}
function showSettings(open) {
  $("settings").hidden = !open;
  $("settings-toggle").setAttribute("aria-expanded", String(open));
}

$("composer").addEventListener("submit", send);
$("stop").addEventListener("click", stop);
$("new-chat").addEventListener("click", startNewChat);
$("settings-toggle").addEventListener("click", () => showSettings($("settings").hidden));
$("open-sidebar").addEventListener("click", () => document.body.classList.add("sidebar-open"));
$("close-sidebar").addEventListener("click", () => document.body.classList.remove("sidebar-open"));
$("scrim").addEventListener("click", () => document.body.classList.remove("sidebar-open"));
$("prompt").addEventListener("input", fitPrompt);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
});
document.addEventListener("keydown", (e) => { if (e.key === "Escape" && active) stop(); });
$("system").addEventListener("input", () => { current.system = $("system").value; saveSoon(); });
for (const id of ["max_tokens", "temperature", "top_p"]) {
  $(id).value = settings[id === "max_tokens" ? "max_new_tokens" : id];
  $(id).addEventListener("change", () => {
    settings[id === "max_tokens" ? "max_new_tokens" : id] = $(id).value;
    localStorage.setItem(STORE.settings, JSON.stringify(settings));
  });
}
$("model-picker").addEventListener("change", () => {
  settings.model = $("model-picker").value;
  localStorage.setItem(STORE.settings, JSON.stringify(settings));
});
$("key").value = sessionStorage.getItem(STORE.key) || "";
$("key-bar").addEventListener("submit", (e) => { e.preventDefault(); $("prompt").focus(); });
$("key").addEventListener("input", () => sessionStorage.setItem(STORE.key, $("key").value.trim()));
addEventListener("pagehide", () => {
  saveNow();
  localStorage.removeItem(STORE.drawing);  // closed, not crashed (a hidden tab has no frames)
});

current = chats.find((c) => c.id === localStorage.getItem(STORE.current)) || chats.find((c) => !c.messages.length) || newChat();
markCrashedChat();
resumeStreaming();
renderThread();
renderChatList();
saveNow();
loadHealth();
window.textstream = { markdown };  // for tests and the curious
