// The mlx playground: a chat over the server's own OpenAI endpoints (/v1/models,
// /v1/chat/completions, /v1/load_lora_adapter) and its /metrics. No framework, no build step.
"use strict";

const KEY_STORAGE = "mlx-playground-api-key";
const $ = (id) => document.getElementById(id);

const state = {
  models: [],          // ids from /v1/models: the base first, then the adapters
  panes: [],           // {model, messages: [{role, content}], el}
  controller: null,    // the AbortController of the generation in flight
};

// -- errors and the API key ------------------------------------------------------------------
function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

function apiKey() {
  return $("api-key").value.trim();
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey()) h.Authorization = `Bearer ${apiKey()}`;
  return h;
}

// The OpenAI error object's message, or the status line when the body is not one.
async function errorText(response) {
  const body = await response.text();
  try {
    const parsed = JSON.parse(body);
    if (parsed.error && parsed.error.message) return `${response.status}: ${parsed.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}: ${body.slice(0, 200)}`;
}

// -- models and panes ------------------------------------------------------------------------
async function loadModels() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (e) {
    showError(`cannot reach the server: ${e.message}`);
    return;
  }
  if (!response.ok) {
    showError(`listing the models failed: ${await errorText(response)}`);
    return;
  }
  showError("");
  const body = await response.json();
  state.models = body.data.map((m) => m.id);
  for (const pane of state.panes) fillModelSelect(pane);
}

function fillModelSelect(pane) {
  const select = pane.el.querySelector(".model");
  select.replaceChildren(...state.models.map((id, i) => {
    const option = document.createElement("option");
    option.value = id;
    option.textContent = i === 0 ? `${id} (base)` : id;
    return option;
  }));
  if (!state.models.includes(pane.model)) pane.model = state.models[0] || "";
  select.value = pane.model;
}

function addPane(model) {
  const el = $("pane-template").content.firstElementChild.cloneNode(true);
  const pane = { model: model || state.models[0] || "", messages: [], el };
  el.querySelector(".model").addEventListener("change", (e) => { pane.model = e.target.value; });
  el.querySelector(".close").addEventListener("click", () => removePane(pane));
  state.panes.push(pane);
  $("panes").appendChild(el);
  fillModelSelect(pane);
  layoutPanes();
  return pane;
}

function removePane(pane) {
  if (state.panes.length <= 1) return;
  state.panes.splice(state.panes.indexOf(pane), 1);
  pane.el.remove();
  layoutPanes();
}

function layoutPanes() {
  $("panes").classList.toggle("single", state.panes.length === 1);
  state.panes.forEach((pane, i) => { pane.el.dataset.pane = String(i); });
}

// Arena on: at least two panes, the second on the first adapter (else the base).
function setArena(on) {
  $("add-pane").hidden = !on;
  if (on) {
    while (state.panes.length < 2) addPane(state.models[state.panes.length] || state.models[0]);
  } else {
    while (state.panes.length > 1) removePane(state.panes[state.panes.length - 1]);
  }
}

function addMessage(pane, role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role === "assistant" ? pane.model : role;
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text;
  div.append(label, body);
  const list = pane.el.querySelector(".messages");
  list.appendChild(div);
  list.scrollTop = list.scrollHeight;
  return div;
}

// -- generation ------------------------------------------------------------------------------
function samplingFields() {
  const fields = {
    temperature: Number($("temperature").value || 0),
    top_p: Number($("top-p").value || 1),
    max_tokens: Math.max(1, Math.round(Number($("max-tokens").value || 128))),
  };
  if ($("seed").value !== "") fields.seed = Math.round(Number($("seed").value));
  return fields;
}

// The server-sent events of a streamed response, one parsed JSON payload at a time.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function showStats(pane, s) {
  const parts = [];
  if (s.ttft !== null) parts.push(`TTFT ${Math.round(s.ttft)} ms`);
  if (s.tokensPerSecond !== null) parts.push(`${s.tokensPerSecond.toFixed(1)} tok/s`);
  parts.push(`${s.tokens} tokens`);
  if (s.note) parts.push(s.note);
  const el = pane.el.querySelector(".stats");
  el.textContent = parts.join(" · ");
  el.dataset.tokens = String(s.tokens);
  el.dataset.ttftMs = s.ttft === null ? "" : String(Math.round(s.ttft));
}

