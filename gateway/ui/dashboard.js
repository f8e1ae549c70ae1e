// The onehop dashboard: polls the gateway's JSON endpoints and /metrics, renders tables.
// Rates and latencies are over the last poll interval (counter and histogram deltas).
"use strict";

const params = new URLSearchParams(location.search);
const POLL_MS = Math.max(500, Number(params.get("interval")) || 2000);
// The gateway's root: the page lives at <root>/ui/.
const ROOT = location.pathname.replace(/\/ui(\/.*)?$/, "");
const QUANTILES = [0.5, 0.99];

let token = sessionStorage.getItem("onehop-token") || "";
let previous = null; // the last /metrics sample: {at, series}
const lossHistory = new Map(); // job id → training loss per poll, while it runs

// --- fetching -----------------------------------------------------------------------------

class Unauthorized extends Error {}

async function get(path, as) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const response = await fetch(ROOT + path, { headers, cache: "no-store" });
  if (response.status === 401) throw new Unauthorized(path);
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return as === "text" ? response.text() : response.json();
}

// Prometheus text format → [{name, labels, value}] (comments and blank lines skipped).
function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    for (const [, key, value] of (match[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
      labels[key] = value.replace(/\\(.)/g, "$1");
    }
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return samples;
}

// Sum of the samples of one metric, grouped by one label.
function byLabel(samples, name, label) {
  const sums = new Map();
  for (const s of samples) {
    if (s.name !== name) continue;
    const key = s.labels[label] ?? "";
    sums.set(key, (sums.get(key) || 0) + s.value);
  }
  return sums;
}

// Histogram buckets of one metric for one label value: [[le, cumulative count], ...].
function buckets(samples, name, label, value) {
  const found = new Map();
  for (const s of samples) {
    if (s.name === `${name}_bucket` && s.labels[label] === value) {
      const le = s.labels.le === "+Inf" ? Infinity : Number(s.labels.le);
      found.set(le, (found.get(le) || 0) + s.value);
    }
  }
  return [...found.entries()].sort((a, b) => a[0] - b[0]);
}

// histogram_quantile as Prometheus computes it: linear within the bucket that holds q.
function quantile(q, cumulative) {
  if (!cumulative.length) return NaN;
  const total = cumulative[cumulative.length - 1][1];
  if (!total) return NaN;
  const rank = q * total;
  let lower = 0;
  let below = 0;
  for (const [le, count] of cumulative) {
    if (count >= rank) {
      if (le === Infinity) return lower;
      return lower + ((le - lower) * (rank - below)) / Math.max(count - below, 1e-9);
    }
    lower = le;
    below = count;
  }
  return lower;
}

function minus(now, before) {
  if (!before) return now;
  return now.map(([le, count], i) => [le, count - (before[i] ? before[i][1] : 0)]);
}

// --- rendering ----------------------------------------------------------------------------

function cell(text, className) {
  const td = document.createElement("td");
  if (text instanceof Node) td.append(text);
  else td.textContent = text;
  if (className) td.className = className;
  return td;
}

function fill(tableId, rows, emptyText) {
  const body = document.querySelector(`#${tableId} tbody`);
  const columns = document.querySelectorAll(`#${tableId} thead th`).length;
  body.replaceChildren(...rows);
  if (!rows.length) {
    const tr = document.createElement("tr");
    tr.append(cell(emptyText, "empty"));
    tr.firstChild.colSpan = columns;
    body.append(tr);
  }
}

function row(data, cells) {
  const tr = document.createElement("tr");
  for (const [key, value] of Object.entries(data)) tr.dataset[key] = value;
  tr.append(...cells);
  return tr;
}

const fmt = {
  int: (n) => (Number.isFinite(n) ? Math.round(n).toLocaleString("en") : "—"),
  num: (n, digits = 2) => (Number.isFinite(n) ? n.toFixed(digits) : "—"),
  pct: (n) => (Number.isFinite(n) ? `${(100 * n).toFixed(1)} %` : "—"),
  bytes: (n) => {
    if (!Number.isFinite(n)) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  },
};

function sparkline(values) {
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", "120");
  svg.setAttribute("height", "24");
  if (values.length >= 2) {
    const low = Math.min(...values);
    const span = Math.max(...values) - low || 1;
    const points = values.map(
      (v, i) => `${(118 * i) / (values.length - 1) + 1},${22 - (20 * (v - low)) / span + 1}`,
    );
    const line = document.createElementNS(svgNS, "polyline");
    line.setAttribute("points", points.join(" "));
    svg.append(line);
  }
  return svg;
}

function renderHealth(cluster) {
  const services = [{ name: "gateway", address: location.host, health: "SERVING" }, ...cluster.services];
  fill(
    "health",
    services.map((s) =>
      row({ service: s.name }, [cell(s.name), cell(s.address), cell(s.health, s.health)]),
    ),
    "no services",
  );
}

function renderPlanes(stats, samples) {
  const rows = [];
  const predRows = byLabel(samples, "onehop_gateway_infer_rows_total", "result");
  const hit = predRows.get("hit") || 0;
  const miss = predRows.get("miss") || 0;
  rows.push(
    row({ plane: "predictions (gateway)" }, [
      cell("predictions (rows at the gateway)"),
      cell(fmt.pct(hit / (hit + miss)), "num"),
      cell(fmt.int(hit), "num"),
      cell(fmt.int(miss), "num"),
      cell("—", "num"), cell("—", "num"), cell("—", "num"),
    ]),
  );
  const namespaces = (stats && stats.namespaces) || {};
  for (const [name, ns] of Object.entries(namespaces).sort()) {
    const plane = { shard: "data (shards)", pred: "predictions (cache node)" }[name] || name;
    rows.push(
      row({ plane: name }, [
        cell(plane),
        cell(fmt.pct(ns.hits / (ns.hits + ns.misses)), "num"),
        cell(fmt.int(ns.hits), "num"),
        cell(fmt.int(ns.misses), "num"),
        cell(fmt.int(ns.entries), "num"),
        cell(fmt.bytes(ns.bytes), "num"),
        cell(fmt.int(ns.evictions), "num"),
      ]),
    );
  }
  fill("planes", rows, "no cache");
  document.getElementById("cache-use").textContent = stats
    ? `cache holds ${fmt.bytes(stats.used_bytes)} of ${fmt.bytes(stats.capacity_bytes)}`
    : "no cache statistics (cache off or unreachable)";
}

function renderRequests(samples, at) {
  const counts = byLabel(samples, "onehop_gateway_infer_requests_total", "outcome");
  const before = previous
    ? byLabel(previous.samples, "onehop_gateway_infer_requests_total", "outcome")
    : new Map();
  const seconds = previous ? (at - previous.at) / 1000 : NaN;
  const rows = [];
  for (const [outcome, count] of [...counts.entries()].sort()) {
    const now = buckets(samples, "onehop_gateway_infer_seconds", "outcome", outcome);
    const then = previous
      ? buckets(previous.samples, "onehop_gateway_infer_seconds", "outcome", outcome)
      : null;
    const recent = minus(now, then);
    // Latency over the last interval when requests came in, else since the gateway started.
    const window = recent.length && recent[recent.length - 1][1] > 0 ? recent : now;
    const [p50, p99] = QUANTILES.map((q) => 1000 * quantile(q, window));
    rows.push(
      row({ outcome }, [
        cell(`predict: ${outcome}`),
        cell(fmt.int(count), "num"),
        cell(fmt.num((count - (before.get(outcome) || 0)) / seconds, 1), "num"),
        cell(fmt.num(p50), "num"),
        cell(fmt.num(p99), "num"),
      ]),
    );
  }
  const routes = byLabel(samples, "onehop_gateway_http_requests_total", "route");
  const routesBefore = previous
    ? byLabel(previous.samples, "onehop_gateway_http_requests_total", "route")
    : new Map();
  for (const [route, count] of [...routes.entries()].sort()) {
    // Inference over HTTP; the control routes would mostly count this page's own polling.
    if (!route.startsWith("/v2/")) continue;
    rows.push(
      row({ route }, [
        cell(`HTTP ${route}`),
        cell(fmt.int(count), "num"),
        cell(fmt.num((count - (routesBefore.get(route) || 0)) / seconds, 1), "num"),
        cell("—", "num"),
        cell("—", "num"),
      ]),
    );
  }
  fill("requests", rows, "no requests yet");
}

function renderJobs(jobs) {
  const rows = jobs.map((job) => {
    const state = (job.state || "").replace("JOB_STATE_", "");
    const history = job.history || [];
    let curve;
    if (history.length >= 2) {
      curve = history.map((h) => h.loss);
    } else {
      const seen = lossHistory.get(job.job_id) || [];
      if (state === "RUNNING" && job.step && seen[seen.length - 1] !== job.loss) seen.push(job.loss);
      lossHistory.set(job.job_id, seen);
      curve = seen;
    }
    const bar = document.createElement("progress");
    bar.max = Number(job.total_steps) || 1;
    bar.value = Number(job.step) || 0;
    const progress = document.createElement("span");
    progress.append(bar, ` epoch ${job.epoch}/${job.epochs}`);
    return row({ job: job.job_id, state }, [
      cell(String(job.job_id).slice(0, 12)),
      cell(job.model_name),
      cell(job.dataset),
      cell(state, state),
      cell(progress),
      cell(fmt.num(job.loss, 4), "num"),
      cell(sparkline(curve)),
      cell(fmt.int(job.samples_per_second), "num"),
      cell(fmt.pct(job.data_wait_share), "num"),
      cell(job.cpu_seconds === undefined ? "—" : fmt.num(job.cpu_seconds, 1), "num"),
      cell(job.bytes_read === undefined ? "—" : fmt.bytes(job.bytes_read), "num"),
    ]);
  });
  fill("jobs", rows, "no jobs");
}

function renderModels(models) {
  fill(
    "models",
    models.map((m) =>
      row({ model: m.name }, [
        cell(m.name),
        cell(String(m.serving_version || m.version), "num"),
        cell((m.versions || [m.version]).join(", ")),
        cell(String(m.weights_digest || "").slice(0, 12)),
        cell(
          Object.entries(m.metrics || {})
            .sort()
            .map(([k, v]) => `${k} ${fmt.num(v, 3)}`)
            .join(", "),
        ),
      ]),
    ),
    "no models",
  );
}

function renderDatasets(datasets) {
  fill(
    "datasets",
    datasets.map((d) =>
      row({ dataset: d.name }, [
        cell(d.name),
        cell(String(d.version), "num"),
        cell(fmt.int(Number(d.rows)), "num"),
        cell(String((d.shards || []).length), "num"),
        cell(d.partitioning || "—"),
      ]),
    ),
    "no datasets",
  );
}

// --- the loop -----------------------------------------------------------------------------

async function poll() {
  const at = Date.now();
  const [cluster, stats, jobs, models, datasets, metrics] = await Promise.allSettled([
    get("/v1/cluster"),
    get("/v1/cache/stats"),
    get("/v1/jobs"),
    get("/v1/models"),
    get("/v1/datasets"),
    get("/metrics", "text"),
  ]);
  const results = [cluster, stats, jobs, models, datasets, metrics];
  const unauthorized = results.some((r) => r.status === "rejected" && r.reason instanceof Unauthorized);
  document.getElementById("auth").classList.toggle("shown", unauthorized);
  const samples = metrics.status === "fulfilled" ? parseMetrics(metrics.value) : [];

  if (cluster.status === "fulfilled") renderHealth(cluster.value);
  else fill("health", [row({ service: "gateway" }, [cell("gateway"), cell(location.host), cell("UNREACHABLE", "UNREACHABLE")])], "");
  renderPlanes(stats.status === "fulfilled" ? stats.value : null, samples);
  if (metrics.status === "fulfilled") renderRequests(samples, at);
  if (jobs.status === "fulfilled") renderJobs(jobs.value.jobs || []);
  if (models.status === "fulfilled") renderModels(models.value.models || []);
  if (datasets.status === "fulfilled") renderDatasets(datasets.value.datasets || []);
  if (metrics.status === "fulfilled") previous = { at, samples };

  const failed = results.filter((r) => r.status === "rejected").map((r) => r.reason.message);
  document.getElementById("status").textContent =
    `updated ${new Date(at).toLocaleTimeString()}` + (failed.length ? ` — unavailable: ${failed.join("; ")}` : "");
  document.body.dataset.polled = String(Number(document.body.dataset.polled || 0) + 1);
}

document.getElementById("auth").addEventListener("submit", (event) => {
  event.preventDefault();
  token = document.getElementById("token").value;
  sessionStorage.setItem("onehop-token", token);
  poll();
});

async function loop() {
  try {
    await poll();
  } finally {
    setTimeout(loop, POLL_MS);
  }
}
loop();
