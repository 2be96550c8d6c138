// Console shell: sign-in, hash navigation between the pages.

import { api, ApiError, apiKey, session, setApiKey } from "./api.js";
import * as batches from "./batches.js";
import * as metrics from "./metrics.js";
import * as playground from "./playground.js";
import * as registry from "./registry.js";
import * as releases from "./releases.js";
import * as tuning from "./tuning.js";

const PAGES = { registry, releases, playground, tuning, batches, metrics };
let current = null;

function showOnly(id) {
  document.getElementById("loading").hidden = true;
  for (const section of document.querySelectorAll("main > section")) section.hidden = section.id !== `page-${id}`;
  for (const link of document.querySelectorAll("nav a[data-page]")) {
    if (link.dataset.page === id) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

function showLogin(message = "") {
  if (current && PAGES[current].hide) PAGES[current].hide();
  current = null;
  showOnly("login");
  document.getElementById("login-error").textContent = message;
  document.getElementById("login-key").focus();
}

async function route() {
  if (!session.info) return;
  const id = location.hash.slice(1) in PAGES ? location.hash.slice(1) : "registry";
  if (current && current !== id && PAGES[current].hide) PAGES[current].hide();
  current = id;
  showOnly(id);
  document.getElementById(`${id}-title`).focus();
  document.title = `${id[0].toUpperCase()}${id.slice(1)} · Softserve console`;
  await PAGES[id].show();
}

function showWho() {
  const info = session.info;
  const who = document.getElementById("who");
  who.textContent = info.auth ? `tenant ${info.tenant} (${info.role})` : "no authentication (tenant default)";
  document.getElementById("sign-out").hidden = !info.auth;
}

async function start() {
  try {
    // Without a key, ask whether the server wants one before calling anything that would answer 401
    // (a 401 shows as an error in the browser's console before the user could sign in).
    if (!apiKey() && (await api("/ui/api/auth")).auth) {
      session.info = null;
      showLogin("");
      return;
    }
    session.info = await api("/ui/api/session");
  } catch (e) {
    session.info = null;
    if (e instanceof ApiError && e.status === 401) {
      showLogin(apiKey() ? "That key was not accepted." : "");
      return;
    }
    document.getElementById("loading").textContent = `Could not reach the server: ${e.message}`;
    return;
  }
  showWho();
  await route();
}

function init() {
  for (const page of Object.values(PAGES)) if (page.init) page.init();
  document.getElementById("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setApiKey(document.getElementById("login-key").value.trim());
    document.getElementById("login-key").value = "";
    start();
  });
  document.getElementById("sign-out").addEventListener("click", () => {
    setApiKey("");
    session.info = null;
    document.getElementById("who").textContent = "";
    document.getElementById("sign-out").hidden = true;
    showLogin("Signed out.");
  });
  // Any 401 (key revoked, server restarted with other keys) brings the sign-in form back.
  window.addEventListener("softserve:unauthorized", () => {
    if (session.info) {
      setApiKey("");
      session.info = null;
      showLogin("The server no longer accepts this key; sign in again.");
    }
  });
  window.addEventListener("hashchange", route);
  start();
}

init();
