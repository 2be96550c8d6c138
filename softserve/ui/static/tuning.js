// Tuning page: create a job from uploaded JSONL (errors with line numbers), live loss/eval curves,
// cancel, and open the result in the playground.

import { api, el, fmt, formatTime, session, toast } from "./api.js";
import { legend, lineChart, newSvg } from "./charts.js";
import { setupDropzone } from "./registry.js";

const ROLES = ["system", "user", "assistant"];
const MAX_LISTED_ERRORS = 20;
let selectedId = null;
let timer = null;
let visible = false;

// The same checks the server makes (softserve/tuning/data.py), but every line at once, before uploading.
function recordError(obj) {
  if (obj === null || typeof obj !== "object" || Array.isArray(obj)) return "expected a JSON object";
  if ("messages" in obj) {
    if ("prompt" in obj || "completion" in obj) return "use either 'messages' or 'prompt'/'completion', not both";
    const msgs = obj.messages;
    if (!Array.isArray(msgs) || !msgs.length) return "'messages' must be a non-empty list";
    for (const [i, m] of msgs.entries()) {
      if (m === null || typeof m !== "object" || Array.isArray(m)) return `messages[${i}] must be an object with 'role' and 'content'`;
      if (!ROLES.includes(m.role)) return `messages[${i}].role must be one of ${ROLES.join(", ")}`;
      if (typeof m.content !== "string") return `messages[${i}].content must be a string`;
    }
    if (!msgs.some((m) => m.role === "assistant" && m.content.trim())) return "'messages' has no non-empty assistant turn to learn from";
    if (msgs[0].role === "assistant") return "'messages' must not start with an assistant turn";
    return null;
  }
  const missing = ["prompt", "completion"].filter((k) => !(k in obj));
  if (missing.length) return `missing field(s) ${missing.join(", ")}: each line needs 'prompt' and 'completion', or 'messages'`;
  if (typeof obj.prompt !== "string" || typeof obj.completion !== "string") return "'prompt' and 'completion' must be strings";
  if (!obj.completion.trim()) return "'completion' is empty: nothing to learn";
  return null;
}

export function validateJsonl(text, source) {
  const errors = [];
  let examples = 0;
  text.split("\n").forEach((raw, index) => {
    const line = raw.replace(/\r$/, "");
    if (!line.trim()) return;
    let obj;
    try {
      obj = JSON.parse(line);
    } catch (e) {
      errors.push(`${source}, line ${index + 1}: invalid JSON (${e.message})`);
      return;
    }
    const problem = recordError(obj);
    if (problem) errors.push(`${source}, line ${index + 1}: ${problem}`);
    else examples += 1;
  });
  if (!errors.length && !examples) errors.push(`${source}: no examples (the file is empty)`);
  return errors;
}

function showErrors(errors) {
  const box = document.getElementById("tune-errors");
  box.replaceChildren();
  if (!errors.length) return;
  const shown = errors.slice(0, MAX_LISTED_ERRORS);
  box.append(el("p", {}, `${errors.length} problem${errors.length === 1 ? "" : "s"} in the data:`),
    el("ul", { "data-role": "errors" }, shown.map((e) => el("li", {}, e))),
    errors.length > shown.length ? el("p", {}, `…and ${errors.length - shown.length} more.`) : null);
}

async function uploadFile(file) {
  const form = new FormData();
  form.append("purpose", "tune");
  form.append("file", file, file.name);
  return api("/v1/files", { form });
}

async function submit(event) {
  event.preventDefault();
  const form = event.target;
  const errors = [];
  const name = document.getElementById("tune-name");
  const train = document.getElementById("tune-train").files[0];
  const evalFile = document.getElementById("tune-eval").files[0];
  if (!name.value.trim() || !name.checkValidity()) errors.push("Prompt name: letters, digits, '.', '_' or '-' (up to 64).");
  if (!train) errors.push("Choose a training JSONL file.");
  for (const input of form.querySelectorAll("input[type=number]")) {
    if (!input.checkValidity() || input.value === "") errors.push(`${input.labels[0].textContent}: ${input.validationMessage || "required"}`);
  }
  if (!errors.length) {
    errors.push(...validateJsonl(await train.text(), train.name));
    if (evalFile) errors.push(...validateJsonl(await evalFile.text(), evalFile.name));
  }
  showErrors(errors);
  if (errors.length) return;
  const button = document.getElementById("tune-submit");
  button.disabled = true;
  try {
    const trainMeta = await uploadFile(train);
    const evalMeta = evalFile ? await uploadFile(evalFile) : null;
    const num = (id) => Number(document.getElementById(id).value);
    const init = document.getElementById("tune-init").value;
    const body = {
      name: name.value.trim(), training_file: trainMeta.id, num_virtual_tokens: num("tune-k"), init,
      steps: num("tune-steps"), learning_rate: num("tune-lr"), batch_size: num("tune-batch"), seed: num("tune-seed"),
      eval_every: num("tune-eval-every"),
    };
    if (init === "text") body.init_text = document.getElementById("tune-init-text").value;
    if (evalMeta) body.validation_file = evalMeta.id;
    const job = await api("/v1/tuning/jobs", { json: body });
    toast(`Started ${job.id}`);
    selectedId = job.id;
    await refreshJobs();
  } catch (e) {
    showErrors([e.message]);  // the server's message names the file and line
  } finally {
    button.disabled = false;
  }
}

