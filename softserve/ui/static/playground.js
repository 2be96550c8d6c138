// Playground: one input, up to four columns (base model, prompts, pinned versions) streamed side by side
// with the same sampling settings; time to first token, tokens/s and virtual tokens per column.

import { api, apiAll, el, fmt, session, streamEvents } from "./api.js";

const MAX_COLUMNS = 4;
let columns = [];  // {model: input, output, stats: {...}, controller}
let nextId = 0;

function baseModel() {
  return (session.info && session.info.model) || "";
}

async function loadModels() {
  const list = document.getElementById("play-models");
  try {
    const [models, prompts] = await Promise.all([api("/v1/models"), apiAll("/v1/prompts")]);
    const options = new Set(models.data.map((m) => m.id));
    for (const p of prompts.data) options.add(p.ref);  // pinned latest version too
    list.replaceChildren(...[...options].map((id) => el("option", { value: id })));
    return models.data;
  } catch (_) {
    return [];
  }
}

function stat(dl, key, label) {
  const dd = el("dd", { "data-stat": key }, "–");
  dl.append(el("dt", {}, label), dd);
  return dd;
}

function addColumn(model = "") {
  if (columns.length >= MAX_COLUMNS) return null;
  const id = nextId++;
  const input = el("input", { id: `play-model-${id}`, list: "play-models", value: model, required: true, spellcheck: "false",
    "aria-describedby": `play-model-hint-${id}` });
  const output = el("output", { "data-role": "text", "aria-live": "off", "aria-label": "Generated text" });
  const dl = el("dl", { class: "stats" });
  const stats = {
    status: stat(dl, "status", "Status"),
    ttft: stat(dl, "ttft", "Time to first token"),
    rate: stat(dl, "tokens_per_s", "Tokens/s (decode)"),
    tokens: stat(dl, "tokens", "Generated tokens"),
    virtual: stat(dl, "virtual_tokens", "Virtual tokens"),
  };
  const column = { id, model: input, output, stats, controller: null };
  const removeButton = el("button", { type: "button", class: "link", "aria-label": `Remove column ${columns.length + 1}`,
    onclick: () => removeColumn(column) }, "Remove");
  column.node = el("section", { class: "column", "data-column": id, "aria-label": `Column ${columns.length + 1}` },
    el("div", { class: "head" }, el("label", { for: input.id }, "Model or prompt"), removeButton),
    input,
    el("small", { id: `play-model-hint-${id}`, class: "muted" }, "base model, name, name@version or public/name"),
    output, dl);
  columns.push(column);
  document.getElementById("play-columns").append(column.node);
  document.getElementById("play-add").disabled = columns.length >= MAX_COLUMNS;
  return column;
}

function removeColumn(column) {
  if (column.controller) column.controller.abort();
  columns = columns.filter((c) => c !== column);
  column.node.remove();
  document.getElementById("play-add").disabled = false;
  columns.forEach((c, i) => {
    c.node.setAttribute("aria-label", `Column ${i + 1}`);
    c.node.querySelector(".head button").setAttribute("aria-label", `Remove column ${i + 1}`);
  });
  if (columns.length) columns[0].model.focus();
}

function settings() {
  const num = (id) => Number(document.getElementById(id).value);
  return {
    mode: document.querySelector("input[name=mode]:checked").value,
    text: document.getElementById("play-input").value,
    max_tokens: num("play-max-tokens"),
    temperature: num("play-temperature"),
    top_p: num("play-top-p"),
    seed: num("play-seed"),
  };
}

async function runColumn(column, s) {
  const { output, stats } = column;
  column.controller = new AbortController();
  output.textContent = "";
  for (const k of ["ttft", "rate", "tokens", "virtual"]) stats[k].textContent = "–";
  stats.status.textContent = "waiting…";
  const model = column.model.value.trim();
  const common = { model, max_tokens: s.max_tokens, temperature: s.temperature, top_p: s.top_p, seed: s.seed,
    stream: true, stream_options: { include_usage: true } };
  const [path, payload] = s.mode === "chat"
    ? ["/v1/chat/completions", { ...common, messages: [{ role: "user", content: s.text }] }]
    : ["/v1/completions", { ...common, prompt: s.text }];
  const started = performance.now();
  let first = null, chunks = 0, usage = null, finish = null;
  try {
    for await (const event of streamEvents(path, payload, column.controller.signal)) {
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        const text = s.mode === "chat" ? (choice.delta && choice.delta.content) || "" : choice.text || "";
        if (text) {
          if (first === null) {
            first = performance.now();
            stats.ttft.textContent = fmt(first - started, 0, " ms");
            stats.status.textContent = "streaming…";
          }
          chunks += 1;
          output.textContent += text;
          stats.tokens.textContent = `${chunks}…`;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    const end = performance.now();
    const generated = usage ? usage.completion_tokens : chunks;
    stats.tokens.textContent = String(generated);
    stats.virtual.textContent = usage ? String(usage.virtual_tokens ?? 0) : "–";
    if (first !== null && generated > 1 && end > first) stats.rate.textContent = fmt((generated - 1) / ((end - first) / 1000), 1);
    stats.status.textContent = `done (${finish || "stop"})`;
  } catch (e) {
    stats.status.textContent = e.name === "AbortError" ? "stopped" : `error: ${e.message}`;
  } finally {
    column.controller = null;
  }
}

async function run(event) {
  event.preventDefault();
  const s = settings();
  if (!columns.length) addColumn(baseModel());
  const runButton = document.getElementById("play-run");
  const stopButton = document.getElementById("play-stop");
  runButton.disabled = true;
  stopButton.disabled = false;
  try {
    await Promise.all(columns.map((c) => runColumn(c, s)));  // concurrently: they share the batch
  } finally {
    runButton.disabled = false;
    stopButton.disabled = true;
  }
}

function setMode() {
  const chat = document.querySelector("input[name=mode]:checked").value === "chat";
  document.getElementById("play-input-label").textContent = chat ? "User message" : "Prompt";
}

export function init() {
  document.getElementById("play-form").addEventListener("submit", run);
  document.getElementById("play-stop").addEventListener("click", () => columns.forEach((c) => c.controller && c.controller.abort()));
  document.getElementById("play-add").addEventListener("click", () => {
    const c = addColumn("");
    if (c) c.model.focus();
  });
  for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", setMode);
}

export async function show() {
  const models = await loadModels();
  if (!columns.length) {
    addColumn(baseModel());
    const firstPrompt = models.find((m) => m.id !== baseModel());
    addColumn(session.pendingModel || (firstPrompt ? firstPrompt.id : ""));
  } else if (session.pendingModel) {
    const target = columns.slice(1).find((c) => !c.model.value.trim())
      || (columns.length < MAX_COLUMNS ? addColumn("") : columns[columns.length - 1]);
    target.model.value = session.pendingModel;
  }
  session.pendingModel = null;
}
