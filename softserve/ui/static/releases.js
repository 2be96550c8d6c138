// Releases page: a prompt's aliases and splits, its versions with per-version numbers side by side,
// and a form that moves or splits an alias (PUT /v1/prompts/{name}/aliases/{alias}).

import { api, apiAll, confirmDialog, el, fmt, formatTime, session, toast } from "./api.js";

const MAX_ARMS = 8;
let current = null; // {id, versions, aliases} of the prompt on screen

function encodeRef(ref) {
  return ref.split("/").map(encodeURIComponent).join("/");
}

function canWrite(id) {
  return !id.startsWith("public/") || (session.info && session.info.role === "admin");
}

function percent(share) {
  return `${Math.round(share * 1000) / 10}%`;
}

function mean(sum, count) {
  return count ? sum / count : null;
}

function armRow(versions, arm = {}) {
  const index = document.querySelectorAll("#alias-arms .arm").length + 1;
  const select = el("select", { "aria-label": `Version ${index}`, class: "arm-version" },
    versions.map((v) => el("option", { value: v.version, selected: v.version === arm.version }, v.version + (v.latest ? " (latest)" : ""))));
  const weight = el("input", { type: "number", min: "0", step: "any", value: arm.weight ?? 1, class: "arm-weight",
    "aria-label": `Weight of version ${index}` });
  const row = el("div", { class: "row arm" }, select, weight,
    el("button", { type: "button", class: "link", "aria-label": `Remove version ${index}`, onclick: () => row.remove() }, "Remove"));
  return row;
}

function editAlias(alias) {
  document.getElementById("alias-name").value = alias ? alias.alias : "";
  const arms = document.getElementById("alias-arms");
  arms.replaceChildren();
  for (const arm of alias ? alias.split : [{ version: current.versions[0].version, weight: 1 }]) arms.append(armRow(current.versions, arm));
  document.getElementById("alias-name").focus();
}

async function removeAlias(alias) {
  const ok = await confirmDialog(`Delete alias ${alias.id}? Requests naming it will get 404.`);
  if (!ok) return;
  try {
    await api(`/v1/prompts/${encodeRef(current.id)}/aliases/${encodeURIComponent(alias.alias)}`, { method: "DELETE" });
    toast(`Deleted ${alias.id}`);
    await load(current.id);
  } catch (e) {
    toast(`Delete failed: ${e.message}`);
  }
}

function render(id, data) {
  current = { id, versions: data.versions, aliases: data.aliases };
  const writable = canWrite(id);
  const aliasBody = document.querySelector("#releases-aliases tbody");
  aliasBody.replaceChildren(...data.aliases.map((a) => {
    const total = a.split.reduce((s, arm) => s + arm.weight, 0);
    return el("tr", { "data-alias": a.alias },
      el("th", { scope: "row", class: "mono" }, a.id),
      el("td", { class: "mono" }, a.split.map((arm) => `${arm.version} ${percent(arm.weight / total)}`).join(" · ")),
      el("td", {}, formatTime(a.updated_at)),
      el("td", {}, a.updated_by || "–"),
      el("td", {}, writable ? [
        el("button", { type: "button", class: "link", "aria-label": `Edit ${a.id}`, onclick: () => editAlias(a) }, "Edit"),
        el("button", { type: "button", class: "link danger", "aria-label": `Delete ${a.id}`, onclick: () => removeAlias(a) }, "Delete"),
      ] : "read-only"));
  }));
  if (!data.aliases.length) aliasBody.append(el("tr", {}, el("td", { colspan: 5, class: "muted" }, "No aliases yet: create one below.")));
  const versionBody = document.querySelector("#releases-versions tbody");
  versionBody.replaceChildren(...data.versions.map((v) => {
    const n = v.numbers || {};
    const aliases = Object.entries(v.aliases).map(([name, share]) => `${name} ${percent(share)}`).join(", ");
    const feedback = mean(n.feedback_sum, n.feedback_count);
    return el("tr", { "data-version": v.version },
      el("th", { scope: "row", class: "mono" }, v.version, v.latest ? el("span", { class: "badge latest" }, "latest") : null),
      el("td", {}, aliases || "–"),
      el("td", { class: "num" }, n.requests ?? 0),
      el("td", { class: "num" }, n.errors ?? 0),
      el("td", { class: "num" }, n.generation_tokens ?? 0),
      el("td", { class: "num" }, fmt(mean((n.ttft_sum || 0) * 1000, n.ttft_count), 0, " ms")),
      el("td", { class: "num" }, fmt(mean((n.latency_sum || 0) * 1000, n.latency_count), 0, " ms")),
      el("td", { class: "num" }, feedback === null ? "–" : `${fmt(feedback, 2)} (${n.feedback_count})`));
  }));
  document.getElementById("alias-form").hidden = !writable;
  document.getElementById("releases-body").hidden = false;
  if (writable) editAlias(data.aliases[0] || null);
}

async function load(id) {
  const status = document.getElementById("releases-status");
  status.textContent = "Loading…";
  try {
    render(id, await api(`/ui/api/prompts/${encodeRef(id)}/releases`));
    status.textContent = "";
  } catch (e) {
    document.getElementById("releases-body").hidden = true;
    status.textContent = `Could not load ${id}: ${e.message}`;
  }
}

async function save(event) {
  event.preventDefault();
  const error = document.getElementById("alias-error");
  error.textContent = "";
  const alias = document.getElementById("alias-name").value.trim();
  const split = [...document.querySelectorAll("#alias-arms .arm")].map((row) => ({
    version: row.querySelector(".arm-version").value, weight: Number(row.querySelector(".arm-weight").value),
  }));
  if (!split.length || split.length > MAX_ARMS) {
    error.textContent = `An alias needs 1 to ${MAX_ARMS} versions.`;
    return;
  }
  const body = split.length === 1 ? { version: split[0].version } : { split };
  try {
    const saved = await api(`/v1/prompts/${encodeRef(current.id)}/aliases/${encodeURIComponent(alias)}`, { method: "PUT", json: body });
    toast(`${saved.id} now serves ${saved.split.map((a) => a.version).join(" + ")}`);
    await load(current.id);
  } catch (e) {
    error.textContent = `Could not save: ${e.message}`;
  }
}

export function init() {
  document.getElementById("releases-pick").addEventListener("submit", (event) => {
    event.preventDefault();
    load(document.getElementById("releases-prompt").value.trim());
  });
  document.getElementById("alias-form").addEventListener("submit", save);
  document.getElementById("alias-add-arm").addEventListener("click", () => {
    if (current && document.querySelectorAll("#alias-arms .arm").length < MAX_ARMS) {
      document.getElementById("alias-arms").append(armRow(current.versions, { version: current.versions[0].version, weight: 0 }));
    }
  });
}

export async function show() {
  try {
    const list = await apiAll("/v1/prompts");
    document.getElementById("releases-prompts").replaceChildren(...list.data.map((p) => el("option", { value: p.id })));
  } catch (e) {
    document.getElementById("releases-status").textContent = `Could not list prompts: ${e.message}`;
  }
  if (current) await load(current.id);
}
