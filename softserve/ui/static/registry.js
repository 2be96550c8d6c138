// Registry page: list (tenant + public), upload, versions with roll-back, download, delete.

import { api, apiAll, confirmDialog, download, el, formatBytes, formatTime, session, toast } from "./api.js";

const DTYPE_BYTES = { float32: 4, float16: 2, bfloat16: 2 };
let chosenFiles = [];

function encodeRef(ref) {
  return ref.split("/").map(encodeURIComponent).join("/");
}

function sizeOf(p) {
  return p.num_virtual_tokens * p.token_dim * (DTYPE_BYTES[p.dtype] || 4);
}

function canWrite(p) {
  const info = session.info;
  return !p.public || (info && info.role === "admin");
}

function openInPlayground(ref) {
  session.pendingModel = ref;
  location.hash = "#playground";
}

async function toggleVersions(p, button, row) {
  const open = button.getAttribute("aria-expanded") === "true";
  const next = row.nextElementSibling;
  if (next && next.classList.contains("versions")) next.remove();
  button.setAttribute("aria-expanded", String(!open));
  if (open) return;
  const cell = el("td", { colspan: 9, id: `versions-${p.id}` }, "Loading versions…");
  button.setAttribute("aria-controls", cell.id);
  row.after(el("tr", { class: "versions" }, cell));
  try {
    const list = await api(`/v1/prompts/${encodeRef(p.id)}/versions`);
    const body = el("tbody");
    for (const v of list.data) {
      const isLatest = v.version === p.version;
      body.append(el("tr", {},
        el("td", { class: "mono" }, v.version, isLatest ? el("span", { class: "badge latest" }, "latest") : null),
        el("td", {}, formatTime(v.created_at)),
        el("td", { class: "mono" }, v.sha256.slice(0, 16) + "…"),
        el("td", {}, v.description || ""),
        el("td", {},
          el("button", { type: "button", class: "link", onclick: () => openInPlayground(v.ref) }, "Try"),
          el("button", { type: "button", class: "link", "aria-label": `Download ${v.ref}`,
            onclick: () => download(`/v1/prompts/${encodeRef(p.id)}/download?version=${v.version}`, `${p.name}.zip`).catch((e) => toast(e.message)) }, "Download"),
          isLatest || !canWrite(p) ? null : el("button", {
            type: "button", class: "link", "aria-label": `Make ${v.version} the latest version of ${p.id}`,
            onclick: () => rollback(p, v.version),
          }, "Make latest"))));
    }
    cell.replaceChildren(el("table", { class: "data" },
      el("caption", {}, `Versions of ${p.id} (latest first). “Make latest” rolls back to that version; `,
        el("code", {}, `${p.id}@version`), " pins one in a request."),
      el("thead", {}, el("tr", {}, ["Version", "Created", "sha256", "Description", "Actions"].map((h) => el("th", { scope: "col" }, h)))),
      body));
  } catch (e) {
    cell.textContent = `Could not load versions: ${e.message}`;
  }
}

async function rollback(p, version) {
  const ok = await confirmDialog(`Make version ${version} the latest version of ${p.id}? Requests for “${p.id}” will use it from now on.`, "Make latest");
  if (!ok) return;
  try {
    await api(`/ui/api/prompts/${encodeRef(p.id)}/rollback`, { json: { version } });
    toast(`${p.id} now serves ${version}`);
    await refresh();
  } catch (e) {
    toast(`Roll-back failed: ${e.message}`);
  }
}

async function remove(p) {
  const ok = await confirmDialog(`Delete prompt ${p.id} and all its versions? Requests naming it will get 404. This cannot be undone.`);
  if (!ok) return;
  try {
    await api(`/v1/prompts/${encodeRef(p.id)}`, { method: "DELETE" });
    toast(`Deleted ${p.id}`);
    await refresh();
  } catch (e) {
    toast(`Delete failed: ${e.message}`);
  }
}

