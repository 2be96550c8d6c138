// Metrics page: charts of the last minutes from /ui/api/stats (our own endpoint; no Prometheus needed).

import { api, el, fmt } from "./api.js";
import { legend, lineChart, newSvg } from "./charts.js";

const POLL_MS = 2000;
const CHARTS = [
  { id: "requests", title: "Generation requests/s", series: [["requests_per_s", "requests"], ["errors_per_s", "errors (4xx/5xx)"]], digits: 2 },
  { id: "tokens", title: "Tokens/s", series: [["tokens_per_s", "generated"], ["prompt_tokens_per_s", "prompt"]], digits: 1 },
  { id: "queue", title: "Queue depth and running batch (server)", series: [["queue_depth", "waiting"], ["running", "running"]], digits: 0,
    yFloor: 4 },
  { id: "batch", title: "Rows per engine step (server)", series: [["batch_size", "mean batch size"]], digits: 1, yFloor: 4 },
  { id: "cache", title: "Cache hit rate (server)", series: [["prompt_cache_hit_rate", "prompt tensors"], ["kv_cache_hit_rate", "KV prefixes"]],
    digits: 0, scale: 100, unit: "%", yMax: 100 },
  { id: "kvpool", title: "KV pool in use (server)", series: [["kv_pool_used", "reserved by running requests"]],
    digits: 0, scale: 100, unit: "%", yMax: 100 },
  { id: "ttft", title: "Time to first token (server, mean)", series: [["ttft_s", "TTFT"]], digits: 0, scale: 1000, unit: " ms" },
];
let timer = null;
let visible = false;
let built = false;
const svgs = {};
const values = {};

function build() {
  const grid = document.getElementById("metrics-charts");
  for (const chart of CHARTS) {
    const svg = newSvg();
    svg.id = `chart-${chart.id}`;
    const value = el("span", { class: "value", "data-chart-value": chart.id }, "–");
    svgs[chart.id] = svg;
    values[chart.id] = value;
    grid.append(el("figure", { class: "chart", "data-chart": chart.id },
      el("figcaption", {}, el("span", {}, chart.title), value), svg, legend(chart.series.map((s) => s[1]))));
  }
  built = true;
}

function render(stats) {
  const points = stats.points;
  const tMax = stats.now;
  // At least a minute wide; grows to the whole window as history builds up.
  const oldest = points.length ? points[0].t : tMax;
  const tMin = tMax - Math.min(stats.window_s, Math.max(60, tMax - oldest));
  const clock = (t) => {
    const ago = Math.round(tMax - t);
    return ago <= 0 ? "now" : ago >= 60 ? `-${Math.round(ago / 60)} min` : `-${ago} s`;
  };
  document.getElementById("metrics-scope").textContent =
    `Showing ${stats.scope} for requests and tokens; load and caches are server-wide. ` +
    `Sampled every ${stats.interval_s} s, kept for ${Math.round(stats.window_s / 60)} minutes; ` +
    `since start-up: ${stats.totals.requests} generation requests, ${stats.totals.generated_tokens} generated tokens.`;
  for (const chart of CHARTS) {
    const scale = chart.scale || 1;
    const series = chart.series.map(([key, name]) => ({
      name, points: points.map((p) => [p.t, p[key] === null || p[key] === undefined ? null : p[key] * scale]),
    }));
    const latest = series.map((s) => {
      const known = s.points.filter((p) => p[1] !== null);
      return known.length ? `${s.name} ${fmt(known[known.length - 1][1], chart.digits, chart.unit || "")}` : `${s.name} –`;
    }).join(", ");
    values[chart.id].textContent = latest;
    lineChart(svgs[chart.id], series, {
      label: chart.title, summary: `latest: ${latest}`, xMin: tMin, xMax: tMax, xLabel: clock,
      yMax: chart.yMax, yFloor: chart.yFloor,
    });
  }
}

async function poll() {
  clearTimeout(timer);
  try {
    render(await api("/ui/api/stats"));
  } catch (e) {
    document.getElementById("metrics-scope").textContent = `Could not read stats: ${e.message}`;
  }
  if (visible) timer = setTimeout(poll, POLL_MS);
}

export function show() {
  if (!built) build();
  visible = true;
  return poll();
}

export function hide() {
  visible = false;
  clearTimeout(timer);
}
