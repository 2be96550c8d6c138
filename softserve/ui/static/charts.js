// Small hand-drawn SVG line charts (no library). Each chart is role="img" with a text summary.

const NS = "http://www.w3.org/2000/svg";
const PAD = { left: 46, right: 12, top: 10, bottom: 24 };

function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// A round tick step (1, 2, 2.5 or 5 x 10^n) giving about four intervals up to `value`.
function niceStep(value) {
  if (!(value > 0)) return 0.25;
  const raw = value / 4;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  for (const f of [1, 2, 2.5, 5, 10]) if (f * magnitude >= raw) return f * magnitude;
  return 10 * magnitude;
}

function tickFormatter(step) {
  const digits = Math.max(0, -Math.floor(Math.log10(step) + 1e-9) + (String(step / 10 ** Math.floor(Math.log10(step))).includes(".") ? 1 : 0));
  return (v) => (Math.abs(v) >= 10000 ? `${(v / 1000).toFixed(0)}k` : v.toFixed(Math.min(digits, 4)));
}

/**
 * Draws series into `svg` (replacing what was there).
 *   series: [{name, points: [[x, y], ...]}]   (y null = gap)
 *   opts: {xLabel(x) -> string, xMin, xMax, yMin, yMax, yFloor (smallest top of the y axis, default 1),
 *          width, height, label (accessible name), summary (text)}
 */
export function lineChart(svg, series, opts = {}) {
  const W = opts.width || 420, H = opts.height || 170;
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "chart");
  svg.setAttribute("role", "img");
  const all = series.flatMap((s) => s.points.filter((p) => p[1] !== null && p[1] !== undefined));
  const label = `${opts.label || "chart"}: ${opts.summary || (all.length ? "" : "no data yet")}`;
  svg.setAttribute("aria-label", label);
  svg.append(svgEl("title", {}, label));
  const xs = all.map((p) => p[0]);
  const xMin = opts.xMin ?? (xs.length ? Math.min(...xs) : 0);
  let xMax = opts.xMax ?? (xs.length ? Math.max(...xs) : 1);
  if (xMax <= xMin) xMax = xMin + 1;
  const yMin = opts.yMin ?? 0;
  // An all-zero series still gets a readable axis (0 .. yFloor) instead of a squashed one.
  const dataMax = Math.max(...all.map((p) => p[1]), yMin + (opts.yFloor ?? 1));
  const step = niceStep((opts.yMax ?? dataMax) - yMin);
  const yMax = opts.yMax ?? yMin + step * Math.max(1, Math.ceil((dataMax - yMin) / step - 1e-9));
  const tickLabel = tickFormatter(step);
  const plotW = W - PAD.left - PAD.right, plotH = H - PAD.top - PAD.bottom;
  const sx = (x) => PAD.left + ((x - xMin) / (xMax - xMin)) * plotW;
  const sy = (y) => PAD.top + plotH - ((y - yMin) / (yMax - yMin || 1)) * plotH;

  for (let v = yMin; v <= yMax + step / 2; v += step) {
    const y = sy(v);
    svg.append(svgEl("line", { class: "grid", x1: PAD.left, x2: W - PAD.right, y1: y, y2: y }));
    svg.append(svgEl("text", { x: PAD.left - 5, y: y + 4, "text-anchor": "end" }, tickLabel(v)));
  }
  svg.append(svgEl("line", { class: "axis", x1: PAD.left, x2: PAD.left, y1: PAD.top, y2: H - PAD.bottom }));
  svg.append(svgEl("line", { class: "axis", x1: PAD.left, x2: W - PAD.right, y1: H - PAD.bottom, y2: H - PAD.bottom }));
  const xLabel = opts.xLabel || ((x) => tickLabel(x));
  for (const [x, anchor] of [[xMin, "start"], [(xMin + xMax) / 2, "middle"], [xMax, "end"]]) {
    svg.append(svgEl("text", { x: sx(x), y: H - 6, "text-anchor": anchor }, xLabel(x)));
  }
  if (!all.length) {
    svg.append(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no data yet"));
    return;
  }
  series.forEach((s, index) => {
    const cls = `s${index % 4}`;
    // Gaps (null y) split the line into runs.
    let run = [];
    const flush = () => {
      if (run.length > 1) {
        svg.append(svgEl("polyline", { class: `line ${cls}`, points: run.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" "), "data-series": s.name }));
      }
      run = [];
    };
    for (const [x, y] of s.points) {
      if (y === null || y === undefined) flush();
      else run.push([x, Math.min(Math.max(y, yMin), yMax)]);
    }
    flush();
    // A dot per point when there are few of them (and always the last), so single points show.
    const pts = s.points.filter((p) => p[1] !== null && p[1] !== undefined);
    const dots = pts.length <= 60 ? pts : pts.slice(-1);
    for (const [x, y] of dots) {
      svg.append(svgEl("circle", { class: `dot ${cls}`, cx: sx(x).toFixed(1), cy: sy(Math.min(Math.max(y, yMin), yMax)).toFixed(1), r: 2.5, "data-series": s.name }));
    }
  });
}

export function legend(names) {
  const ul = document.createElement("ul");
  ul.className = "legend";
  names.forEach((name, i) => {
    const li = document.createElement("li");
    const sw = document.createElement("span");
    sw.className = `swatch s${i % 4}`;
    sw.setAttribute("aria-hidden", "true");
    li.append(sw, name);
    ul.append(li);
  });
  return ul;
}

export function newSvg() {
  return document.createElementNS(NS, "svg");
}
