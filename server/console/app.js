// Tessera's console: chat with any adapter mix, correct answers into feedback, watch adapters
// train, roll them back, and run the plugins and the server. It speaks only the server's own
// HTTP API, with the tab's key (sessionStorage) in the Authorization header.
"use strict";

const KEY_SLOT = "tessera-key";
const state = {
  key: sessionStorage.getItem(KEY_SLOT),
  scope: null,
  baseModel: null,
  adapters: [],
  messages: [],
  lastAnswer: null,
  // The answer a regenerated one replaced: a 👍 on the new one prefers it to this.
  replaced: null,
  job: null,
  jobTimer: null,
  metrics: null,
};
const $ = (id) => document.getElementById(id);

/** One API call: the parsed JSON body (or text) and the response; throws the server's message. */
async function api(method, path, body, options = {}) {
  const headers = {};
  if (state.key) headers["Authorization"] = `Bearer ${state.key}`;
  let payload = body;
  if (body !== undefined && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const response = await fetch(path, { method, headers, body: payload });
  if (options.raw) return response;
  const text = await response.text();
  let data = text;
  try { data = JSON.parse(text); } catch (_) { /* not JSON: Prometheus text */ }
  if (!response.ok) {
    const message = data && data.error ? data.error.message : `${response.status} ${response.statusText}`;
    throw new Error(message);
  }
  return { data, response };
}

const rank = { inference: 1, tune: 2, admin: 3 };
const allows = (scope) => rank[state.scope] >= rank[scope];

async function start() {
  const { data } = await api("GET", "/v1/scope");
  if (data.scope === null) {
    $("key-panel").hidden = false;
    $("key-error").textContent = state.key ? "This key is not valid here." : "";
    document.querySelector("main").hidden = true;
    return;
  }
  state.scope = data.scope;
  $("key-panel").hidden = true;
  document.querySelector("main").hidden = false;
  $("scope").textContent = data.keys_required ? `Signed in: ${data.scope}` : "Open server";
  $("forget-key").hidden = !state.key;
  for (const el of document.querySelectorAll(".admin-only")) el.hidden = !allows("admin");
  for (const el of document.querySelectorAll(".tune-only")) el.hidden = !allows("tune");
  if (!allows("admin")) {
    for (const id of ["panel-adapters", "panel-server"]) $(id).remove();
  }
  if (!allows("tune")) $("panel-training").remove();
  await loadModels();
}

function showPanel(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.setAttribute("aria-pressed", String(tab.dataset.panel === name));
  for (const panel of document.querySelectorAll(".panel")) panel.hidden = panel.id !== `panel-${name}`;
  if (name === "adapters") refreshAdapters();
  if (name === "training") { refreshJobs(); fillAdapterSelect($("train-adapter"), false); }
  if (name === "server") { refreshPlugins(); refreshMetrics(); }
}

// ---- Chat ----

async function loadModels() {
  const { data } = await api("GET", "/v1/models");
  state.baseModel = data.data.find((m) => m.parent === null && m.owned_by !== "plugin") || data.data[0];
  state.adapters = data.data.filter((m) => m.parent !== null).map((m) => m.id);
  const select = $("model");
  select.replaceChildren(...data.data.map((m) => new Option(m.parent ? `${m.id} (adapter)` : m.id, m.id)));
  const rows = state.adapters.map((name, i) => {
    const row = document.createElement("div");
    row.className = "mix-row";
    row.innerHTML = `<input type="checkbox" id="mix-use-${i}"><label for="mix-use-${i}"></label><output id="mix-value-${i}">1.00</output>
      <label class="sr" for="mix-scale-${i}"></label><input type="range" id="mix-scale-${i}" min="0" max="2" step="0.05" value="1">`;
    row.querySelector(`label[for="mix-use-${i}"]`).textContent = name;
    row.querySelector(`label[for="mix-scale-${i}"]`).textContent = `Scale of ${name}`;
    const scale = row.querySelector("input[type=range]");
    scale.dataset.adapter = name;
    scale.addEventListener("input", () => { $(`mix-value-${i}`).textContent = Number(scale.value).toFixed(2); });
    return row;
  });
  $("mix-rows").replaceChildren(...rows);
  $("mix").hidden = rows.length === 0;
  fillAdapterSelect($("feedback-target"), true);
}

function fillAdapterSelect(select, withNew) {
  const options = state.adapters.map((name) => new Option(name, name));
  if (withNew) options.push(new Option("A new adapter…", ""));
  select.replaceChildren(...options);
}

function chosenMix() {
  return [...document.querySelectorAll("#mix-rows .mix-row")]
    .filter((row) => row.querySelector("input[type=checkbox]").checked)
    .map((row) => {
      const scale = row.querySelector("input[type=range]");
      return { name: scale.dataset.adapter, scale: Number(scale.value) };
    });
}

function addTurn(role, text) {
  const item = document.createElement("li");
  item.className = role;
  item.textContent = text;
  $("conversation").append(item);
  return item;
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("user-message").value.trim();
  if (!text) return;
  $("chat-error").textContent = "";
  $("correction").hidden = true;
  state.messages.push({ role: "user", content: text });
  addTurn("user", text);
  $("user-message").value = "";
  const bubble = addTurn("assistant", "");
  const system = $("system").value.trim();
  const body = {
    model: $("model").value,
    messages: (system ? [{ role: "system", content: system }] : []).concat(state.messages),
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
    stream: true,
    stream_options: { include_usage: true },
  };
  const mix = chosenMix();
  if (mix.length) body.adapters = mix;
  $("send").disabled = true;
  state.replaced = null;
  try {
    await streamAnswer(body, bubble);
  } catch (e) {
    $("chat-error").textContent = e.message;
    bubble.remove();
    state.messages.pop();
  } finally {
    $("send").disabled = false;
  }
}

/** The conversation with the system prompt, for a chat request or a feedback record. */
function withSystem(turns) {
  const system = $("system").value.trim();
  return (system ? [{ role: "system", content: system }] : []).concat(turns);
}

/** Answers the last user message again, sampled, in place of the last answer. */
async function regenerate() {
  const { bubble, index } = state.lastAnswer;
  const replaced = state.messages[index].content;
  state.messages.splice(index, 1);
  bubble.classList.add("replaced");
  const fresh = addTurn("assistant", "");
  const body = {
    model: $("model").value,
    messages: withSystem(state.messages),
    // Sampled, so that the new answer differs from the one it replaces.
    temperature: Math.max(Number($("temperature").value), 1),
    top_p: 1,
    max_tokens: Number($("max-tokens").value),
    stream: true,
    stream_options: { include_usage: true },
  };
  const mix = chosenMix();
  if (mix.length) body.adapters = mix;
  try {
    await streamAnswer(body, fresh);
    state.replaced = replaced;
    $("feedback-result").textContent = "Another answer: 👍 prefers it to the one it replaced.";
  } catch (e) {
    $("chat-error").textContent = e.message;
    fresh.remove();
    state.messages.splice(index, 0, { role: "assistant", content: replaced });
    bubble.classList.remove("replaced");
  }
}

/** The adapter that answered: the model chosen if it is an adapter, else the mix's only
 * adapter, else the one chosen to teach. */
function answeringAdapter() {
  if (state.adapters.includes($("model").value)) return $("model").value;
  const mix = chosenMix();
  if (mix.length === 1) return mix[0].name;
  return $("feedback-target").value || $("feedback-new").value.trim();
}

/** Stores a preference for the adapter that answered: the conversation up to the last answer,
 * `chosen` preferred to `rejected`. */
async function sendPreference(chosen, rejected) {
  const target = answeringAdapter();
  if (!target) {
    $("feedback-result").textContent = "Choose an adapter or name a new one.";
    return false;
  }
  const messages = withSystem(state.messages.slice(0, state.lastAnswer.index));
  try {
    const { data } = await api("POST", `/v1/adapters/${encodeURIComponent(target)}/feedback`, { messages, chosen, rejected });
    $("feedback-result").textContent = `Preference stored in ${data.adapter}: ${data.stored} new, ${data.total_preferences} preference(s) in all` +
      (data.job ? `; training job ${data.job} started` : "");
    if (!state.adapters.includes(target)) await loadModels();
    return true;
  } catch (e) {
    $("feedback-result").textContent = `Refused: ${e.message}`;
    return false;
  }
}

/** 👎: the corrected reply, if there is one, is preferred to the answer (or, to an empty
 * answer, stored as a pair to imitate); else another answer is generated, which a 👍 then
 * prefers. */
async function thumbsDown() {
  const answer = state.messages[state.lastAnswer.index].content;
  const corrected = $("corrected").value.trim();
  if (corrected && !answer.trim()) {
    await sendFeedback(corrected);
  } else if (corrected && corrected !== answer.trim()) {
    if (await sendPreference(corrected, answer)) {
      state.messages[state.lastAnswer.index].content = corrected;
      state.lastAnswer.bubble.textContent = corrected;
    }
  } else {
    await regenerate();
  }
}

/** 👍: preferred to the answer it replaced, or else a pair to imitate. */
async function thumbsUp() {
  const answer = state.messages[state.lastAnswer.index].content;
  if (state.replaced !== null) {
    if (await sendPreference(answer, state.replaced)) state.replaced = null;
  } else {
    await sendFeedback(answer);
  }
}

/** Streams a chat answer into `bubble`, then shows what answered and how fast. */
async function streamAnswer(body, bubble) {
  const started = performance.now();
  const response = await api("POST", "/v1/chat/completions", body, { raw: true });
  if (!response.ok) {
    const error = await response.json().catch(() => null);
    throw new Error(error && error.error ? error.error.message : response.statusText);
  }
  $("chat-stats").dataset.generations = response.headers.get("x-tessera-adapter-generations") || "";
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", answer = "", firstAt = null, usage = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        firstAt = firstAt || performance.now();
        answer += delta.content;
        bubble.textContent = answer;
      }
    }
  }
  const ended = performance.now();
  state.messages.push({ role: "assistant", content: answer });
  state.lastAnswer = { bubble, index: state.messages.length - 1 };
  const tokens = usage ? usage.completion_tokens : 0;
  const rate = firstAt && ended > firstAt ? (tokens / ((ended - firstAt) / 1000)).toFixed(1) : "–";
  const ttft = firstAt ? `${Math.round(firstAt - started)} ms` : "–";
  const generations = $("chat-stats").dataset.generations || "the base model";
  const mix = (body.adapters || []).map((a) => `${a.name} ×${a.scale.toFixed(2)}`).join(", ");
  $("chat-stats").textContent = `Answered by ${generations}${mix ? ` (mix: ${mix})` : ""}; ${tokens} tokens, ${rate} tok/s, first token after ${ttft}`;
  $("corrected").value = answer;
  $("feedback-result").textContent = "";
  $("correction").hidden = !allows("tune");
}