function renderDetail(job) {
  const box = document.getElementById("tune-detail");
  const running = job.status === "queued" || job.status === "running";
  const svg = newSvg();
  svg.id = "tune-chart";
  const loss = job.loss_curve.map((p) => [p.step, p.loss]);
  const evalLoss = job.eval_curve.map((p) => [p.step, p.eval_loss]);
  const series = [{ name: "training loss", points: loss }];
  if (evalLoss.length) series.push({ name: "eval loss", points: evalLoss });
  const last = loss.length ? loss[loss.length - 1][1] : null;
  lineChart(svg, series, {
    label: `Loss curve of ${job.name}`, width: 760, height: 240, xMin: 0, xMax: job.total_steps, xLabel: (x) => `step ${Math.round(x)}`,
    summary: loss.length ? `${loss.length} points, training loss ${fmt(last, 3)} at step ${job.step}` : "no points yet",
  });
  const actions = el("div", { class: "toolbar" },
    running ? el("button", { type: "button", class: "danger", onclick: () => cancel(job) }, "Cancel job") : null,
    job.fine_tuned_model ? el("button", { type: "button", onclick: () => { session.pendingModel = job.fine_tuned_model; location.hash = "#playground"; } },
      "Open in playground") : null);
  const metrics = job.metrics || {};
  box.replaceChildren(...[
    el("h2", {}, `${job.name} `, el("span", { class: `status-${job.status}`, "data-role": "job-status" }, job.status)),
    el("p", { class: "muted" }, `${job.id} · created ${formatTime(job.created_at)} · ${job.num_examples.train} training / ${job.num_examples.validation} validation examples`),
    el("progress", { max: job.total_steps, value: job.step, "aria-label": "Training progress" }),
    el("p", {}, `Step ${job.step} of ${job.total_steps}` +
      (job.loss !== null ? ` · loss ${fmt(job.loss, 4)}` : "") +
      (metrics.eval_loss !== undefined ? ` · eval loss ${fmt(metrics.eval_loss, 4)}` : "") +
      (metrics.eval_accuracy !== undefined && metrics.eval_accuracy !== null ? ` · eval accuracy ${fmt(100 * metrics.eval_accuracy, 1, "%")}` : "") +
      (job.eta_seconds !== null ? ` · about ${Math.ceil(job.eta_seconds)} s left` : "") +
      (job.queue_position ? ` · position ${job.queue_position} in the queue` : "")),
    el("figure", { class: "chart" }, el("figcaption", {}, "Loss"), svg, legend(series.map((s) => s.name))),
    job.fine_tuned_model ? el("p", {}, "Result: ", el("code", { "data-role": "result" }, job.fine_tuned_model)) : null,
    job.error ? el("p", { class: "error" }, `Error: ${job.error.message || JSON.stringify(job.error)}`) : null,
    actions].filter(Boolean));
}

async function cancel(job) {
  try {
    await api(`/v1/tuning/jobs/${job.id}/cancel`, { method: "POST" });
    toast(`Cancelling ${job.id}`);
  } catch (e) {
    toast(`Cancel failed: ${e.message}`);
  }
  await refreshJobs();
}

function renderJobs(jobs) {
  const list = document.getElementById("tune-jobs");
  if (!jobs.length) {
    list.replaceChildren(el("li", { class: "muted" }, "No jobs yet."));
    return;
  }
  list.replaceChildren(...jobs.map((job) => el("li", {},
    el("button", { type: "button", "aria-current": job.id === selectedId ? "true" : "false", "data-job": job.id,
      onclick: () => { selectedId = job.id; refreshJobs(); } },
    `${job.name} — `, el("span", { class: `status-${job.status}` }, job.status), ` (${job.step}/${job.total_steps})`))));
}

async function refreshJobs() {
  clearTimeout(timer);
  let active = false;
  try {
    const jobs = (await api("/v1/tuning/jobs?limit=50")).data;
    if (!selectedId && jobs.length) selectedId = jobs[0].id;
    renderJobs(jobs);
    const job = jobs.find((j) => j.id === selectedId);
    if (job) renderDetail(job);
    active = jobs.some((j) => j.status === "queued" || j.status === "running");
  } catch (e) {
    document.getElementById("tune-detail").replaceChildren(el("p", { class: "error" }, `Could not load jobs: ${e.message}`));
  }
  if (visible) timer = setTimeout(refreshJobs, active ? 1000 : 5000);
}

export function init() {
  document.getElementById("tune-form").addEventListener("submit", submit);
  document.getElementById("tune-refresh").addEventListener("click", refreshJobs);
  document.getElementById("tune-init").addEventListener("change", (e) => {
    document.getElementById("tune-init-text").disabled = e.target.value !== "text";
  });
  for (const kind of ["train", "eval"]) {
    setupDropzone(document.getElementById(`tune-${kind}-drop`), document.getElementById(`tune-${kind}`), () => showErrors([]));
  }
}

export function show() {
  if (session.info && session.info.max_virtual_tokens) document.getElementById("tune-k").max = session.info.max_virtual_tokens;
  visible = true;
  return refreshJobs();
}

export function hide() {
  visible = false;
  clearTimeout(timer);
}