function renderRow(p) {
  const versionsButton = el("button", { type: "button", class: "link", "aria-expanded": "false", "aria-label": `Versions of ${p.id}` }, "Versions");
  const row = el("tr", { "data-prompt": p.id },
    el("th", { scope: "row" }, p.id, p.public ? el("span", { class: "badge" }, "public") : null),
    el("td", { class: "mono" }, p.version),
    el("td", { class: "num" }, p.num_virtual_tokens),
    el("td", {}, p.dtype),
    el("td", {}, p.peft_type === "PROMPT_TUNING" ? "prompt tuning" : p.peft_type.toLowerCase().replace("_", "-")),
    el("td", { class: "num" }, formatBytes(sizeOf(p))),
    el("td", {}, formatTime(p.created_at)),
    el("td", {}, p.description || ""),
    el("td", {},
      versionsButton,
      el("button", { type: "button", class: "link", "aria-label": `Try ${p.id} in the playground`, onclick: () => openInPlayground(p.id) }, "Try"),
      el("button", { type: "button", class: "link", "aria-label": `Download ${p.id}`,
        onclick: () => download(`/v1/prompts/${encodeRef(p.id)}/download`, `${p.name}.zip`).catch((e) => toast(e.message)) }, "Download"),
      canWrite(p) ? el("button", { type: "button", class: "link danger", "aria-label": `Delete ${p.id}`, onclick: () => remove(p) }, "Delete") : null));
  versionsButton.addEventListener("click", () => toggleVersions(p, versionsButton, row));
  return row;
}

export async function refresh() {
  const status = document.getElementById("registry-status");
  const tbody = document.querySelector("#registry-table tbody");
  status.textContent = "Loading…";
  try {
    const list = await apiAll("/v1/prompts");
    tbody.replaceChildren(...list.data.map(renderRow));
    if (!list.data.length) tbody.append(el("tr", {}, el("td", { colspan: 9, class: "muted" }, "No prompts yet: upload one above, or tune one.")));
    status.textContent = `${list.data.length} prompt${list.data.length === 1 ? "" : "s"}`;
  } catch (e) {
    status.textContent = `Could not list prompts: ${e.message}`;
  }
}

function pickFiles(files) {
  chosenFiles = Array.from(files);
  const names = chosenFiles.map((f) => f.name).join(", ");
  document.getElementById("upload-chosen").textContent = names ? `Chosen: ${names}` : "";
  const nameInput = document.getElementById("upload-name");
  const model = chosenFiles.find((f) => f.name.endsWith(".safetensors"));
  if (!nameInput.value && model && model.name !== "adapter_model.safetensors") {
    nameInput.value = model.name.replace(/\.safetensors$/, "").replace(/[^A-Za-z0-9._-]/g, "-").slice(0, 64);
  }
}

async function upload(event) {
  event.preventDefault();
  const error = document.getElementById("upload-error");
  error.textContent = "";
  const name = document.getElementById("upload-name").value.trim();
  const model = chosenFiles.find((f) => f.name.endsWith(".safetensors"));
  const config = chosenFiles.find((f) => f.name.endsWith(".json"));
  if (!model) {
    error.textContent = "Choose a .safetensors file (adapter_model.safetensors or a bare prompt tensor).";
    return;
  }
  const form = new FormData();
  form.append("adapter_model", model, "adapter_model.safetensors");
  if (config) form.append("adapter_config", config, "adapter_config.json");
  const description = document.getElementById("upload-description").value.trim();
  if (description) form.append("description", description);
  try {
    const result = await api(`/v1/prompts/${encodeRef(name)}`, { method: "PUT", form });
    const warnings = result.warnings && result.warnings.length ? ` (${result.warnings.join("; ")})` : "";
    toast(`Uploaded ${result.id}@${result.version}${warnings}`);
    event.target.reset();
    pickFiles([]);
    await refresh();
  } catch (e) {
    error.textContent = `Upload failed: ${e.message}`;
  }
}

export function setupDropzone(zone, input, onFiles) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer && e.dataTransfer.files.length) {
      try { input.files = e.dataTransfer.files; } catch (_) { /* read-only in old browsers */ }
      onFiles(e.dataTransfer.files);
    }
  });
  input.addEventListener("change", () => onFiles(input.files));
}

export function init() {
  document.getElementById("upload-form").addEventListener("submit", upload);
  document.getElementById("registry-refresh").addEventListener("click", refresh);
  setupDropzone(document.getElementById("upload-drop"), document.getElementById("upload-files"), pickFiles);
}

export const show = refresh;