/** Sends the conversation, its last reply replaced by `reply`, as one feedback pair. */
async function sendFeedback(reply) {
  const target = $("feedback-target").value || $("feedback-new").value.trim();
  if (!target) {
    $("feedback-result").textContent = "Choose an adapter or name a new one.";
    return;
  }
  const system = $("system").value.trim();
  const turns = state.messages.slice(0, state.lastAnswer.index).concat([{ role: "assistant", content: reply }]);
  const messages = (system ? [{ role: "system", content: system }] : []).concat(turns);
  try {
    // A new adapter is created of the chosen kind; an existing one keeps its own.
    const creating = !$("feedback-target").value;
    const query = creating ? `?method=${encodeURIComponent($("feedback-method").value)}` : "";
    const { data } = await api("POST", `/v1/adapters/${encodeURIComponent(target)}/feedback${query}`, { messages });
    state.messages[state.lastAnswer.index].content = reply;
    state.lastAnswer.bubble.textContent = reply;
    $("feedback-result").textContent = `Stored in ${data.adapter}: ${data.stored} new pair(s), ${data.total_pairs} in all` +
      (data.job ? `; training job ${data.job} started` : "");
    if (!state.adapters.includes(target)) await loadModels();
  } catch (e) {
    $("feedback-result").textContent = `Refused: ${e.message}`;
  }
}

