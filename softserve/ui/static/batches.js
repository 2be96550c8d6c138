// Batches page: the tenant's Batch API batches (docs/batch.md) with status and progress, cancel, and
// the output and error files. Polls while a batch is unfinished.

import { api, confirmDialog, download, el, formatTime, toast } from "./api.js";

const UNFINISHED = ["validating", "in_progress", "finalizing", "cancelling"];
const LISTED = 100;  // the newest this many (GET /v1/batches pages at 100)
let timer = null;
let visible = false;

function progressCell(b) {
  const c = b.request_counts;
  const done = c.completed + c.failed;
  return el("td", {},
    el("progress", { max: c.total || 1, value: done, "aria-label": `Progress of ${b.id}` }),
    el("span", { "data-role": "counts" }, ` ${done}/${c.total}` + (c.failed ? ` (${c.failed} failed)` : "")));
}

function fileButton(b, fileId, label, suffix) {
  if (!fileId) return null;
  return el("button", {
    type: "button", class: "link", "aria-label": `Download the ${label.toLowerCase()} file of ${b.id}`,
    onclick: () => download(`/v1/files/${encodeURIComponent(fileId)}/content`, `${b.id}_${suffix}.jsonl`).catch((e) => toast(e.message)),
  }, label);
}

async function cancel(b) {
  if (!(await confirmDialog(`Cancel ${b.id}? Lines already answered stay in its output file.`, "Cancel batch"))) return;
  try {
    await api(`/v1/batches/${encodeURIComponent(b.id)}/cancel`, { method: "POST" });
    toast(`Cancelling ${b.id}`);
  } catch (e) {
    toast(`Cancel failed: ${e.message}`);
  }
  await refresh();
}

function render(batches) {
  const body = document.querySelector("#batches-table tbody");
  if (!batches.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 6, class: "muted" },
      "No batches yet: create one with the API (POST /v1/batches), the client or `softserve batches create`.")));
    return;
  }
  body.replaceChildren(...batches.map((b) => {
    const canCancel = b.status === "validating" || b.status === "in_progress";
    return el("tr", { "data-batch": b.id },
      el("td", { class: "mono" }, b.id, b.metadata && Object.keys(b.metadata).length
        ? el("div", { class: "muted" }, Object.entries(b.metadata).map(([k, v]) => `${k}=${v}`).join(", ")) : null),
      el("td", {}, el("span", { class: `status-${b.status}`, "data-role": "batch-status" }, b.status)),
      progressCell(b),
      el("td", { class: "mono" }, b.endpoint),
      el("td", {}, formatTime(b.created_at)),
      el("td", {},
        fileButton(b, b.output_file_id, "Output", "output"),
        fileButton(b, b.error_file_id, "Errors", "errors"),
        canCancel ? el("button", { type: "button", class: "link danger", "aria-label": `Cancel ${b.id}`,
          onclick: () => cancel(b) }, "Cancel") : null));
  }));
}

async function refresh() {
  clearTimeout(timer);
  let active = false;
  const status = document.getElementById("batches-status");
  try {
    const page = await api(`/v1/batches?limit=${LISTED}`);
    render(page.data);
    active = page.data.some((b) => UNFINISHED.includes(b.status));
    status.textContent = page.has_more ? `The newest ${LISTED} batches.` : "";
  } catch (e) {
    status.textContent = `Could not load batches: ${e.message}`;
  }
  if (visible) timer = setTimeout(refresh, active ? 1000 : 5000);
}

export function init() {
  document.getElementById("batches-refresh").addEventListener("click", refresh);
}

export function show() {
  visible = true;
  return refresh();
}

export function hide() {
  visible = false;
  clearTimeout(timer);
}