// Stream one pane's answer; resolves when it ends (finished, stopped or failed).
async function streamAnswer(pane, signal) {
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...pane.messages]
    : [...pane.messages];
  const bubble = addMessage(pane, "assistant", "");
  const content = bubble.querySelector(".content");
  const list = pane.el.querySelector(".messages");
  const stats = { ttft: null, tokensPerSecond: null, tokens: 0, note: "" };
  const started = performance.now();
  let first = null;
  let text = "";
  showStats(pane, stats);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal,
      body: JSON.stringify({ model: pane.model, messages, stream: true,
                             stream_options: { include_usage: true }, ...samplingFields() }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) stats.tokens = chunk.usage.completion_tokens;
      const choice = chunk.choices && chunk.choices[0];
      const piece = choice && choice.delta && choice.delta.content;
      if (first === null && (piece || (choice && choice.finish_reason))) {
        first = performance.now();  // the first token (an end-of-sequence one has no text)
        stats.ttft = first - started;
      }
      if (piece) {
        const now = performance.now();
        text += piece;
        content.textContent = text;
        stats.tokens += 1;  // a chunk per token while streaming; usage corrects it at the end
        if (stats.tokens > 1) stats.tokensPerSecond = (stats.tokens - 1) / ((now - first) / 1000);
        list.scrollTop = list.scrollHeight;
        showStats(pane, stats);
      }
      if (choice && choice.finish_reason) stats.note = choice.finish_reason;
    }
    showStats(pane, stats);
    bubble.dataset.done = "true";
  } catch (e) {
    if (e.name === "AbortError") {
      stats.note = "stopped";
      bubble.dataset.done = "stopped";
    } else {
      bubble.classList.add("failed");
      content.textContent = text ? `${text}\n[${e.message}]` : e.message;
      bubble.dataset.done = "failed";
      showError(`${pane.model}: ${e.message}`);
    }
    showStats(pane, stats);
  }
  if (text) pane.messages.push({ role: "assistant", content: text });
}

async function send() {
  const prompt = $("prompt").value;
  if (!prompt.trim() || state.controller) return;
  if (!state.models.length) await loadModels();
  if (!state.models.length) return;
  showError("");
  $("prompt").value = "";
  for (const pane of state.panes) {
    pane.messages.push({ role: "user", content: prompt });
    addMessage(pane, "user", prompt);
  }
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  try {
    // One request per pane, all at once: the engine batches them together.
    await Promise.all(state.panes.map((pane) => streamAnswer(pane, state.controller.signal)));
  } finally {
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    $("prompt").focus();
  }
}

// -- adapters --------------------------------------------------------------------------------
async function loadAdapter(event) {
  event.preventDefault();
  const name = $("lora-name").value.trim();
  const path = $("lora-path").value.trim();
  const response = await fetch("/v1/load_lora_adapter", {
    method: "POST", headers: headers(), body: JSON.stringify({ lora_name: name, lora_path: path }),
  });
  if (!response.ok) {
    const why = response.status === 404
      ? "404: this server does not load adapters at run time; start it with --allow-runtime-lora"
      : await errorText(response);
    showError(`loading adapter '${name}' failed: ${why}`);
    return;
  }
  showError("");
  await loadModels();
  const pane = state.panes[state.panes.length - 1];
  pane.model = name;
  fillModelSelect(pane);
}

// -- the engine panel (Prometheus text from /metrics) -------------------------------------------
function parseMetrics(text) {
  // data-parallel replicas report one sample each ({replica="i"}): counts add up, rates average
  const values = {}, samples = {};
  for (const line of text.split("\n")) {
    const match = /^mlx_serve_(\w+)(?:\{replica="\d+"\})? ([-+0-9.eE]+|NaN)$/.exec(line);
    if (!match) continue;
    values[match[1]] = (values[match[1]] || 0) + Number(match[2]);
    samples[match[1]] = (samples[match[1]] || 0) + 1;
  }
  for (const name of Object.keys(values)) {
    if (/_(rate|ratio)$/.test(name)) values[name] /= samples[name];
  }
  return values;
}

async function refreshEngine() {
  let values;
  try {
    const response = await fetch("/metrics");
    if (!response.ok) return;
    values = parseMetrics(await response.text());
  } catch (_) {
    return;  // the server went away; the chat shows that error when it is used
  }
  $("engine-running").textContent = values.num_seqs_running;
  $("engine-waiting").textContent = values.num_seqs_waiting;
  $("engine-kv").textContent = `${values.kv_blocks_used} / ${values.kv_blocks_total}`;
  $("engine-prefix").textContent = `${(100 * values.prefix_cache_hit_rate).toFixed(0)}%`;
  $("engine-throughput").textContent = `${values.generation_tokens_per_second.toFixed(1)} tok/s`;
}

// -- wiring ----------------------------------------------------------------------------------
function init() {
  // `mlx playground` passes the key in the URL fragment (never sent to the server).
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("api_key");
  if (fromHash !== null) {
    localStorage.setItem(KEY_STORAGE, fromHash);
    history.replaceState(null, "", location.pathname);
  }
  $("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem(KEY_STORAGE, apiKey());
    loadModels();
  });
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("arena").addEventListener("change", (e) => setArena(e.target.checked));
  $("add-pane").addEventListener("click", () => addPane());
  $("clear").addEventListener("click", () => {
    for (const pane of state.panes) {
      pane.messages = [];
      pane.el.querySelector(".messages").replaceChildren();
      pane.el.querySelector(".stats").textContent = "";
    }
  });
  $("load-form").addEventListener("submit", loadAdapter);
  addPane();
  loadModels();
  refreshEngine();
  setInterval(refreshEngine, 1000);
  $("prompt").focus();
}

init();