// ---- Adapters ----

async function refreshAdapters() {
  const { data } = await api("GET", "/v1/adapters");
  const rows = data.data.map((a) => {
    const loss = a.metrics && a.metrics.held_out_loss != null ? Number(a.metrics.held_out_loss).toFixed(4) : "–";
    const row = tableRow([a.name, kindName(a.kind), a.version ?? "–", a.pairs ?? "–", a.training ? "training" : "idle", loss]);
    const actions = document.createElement("td");
    actions.append(button(`Details of ${a.name}`, "Details", () => showAdapter(a.name)),
      button(`Delete ${a.name}`, "Delete", () => deleteAdapter(a.name)));
    row.append(actions);
    return row;
  });
  $("adapters-table").tBodies[0].replaceChildren(...rows);
}

/** An adapter kind as people write it. */
function kindName(kind) {
  return { lora: "LoRA", dora: "DoRA", ia3: "IA³" }[kind] || "–";
}

/** A table row of text cells. */
function tableRow(texts) {
  const row = document.createElement("tr");
  for (const text of texts) {
    const cell = document.createElement("td");
    cell.textContent = text;
    row.append(cell);
  }
  return row;
}

function button(label, text, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

async function showAdapter(name) {
  const { data } = await api("GET", `/v1/adapters/${encodeURIComponent(name)}`);
  $("adapter-detail").hidden = false;
  $("adapter-detail").dataset.adapter = name;
  $("detail-title").textContent = `${name}: version ${data.version ?? "–"} served`;
  const versions = (data.history || []).map((v) => {
    const m = v.metrics || {};
    const row = tableRow([v.version, m.held_out_loss != null ? Number(m.held_out_loss).toFixed(4) : "–", m.trained_tokens ?? "–", v.version === data.version ? "yes" : ""]);
    const action = document.createElement("td");
    if (v.version !== data.version) action.append(button(`Serve version ${v.version}`, "Roll back to this", () => rollback(name, v.version)));
    row.append(action);
    return row;
  });
  $("versions-table").tBodies[0].replaceChildren(...versions);
  const pairs = data.version !== null && data.version !== undefined ? (await api("GET", `/v1/adapters/${encodeURIComponent(name)}/feedback?limit=200`)).data.data : [];
  $("pairs").replaceChildren(...pairs.map((p) => {
    const item = document.createElement("li");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.id = `pair-${p.id}`;
    box.value = p.id;
    const label = document.createElement("label");
    label.htmlFor = box.id;
    label.textContent = p.messages.map((m) => `${m.role}: ${m.content}`).join(" | ");
    item.append(box, label);
    return item;
  }));
}

async function rollback(name, version) {
  try {
    await api("POST", `/v1/adapters/${encodeURIComponent(name)}/rollback`, { version });
    $("detail-result").textContent = `Version ${version} of ${name} is served.`;
    await showAdapter(name);
    await refreshAdapters();
  } catch (e) {
    $("detail-result").textContent = `Refused: ${e.message}`;
  }
}

async function deletePairs() {
  const name = $("adapter-detail").dataset.adapter;
  const ids = [...document.querySelectorAll("#pairs input:checked")].map((b) => b.value);
  if (!ids.length) return;
  try {
    const { data } = await api("DELETE", `/v1/adapters/${encodeURIComponent(name)}/feedback?ids=${ids.join(",")}`);
    $("detail-result").textContent = `Deleted ${data.deleted} pair(s).`;
    await showAdapter(name);
  } catch (e) {
    $("detail-result").textContent = `Refused: ${e.message}`;
  }
}

async function deleteAdapter(name) {
  if (!window.confirm(`Delete the adapter ${name}?`)) return;
  try {
    await api("DELETE", `/v1/adapters/${encodeURIComponent(name)}`);
    await refreshAdapters();
    await loadModels();
  } catch (e) {
    $("upload-result").textContent = `Refused: ${e.message}`;
  }
}

async function uploadAdapter(event) {
  event.preventDefault();
  const form = new FormData();
  form.append("name", $("upload-name").value.trim());
  for (const file of $("upload-files").files) {
    const field = file.name.endsWith(".gguf") ? "gguf"
      : file.name === "adapter_config.json" ? "adapter_config"
      : file.name.endsWith(".safetensors") ? "adapter_model" : "archive";
    form.append(field, file, file.name);
  }
  $("upload-result").textContent = "Uploading…";
  try {
    const { data } = await api("POST", "/v1/adapters", form);
    $("upload-result").textContent = `Uploaded ${data.name}.`;
    await refreshAdapters();
    await loadModels();
  } catch (e) {
    $("upload-result").textContent = `Refused: ${e.message}`;
  }
}

// ---- Training ----

async function refreshJobs() {
  const { data } = await api("GET", "/v1/fine_tuning/jobs");
  $("jobs-table").tBodies[0].replaceChildren(...data.data.map((j) => {
    const row = tableRow([j.id, j.fine_tuned_model || j.model, j.status]);
    const action = document.createElement("td");
    action.append(button(`Follow job ${j.id}`, "Follow", () => follow(j.id)));
    row.append(action);
    return row;
  }));
}

async function startAdapterJob(event) {
  event.preventDefault();
  $("training-error").textContent = "";
  try {
    const { data } = await api("POST", `/v1/adapters/${encodeURIComponent($("train-adapter").value)}/train`, {});
    follow(data.id);
  } catch (e) {
    $("training-error").textContent = e.message;
  }
}

async function startFileJob(event) {
  event.preventDefault();
  $("training-error").textContent = "";
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", $("job-file").files[0]);
  try {
    const { data: file } = await api("POST", "/v1/files", form);
    const { data } = await api("POST", "/v1/fine_tuning/jobs", { model: state.baseModel.id, training_file: file.id, suffix: $("job-suffix").value || undefined });
    follow(data.id);
  } catch (e) {
    $("training-error").textContent = e.message;
  }
}

function follow(id) {
  clearInterval(state.jobTimer);
  state.job = { id, points: [], heldOut: [], decision: "" };
  $("job").hidden = false;
  $("job-id").textContent = id;
  pollJob();
  state.jobTimer = setInterval(pollJob, 1000);
}

async function pollJob() {
  const job = state.job;
  try {
    const [{ data: info }, { data: events }] = await Promise.all([
      api("GET", `/v1/fine_tuning/jobs/${job.id}`),
      api("GET", `/v1/fine_tuning/jobs/${job.id}/events?limit=1000`),
    ]);
    const ordered = [...events.data].sort((a, b) => a.created_at - b.created_at);
    // One point per step, in step order (a resumed job repeats the steps after its checkpoint).
    const byStep = new Map(ordered.filter((e) => e.data && e.data.train_loss != null).map((e) => [e.data.step, e.data]));
    job.points = [...byStep.values()].sort((a, b) => a.step - b.step);
    job.heldOut = ordered.filter((e) => e.data && e.data.held_out_loss != null && e.data.current_held_out_loss !== undefined);
    const decision = ordered.filter((e) => /promoting|keeping the current version|is now served/.test(e.message)).map((e) => e.message);
    $("job-status").textContent = info.status;
    const last = job.points[job.points.length - 1];
    if (last) {
      $("job-progress").value = last.step / last.total_steps;
      const perStep = last.seconds / last.step;
      $("job-eta").textContent = info.status === "running" ? `step ${last.step}/${last.total_steps}, about ${Math.ceil(perStep * (last.total_steps - last.step))} s left` : `step ${last.step}/${last.total_steps}`;
    }
    $("job-decision").textContent = decision.join(" — ") || (info.error ? info.error.message : "");
    $("cancel-job").hidden = !["queued", "running", "validating_files"].includes(info.status);
    drawChart(job);
    if (["succeeded", "failed", "cancelled"].includes(info.status)) {
      clearInterval(state.jobTimer);
      refreshJobs();
    }
  } catch (e) {
    $("training-error").textContent = e.message;
    clearInterval(state.jobTimer);
  }
}

/** Loss against step as SVG: a line of training losses and a dot per held-out evaluation. */
function drawChart(job) {
  const svg = $("loss-chart");
  const ns = "http://www.w3.org/2000/svg";
  const points = job.points;
  svg.dataset.points = String(points.length);
  svg.replaceChildren();
  if (!points.length) return;
  const losses = points.map((p) => p.train_loss).concat(job.heldOut.map((e) => e.data.held_out_loss));
  const [lo, hi] = [Math.min(...losses), Math.max(...losses)];
  const total = points[points.length - 1].total_steps;
  const x = (step) => 40 + (540 * step) / Math.max(total, 1);
  const y = (loss) => 220 - (200 * (loss - lo)) / Math.max(hi - lo, 1e-6);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("class", "train");
  line.setAttribute("points", points.map((p) => `${x(p.step)},${y(p.train_loss)}`).join(" "));
  svg.append(line);
  for (const e of job.heldOut) {
    const dot = document.createElementNS(ns, "circle");
    dot.setAttribute("class", "held-out");
    dot.setAttribute("cx", x(total));
    dot.setAttribute("cy", y(e.data.held_out_loss));
    dot.setAttribute("r", 4);
    svg.append(dot);
  }
  for (const [value, at] of [[hi, 20], [lo, 220]]) {
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", 2);
    label.setAttribute("y", at);
    label.textContent = value.toFixed(3);
    svg.append(label);
  }
}

async function cancelJob() {
  try {
    await api("POST", `/v1/fine_tuning/jobs/${state.job.id}/cancel`);
    pollJob();
  } catch (e) {
    $("training-error").textContent = e.message;
  }
}

// ---- Plugins and server ----

async function refreshPlugins() {
  const { data } = await api("GET", "/v1/plugins");
  $("plugins-table").tBodies[0].replaceChildren(...data.data.map((p) => {
    const row = tableRow([p.name, p.version || "–", p.status === "ready" ? "ready" : `failed: ${p.error}`]);
    const actions = document.createElement("td");
    actions.append(button(`Reload ${p.name}`, "Reload", () => pluginAction(p.name, "reload")),
      button(`Unload ${p.name}`, "Unload", () => pluginAction(p.name, "unload")));
    row.append(actions);
    return row;
  }));
}

async function pluginAction(name, action) {
  try {
    await api("POST", `/v1/plugins/${encodeURIComponent(name)}/${action}`);
    $("plugin-result").textContent = `${action === "reload" ? "Reloaded" : "Unloaded"} ${name}.`;
  } catch (e) {
    $("plugin-result").textContent = `Refused: ${e.message}`;
  }
  refreshPlugins();
  loadModels();
}

async function loadPlugin(event) {
  event.preventDefault();
  try {
    const { data } = await api("POST", "/v1/plugins/load", { path: $("plugin-path").value });
    $("plugin-result").textContent = `Loaded ${data.name}.`;
  } catch (e) {
    $("plugin-result").textContent = `Refused: ${e.message}`;
  }
  refreshPlugins();
  loadModels();
}

/** Sums of each metric's samples in Prometheus text. */
function parseMetrics(text) {
  const sums = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const name = line.split(/[{ ]/)[0];
    const value = Number(line.slice(line.lastIndexOf(" ") + 1));
    if (!Number.isNaN(value)) sums[name] = (sums[name] || 0) + value;
  }
  return sums;
}

async function refreshMetrics() {
  if (!$("panel-server") || $("panel-server").hidden) return;
  const { data } = await api("GET", "/metrics");
  const now = { at: performance.now(), sums: parseMetrics(data) };
  const before = state.metrics;
  const rate = (name) => before ? ((now.sums[name] || 0) - (before.sums[name] || 0)) / ((now.at - before.at) / 1000) : 0;
  const stats = [
    ["Requests/s", rate("tessera_requests_total").toFixed(2)],
    ["Tokens/s", rate("tessera_generated_tokens_total").toFixed(1)],
    ["Queue depth", now.sums.tessera_queue_depth ?? 0],
    ["Running batch", now.sums.tessera_running_sequences ?? 0],
    ["Memory (MiB)", ((now.sums.tessera_resident_memory_bytes || 0) / 2 ** 20).toFixed(0)],
    ["KV cache used (MiB)", ((now.sums.tessera_kv_cache_used_bytes || 0) / 2 ** 20).toFixed(1)],
  ];
  $("server-stats").replaceChildren(...stats.map(([name, value]) => {
    const box = document.createElement("div");
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = name;
    dd.textContent = value;
    box.append(dt, dd);
    return box;
  }));
  state.metrics = now;
}

// ---- Wiring ----

document.addEventListener("DOMContentLoaded", () => {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showPanel(tab.dataset.panel));
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("key-input").value.trim();
    sessionStorage.setItem(KEY_SLOT, state.key);
    $("key-input").value = "";
    start();
  });
  $("forget-key").addEventListener("click", () => { sessionStorage.removeItem(KEY_SLOT); window.location.reload(); });
  $("chat-form").addEventListener("submit", sendChat);
  $("user-message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("clear-chat").addEventListener("click", () => { state.messages = []; $("conversation").replaceChildren(); $("correction").hidden = true; });
  $("send-correction").addEventListener("click", () => sendFeedback($("corrected").value));
  $("thumbs-up").addEventListener("click", thumbsUp);
  $("thumbs-down").addEventListener("click", thumbsDown);
  $("feedback-target").addEventListener("change", () => {
    const existing = $("feedback-target").value !== "";
    $("feedback-new").disabled = existing;
    $("feedback-method").disabled = existing;
  });
  $("upload-form").addEventListener("submit", uploadAdapter);
  $("delete-pairs").addEventListener("click", deletePairs);
  $("train-form").addEventListener("submit", startAdapterJob);
  $("file-job-form").addEventListener("submit", startFileJob);
  $("cancel-job").addEventListener("click", cancelJob);
  $("plugin-load-form").addEventListener("submit", loadPlugin);
  setInterval(() => { refreshMetrics().catch(() => {}); }, 2000);
  start().catch((e) => { $("chat-error").textContent = e.message; });
});
