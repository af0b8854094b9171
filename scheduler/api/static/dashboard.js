// The FastVideo Batch console: plain JS, no dependencies. Everything it shows comes from the
// JSON routes next to the page (/dashboard/data, /dashboard/jobs, /v1/batches/...), fetched
// with the key from the URL fragment as a Bearer header. Nothing from the server is parsed
// as HTML: every value goes in as text.
"use strict";
(() => {
  const REFRESH_MS = 2000;
  const TIMEOUT_MS = 10000;
  const KEY_STORE = "fvb.dashboard.key";
  // /dashboard (or behind a path prefix): the JSON routes live next to the page, /v1 beside.
  const BASE = location.pathname.replace(/\/+$/, "");
  const API_ROOT = BASE.replace(/\/dashboard$/, "");
  const DATA_URL = BASE + "/data";
  const STATE_CARDS = [
    ["queued", "Queued"], ["in_progress", "Running"], ["completed", "Completed"],
    ["failed", "Failed"], ["cancelled", "Cancelled"], ["total", "Total"],
  ];
  // API status (the counts) -> the job state the jobs table filters on.
  const CARD_STATE = {
    queued: "queued", in_progress: "running", completed: "succeeded", failed: "failed",
    cancelled: "cancelled", total: "",
  };
  const STATE_CLASS = {
    queued: "s-queued", running: "s-in_progress", succeeded: "s-completed",
    failed: "s-failed", cancelled: "s-cancelled",
  };
  const SERIES_COLORS = ["#3563e9", "#1f9d55", "#d64545", "#a27c2c", "#8a4fd6", "#13a3b5", "#e0752b"];
  const $ = (id) => document.getElementById(id);

  let memoryKey = null;
  let me = null;              // {tenant, operator} of the key in use
  let route = { view: "overview", id: null, params: new URLSearchParams() };
  let timer = null;
  let inflight = null;
  let halted = false;         // after a 401: wait for a new key instead of polling
  let lastOk = 0;
  let models = null;          // model names, for the jobs filter
  const jobsState = { key: "", rows: [], firstPage: 0, cursor: null, truncated: false, more: false };
  let videoFor = null;        // the job whose <video> is on the page
  let armedDelete = null;     // the job a first click on Delete armed

  // --- the key: URL fragment -> sessionStorage (the fragment never reaches the server) ---
  function loadKey() {
    try { return sessionStorage.getItem(KEY_STORE) || memoryKey; } catch { return memoryKey; }
  }
  function saveKey(key) {
    memoryKey = key || null;
    try {
      if (key) sessionStorage.setItem(KEY_STORE, key); else sessionStorage.removeItem(KEY_STORE);
    } catch { /* storage disabled: the key lives in memory for this page */ }
  }

  // --- routes: #/overview, #/jobs?state=..., #/jobs/<id>, #/batches[/<id>], #/workers ---
  function readFragment() {
    let hash = location.hash.slice(1);
    if (!hash.startsWith("/")) {
      // #key=fvb-... (the link fvb up prints); the key moves to sessionStorage at once.
      const params = new URLSearchParams(hash);
      const key = params.get("key");
      if (key) saveKey(key.trim());
      hash = "/overview";
      history.replaceState(null, "", location.pathname + location.search + "#" + hash);
    }
    const [path, query] = hash.split("?");
    const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
    const params = new URLSearchParams(query || "");
    if (params.has("key")) {
      saveKey(params.get("key").trim());
      params.delete("key");
      const rest = params.toString();
      history.replaceState(null, "", location.pathname + location.search + "#" + path + (rest ? "?" + rest : ""));
    }
    let view = parts[0] || "overview";
    if (view === "jobs" && parts[1]) view = "job";
    if (view === "batches" && parts[1]) view = "batch";
    if (!["overview", "jobs", "job", "batches", "batch", "workers"].includes(view)) view = "overview";
    route = { view, id: parts[1] || null, params };
  }
  function go(hash) { location.hash = hash; }

  // --- small DOM helpers (text only) ---
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }
  const SVG_NS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) node.setAttribute(name, String(value));
    }
    for (const child of children) node.append(child instanceof Node ? child : String(child));
    return node;
  }
  function emptyRow(columns, text) {
    return el("tr", null, el("td", { class: "empty", colspan: String(columns) }, text));
  }

  // --- formatting ---
  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 10) return seconds.toFixed(2) + " s";
    if (seconds < 60) return seconds.toFixed(1) + " s";
    const s = Math.round(seconds);
    if (s < 3600) return Math.floor(s / 60) + "m " + String(s % 60).padStart(2, "0") + "s";
    return Math.floor(s / 3600) + "h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
  }
  function fmtAgo(seconds) {
    if (seconds < 1) return "now";
    if (seconds < 90) return Math.round(seconds) + " s ago";
    if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
    if (seconds < 172800) return Math.round(seconds / 3600) + " h ago";
    return Math.round(seconds / 86400) + " d ago";
  }
  function pad(n) { return String(n).padStart(2, "0"); }
  function fmtTime(unix) {
    if (unix === null || unix === undefined) return "–";
    const d = new Date(unix * 1000);
    const time = pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
    if (d.toDateString() === new Date().toDateString()) return time;
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + time;
  }
  function fmtRate(value) { return value >= 10 ? value.toFixed(1) : value.toFixed(2); }
  function fmtBytes(n) {
    if (n === null || n === undefined) return "–";
    if (n < 1024) return n + " B";
    if (n < 1048576) return (n / 1024).toFixed(1) + " KiB";
    if (n < 1073741824) return (n / 1048576).toFixed(1) + " MiB";
    return (n / 1073741824).toFixed(2) + " GiB";
  }
  function progressBar(percent, statusClass) {
    const fill = el("div", { class: "fill " + statusClass });
    fill.style.width = Math.max(0, Math.min(100, percent)) + "%";
    return el("div", { class: "progress" },
      el("div", { class: "bar" }, fill), el("span", { class: "pct" }, Math.round(percent) + "%"));
  }
  function stateBadge(state, extra) {
    return el("span", { class: "badge " + (STATE_CLASS[state] || ""), "data-state": state }, state, extra || null);
  }
  function nowUnix() { return Date.now() / 1000; }

  // --- requests ---
  class HttpError extends Error {
    constructor(status, body) {
      const error = body && body.error ? body.error : null;
      super(error && error.message ? error.message : "HTTP " + status);
      this.status = status;
      this.code = error ? error.code : null;
    }
  }
  async function api(method, url, signal) {
    const headers = { Accept: "application/json" };
    const key = loadKey();
    if (key) headers.Authorization = "Bearer " + key;
    const response = await fetch(url, {
      method, headers, signal, cache: "no-store", credentials: "omit",
    });
    let body = null;
    try { body = await response.json(); } catch { body = null; }
    if (!response.ok) throw new HttpError(response.status, body);
    return body;
  }
  const get = (url, signal) => api("GET", url, signal);
  const post = (url) => api("POST", url);

  // --- status line and messages ---
  function banner(kind, title, text) {
    const node = $("banner");
    if (!kind) { node.hidden = true; node.replaceChildren(); return; }
    node.className = "banner " + kind;
    node.replaceChildren(el("strong", null, title), ...text);
    node.hidden = false;
  }
  function setLive(state, text) {
    $("dot").className = "dot " + state;
    $("updated").textContent = text;
  }
  function unauthorized(err) {
    halted = true;
    me = null;
    setLive("down", "not authorized");
    $("main").hidden = true;  // never leave another key's numbers on screen
    $("role").replaceChildren();
    $("key-input").focus();
    if (!loadKey()) {
      banner("error", "An API key is needed (401).", [
        "Open this page as ", el("code", null, "/dashboard#key=fvb-…"),
        " or paste a key above. Create one with ", el("code", null, "fvb keys create --tenant NAME"), ".",
      ]);
    } else {
      banner("error", "The API key was rejected (401).", [
        err.message + " ", "Paste a valid key above (create one with ",
        el("code", null, "fvb keys create --tenant NAME"), ").",
      ]);
    }
  }
  function actionFailed(what, err) {
    banner("error", what + " failed" + (err.status ? " (" + err.status + ")" : "") + ".",
      [err.message, err.code ? " " : "", err.code ? el("code", null, err.code) : null]);
  }

  // --- overview ---
  function renderCounts(counts) {
    const selected = route.view === "jobs" ? (route.params.get("state") || "") : null;
    const cards = STATE_CARDS.map(([name, label]) => {
      const state = CARD_STATE[name];
      let value = counts[name];
      let detail = "";
      if (name === "failed") { value = counts.failed - counts.cancelled; detail = "final failures"; }
      if (name === "total") detail = "all states";
      return el("a", {
        class: "card plain s-" + name + (selected === state ? " selected" : ""),
        id: "count-" + name, href: "#/jobs" + (state ? "?state=" + state : ""),
        title: "list " + (state || "all") + " jobs", "data-value": String(value),
      }, el("div", { class: "label" }, label), el("div", { class: "value" }, value),
        el("div", { class: "detail" }, detail));
    });
    $("counts").replaceChildren(...cards);
  }
  function renderRates(data) {
    for (const t of data.throughput || []) {
      const id = "tp" + t.window_minutes;
      if (!$(id)) continue;
      $(id).textContent = fmtRate(t.per_minute);
      $(id + "-detail").textContent = t.completed + " completed in " + t.window_minutes + " min";
    }
    const rt = data.run_time;
    if (rt) {
      $("median").textContent = fmtDuration(rt.median_s);
      $("p95").textContent = fmtDuration(rt.p95_s);
      $("median-detail").textContent = rt.samples + " succeeded in the last " + rt.window_minutes + " min";
      $("p95-detail").textContent = rt.samples ? "claim to success" : "no samples yet";
    }
    const fleet = Array.isArray(data.fleet) ? data.fleet : null;
    if (fleet) {
      const live = fleet.filter((w) => !w.stale).length;
      $("workers-count").replaceChildren(String(live), el("small", null, " / " + fleet.length));
      $("workers-detail").textContent = "live / known to you";
    } else {
      $("workers-count").replaceChildren(String((data.workers || []).length),
        el("small", null, " / " + data.live_workers_all_tenants));
      $("workers-detail").textContent = "running your jobs / live, all tenants";
    }
  }
  function renderPools(pools) {
    const rows = (pools || []).map((p) => el("tr", null,
      el("td", null, p.pool), el("td", { class: "mono muted" }, p.queue),
      el("td", { class: "num" }, p.queued), el("td", { class: "num muted" }, p.yours_queued),
      el("td", { class: "num" }, p.running), el("td", { class: "num muted" }, p.yours_running)));
    $("pools").replaceChildren(...(rows.length ? rows : [emptyRow(6, "No pools configured.")]));
  }

  // --- charts (SVG, drawn from the JSON) ---
  // series: [{name, color, values: [number|null per x], kind: "line"|"bar"}], xs: unix minutes
  function chart(container, xs, series, opts) {
    // The drawing's width is the container's, so text and lines are never stretched.
    const W = Math.max(240, Math.round(container.clientWidth || 480)), H = 180, L = 44, R = 10, T = 8, B = 22;
    const stacked = series.filter((s) => s.kind === "bar");
    let max = 0;
    xs.forEach((_, i) => {
      const barSum = stacked.reduce((sum, s) => sum + (s.values[i] || 0), 0);
      max = Math.max(max, barSum);
      for (const s of series) if (s.kind !== "bar" && s.values[i] !== null) max = Math.max(max, s.values[i]);
    });
    if (max <= 0) max = 1;
    const nice = niceMax(max);
    const x0 = xs[0], x1 = xs[xs.length - 1];
    const span = Math.max(60, x1 - x0);
    const X = (x) => L + (W - L - R) * ((x - x0) / span);
    const Y = (y) => T + (H - T - B) * (1 - y / nice);
    const root = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": opts.label });
    for (let k = 0; k <= 4; k++) {
      const v = (nice * k) / 4;
      root.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: Y(v), y2: Y(v) }));
      root.append(svg("text", { x: L - 4, y: Y(v) + 3, "text-anchor": "end" }, opts.format(v)));
    }
    [["start", x0], ["middle", x0 + span / 2], ["end", x0 + span]].forEach(([anchor, x]) => {
      const d = new Date(x * 1000);
      root.append(svg("text", { x: X(x), y: H - 6, "text-anchor": anchor }, pad(d.getHours()) + ":" + pad(d.getMinutes())));
    });
    const barWidth = Math.max(1, ((W - L - R) / Math.max(1, span / 60)) * 0.8);
    xs.forEach((x, i) => {
      let base = 0;
      for (const s of stacked) {
        const v = s.values[i] || 0;
        if (v > 0) {
          root.append(svg("rect", { x: X(x) - barWidth / 2, width: barWidth, y: Y(base + v),
            height: Y(base) - Y(base + v), fill: s.color, "data-series": s.name },
          svg("title", null, fmtTime(x) + " " + s.name + ": " + v)));
        }
        base += v;
      }
    });
    for (const s of series) {
      if (s.kind === "bar") continue;
      let d = "";
      s.values.forEach((v, i) => {
        if (v === null || v === undefined) return;
        d += (d && s.values[i - 1] !== null && s.values[i - 1] !== undefined ? "L" : "M")
          + X(xs[i]).toFixed(1) + "," + Y(v).toFixed(1);
      });
      if (d) {
        root.append(svg("path", { d, fill: "none", stroke: s.color, "stroke-width": 1.6,
          "stroke-dasharray": s.dash || null, "data-series": s.name }));
      }
      s.values.forEach((v, i) => {
        if (v === null || v === undefined) return;
        root.append(svg("circle", { cx: X(xs[i]), cy: Y(v), r: 1.8, fill: s.color },
          svg("title", null, fmtTime(xs[i]) + " " + s.name + ": " + opts.format(v))));
      });
    }
    const legend = el("div", { class: "legend" }, ...series.map((s) => {
      const swatch = el("i");
      swatch.style.background = s.color;
      return el("span", null, swatch, s.name + (opts.totals ? " " + s.values.reduce((a, b) => a + (b || 0), 0) : ""));
    }));
    container.replaceChildren(root, legend);
  }
  function niceMax(v) {
    const exp = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * exp) return m * exp;
    return 10 * exp;
  }
  function fmtTick(v) {
    return Number.isInteger(v) ? String(v) : v.toFixed(v < 1 ? 2 : 1);
  }
  function chartEmpty(container, text) {
    container.replaceChildren(el("div", { class: "empty" }, text));
  }
  function renderCharts(data) {
    const charts = data.charts;
    const tp = $("chart-throughput"), lat = $("chart-latency"), depth = $("chart-depth");
    const perMinute = charts && Array.isArray(charts.per_minute) ? charts.per_minute : [];
    const totals = perMinute.reduce((t, m) => [t[0] + (m.completed || 0), t[1] + (m.failed || 0)], [0, 0]);
    tp.dataset.completed = String(totals[0]);
    tp.dataset.failed = String(totals[1]);
    tp.dataset.minutes = String(perMinute.length);
    if (!perMinute.length) {
      chartEmpty(tp, charts ? "Nothing finished in the last hour." : "No chart data from this server yet.");
      chartEmpty(lat, charts ? "No run times in the last hour." : "No chart data from this server yet.");
    } else {
      const xs = perMinute.map((m) => m.minute);
      chart(tp, xs, [
        { name: "completed", color: "#1f9d55", kind: "bar", values: perMinute.map((m) => m.completed || 0) },
        { name: "failed", color: "#d64545", kind: "bar", values: perMinute.map((m) => m.failed || 0) },
      ], { label: "completed and failed per minute", format: fmtTick, totals: true });
      const pick = (field) => perMinute.map((m) => (m[field] === null || m[field] === undefined ? null : m[field]));
      const fields = ["queue_wait_p50_s", "queue_wait_p95_s", "render_p50_s", "render_p95_s"];
      if (fields.every((f) => pick(f).every((v) => v === null))) {
        chartEmpty(lat, "No run times in the last hour.");
      } else {
        chart(lat, xs, [
          { name: "queue wait p50", color: "#8a94a6", values: pick("queue_wait_p50_s") },
          { name: "queue wait p95", color: "#8a94a6", dash: "4 3", values: pick("queue_wait_p95_s") },
          { name: "render p50", color: "#3563e9", values: pick("render_p50_s") },
          { name: "render p95", color: "#3563e9", dash: "4 3", values: pick("render_p95_s") },
        ], { label: "queue wait and render time", format: (v) => fmtDuration(v) });
      }
    }
    const samples = charts && Array.isArray(charts.queue_depth) ? charts.queue_depth : [];
    depth.dataset.samples = String(samples.length);
    if (!samples.length) {
      chartEmpty(depth, charts ? "No queue samples in the last hour." : "No chart data from this server yet.");
    } else {
      const xs = [...new Set(samples.map((s) => s.minute))].sort((a, b) => a - b);
      const pools = [...new Set(samples.map((s) => s.pool))].sort();
      const index = new Map(xs.map((x, i) => [x, i]));
      const series = pools.map((pool, p) => {
        const values = xs.map(() => null);
        for (const s of samples) if (s.pool === pool) values[index.get(s.minute)] = s.queued;
        return { name: pool, color: SERIES_COLORS[p % SERIES_COLORS.length], values };
      });
      chart(depth, xs, series, { label: "queue depth per pool", format: fmtTick });
    }
  }

  // --- workers ---
  function renderFleet(data) {
    const rows = [];
    const fleet = Array.isArray(data.fleet) ? data.fleet : null;
    const now = data.generated_at || nowUnix();
    if (fleet) {
      for (const w of fleet) {
        const gpus = el("div", { class: "gpus" }, ...(w.gpus || []).map((g) => {
          const used = g.memory_total_mib ? (100 * g.memory_used_mib) / g.memory_total_mib : 0;
          return el("div", { class: "gpu", title: g.name },
            el("span", null, "#" + g.index + " " + g.name + " · " + g.utilization_pct + "% · " + g.temperature_c + " °C"),
            el("span", { title: g.memory_used_mib + " / " + g.memory_total_mib + " MiB" }, progressBar(used, "s-in_progress")));
        }));
        const state = w.stale ? el("span", { class: "badge stale" }, "stale")
          : w.current_job ? el("span", { class: "badge busy" }, "busy") : el("span", { class: "badge idle" }, "idle");
        const job = w.current_job
          ? el("div", null, el("a", { href: "#/jobs/" + encodeURIComponent(w.current_job.id), class: "mono" }, w.current_job.id),
            progressBar(w.current_job.progress || 0, "s-in_progress"))
          : el("span", { class: "muted" }, "–");
        rows.push(el("tr", { "data-worker": w.worker_id },
          el("td", { class: "mono" }, w.worker_id), el("td", null, w.host), el("td", null, w.pool),
          el("td", null, state), el("td", null, (w.gpus || []).length ? gpus : el("span", { class: "muted" }, "CPU")),
          el("td", null, job), el("td", { class: "num" }, w.jobs_done),
          el("td", { class: "num" }, Math.round(100 * (w.busy_fraction_10m || 0)) + "%"),
          el("td", { class: "num", title: new Date(w.heartbeat_at * 1000).toISOString() }, fmtAgo(now - w.heartbeat_at)),
          el("td", { class: "models" }, (w.loaded_models || []).join(", ") || "–")));
      }
      $("fleet-note").textContent = me && me.operator ? "every worker, idle ones too"
        : "the workers running your jobs";
    } else {
      // A server without fleet telemetry: the workers running this tenant's jobs.
      for (const w of data.workers || []) {
        for (const job of w.jobs) {
          rows.push(el("tr", { "data-worker": w.worker_id },
            el("td", { class: "mono" }, w.worker_id), el("td", { class: "muted" }, "–"), el("td", { class: "muted" }, "–"),
            el("td", null, el("span", { class: "badge busy" }, "busy")), el("td", { class: "muted" }, "–"),
            el("td", null, el("a", { href: "#/jobs/" + encodeURIComponent(job.id), class: "mono" }, job.id),
              progressBar(job.progress, "s-in_progress")),
            el("td", { class: "num muted" }, "–"), el("td", { class: "num muted" }, "–"),
            el("td", { class: "num" }, fmtAgo(now - job.heartbeat_at)), el("td", { class: "muted" }, "–")));
        }
      }
      $("fleet-note").textContent = "running your jobs (this server sends no fleet telemetry)";
    }
    $("fleet").replaceChildren(...(rows.length ? rows : [emptyRow(10, "No live worker.")]));
  }

  // --- batches ---
  function batchClass(status) {
    return status.startsWith("cancel") ? "s-cancelled" : status === "completed" ? "s-completed" : "s-in_progress";
  }
  function segments(c) {
    const bar = el("div", { class: "bar" });
    for (const [name, cls] of [["completed", "s-completed"], ["failed", "s-failed"], ["cancelled", "s-cancelled"], ["in_progress", "s-in_progress"]]) {
      if (!c.total || !c[name]) continue;
      const seg = el("div", { class: "seg " + cls, title: name + " " + c[name] });
      seg.style.width = (100 * c[name]) / c.total + "%";
      bar.append(seg);
    }
    return bar;
  }
  function renderBatches(data) {
    const rows = (data.batches || []).map((b) => {
      const c = b.request_counts;
      const finished = c.completed + c.failed + c.cancelled;
      const percent = c.total ? (100 * finished) / c.total : 0;
      return el("tr", { class: "clickable", "data-batch": b.id, onclick: () => go("#/batches/" + encodeURIComponent(b.id)) },
        el("td", { class: "mono" }, el("a", { href: "#/batches/" + encodeURIComponent(b.id), class: "plain" }, b.id)),
        el("td", null, b.name || el("span", { class: "muted" }, "–")),
        el("td", null, el("span", { class: "badge " + batchClass(b.status) }, b.status)),
        el("td", { title: finished + " of " + c.total + " videos finished" }, progressBar(percent, batchClass(b.status))),
        el("td", { class: "num" }, c.queued), el("td", { class: "num" }, c.in_progress),
        el("td", { class: "num" }, c.completed), el("td", { class: "num" }, c.failed),
        el("td", { class: "num" }, c.cancelled),
        el("td", { title: new Date(b.created_at * 1000).toISOString() }, fmtTime(b.created_at)));
    });
    $("batches").replaceChildren(...(rows.length ? rows : [emptyRow(10, "No batches yet.")]));
    $("batches-note").textContent = "newest " + (data.batches || []).length + " of tenant " + data.tenant;
  }
  async function loadBatch(signal) {
    const id = route.id;
    const b = await get(BASE + "/batches/" + encodeURIComponent(id), signal);
    if (route.view !== "batch" || route.id !== id) return;
    const c = b.request_counts;
    const finished = c.completed + c.failed + c.cancelled;
    $("batch-id").textContent = b.id;
    $("batch-badge").replaceChildren(el("span", { class: "badge " + batchClass(b.status) }, b.status));
    $("batch-name").textContent = b.name ? "name " + b.name : "";
    $("batch-jobs").href = "#/jobs?batch_id=" + encodeURIComponent(b.id);
    $("batch-progress").replaceChildren(segments(c),
      el("div", { class: "note", id: "batch-finished" }, finished + " of " + c.total + " finished (" +
        (c.total ? Math.round((100 * finished) / c.total) : 0) + "%)"));
    const p = b.progress;
    const facts = [
      ["Total", c.total], ["Queued", c.queued], ["Running", c.in_progress], ["Completed", c.completed],
      ["Failed", c.failed], ["Cancelled", c.cancelled],
      ["Throughput", p ? (p.videos_per_second * 60).toFixed(2) + " videos/min (" + p.finished_in_window + " in the last " + Math.round(p.window_seconds / 60) + " min)" : "–"],
      ["ETA", p && p.eta_seconds !== null ? fmtDuration(p.eta_seconds) : "–"],
      ["Created", fmtTime(b.created_at)],
      ["Retention", b.retention_seconds ? fmtDuration(b.retention_seconds) : "the deployment's"],
      ["Metadata", Object.entries(b.metadata || {}).map(([k, v]) => k + "=" + v).join(", ") || "–"],
    ];
    $("batch-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", null, k), el("dd", { "data-fact": k.toLowerCase() }, v)]));
    $("batch-retry").disabled = !c.failed;
    $("batch-cancel").disabled = b.status === "cancelled" || b.status === "cancelling" || b.status === "completed";
  }

  // --- jobs list ---
  function jobFilterQuery() {
    const p = route.params;
    const query = new URLSearchParams();
    for (const name of ["state", "model", "batch_id", "tenant", "q"]) {
      if (p.get(name)) query.set(name, p.get(name));
    }
    const range = p.get("range");
    if (range && range !== "custom") query.set("created_after", String(Math.floor(nowUnix() - Number(range))));
    if (range === "custom") {
      if (p.get("from")) query.set("created_after", String(Math.floor(new Date(p.get("from")).getTime() / 1000)));
      if (p.get("to")) query.set("created_before", String(Math.ceil(new Date(p.get("to")).getTime() / 1000)));
    }
    return query;
  }
  function fillFilterForm() {
    const p = route.params;
    $("f-state").value = p.get("state") || "";
    $("f-model").value = p.get("model") || "";
    $("f-batch").value = p.get("batch_id") || "";
    $("f-tenant").value = p.get("tenant") || "";
    $("f-range").value = p.get("range") || "";
    $("f-from").value = p.get("from") || "";
    $("f-to").value = p.get("to") || "";
    $("f-q").value = p.get("q") || "";
    const custom = $("f-range").value === "custom";
    $("f-from-label").hidden = !custom;
    $("f-to-label").hidden = !custom;
  }
  async function ensureModels() {
    if (models) return;
    try {
      const list = await get(API_ROOT + "/v1/models");
      models = list.data.map((m) => m.id).sort();
    } catch { models = []; }
    const select = $("f-model");
    const current = route.params.get("model") || "";
    select.replaceChildren(el("option", { value: "" }, "all"), ...models.map((m) => el("option", { value: m }, m)));
    if (current && !models.includes(current)) select.append(el("option", { value: current }, current));
    select.value = current;
  }
  async function loadJobs(signal, older) {
    const query = jobFilterQuery();
    const key = query.toString().replace(/(^|&)created_(after|before)=\d+/g, "") + "|" + (route.params.get("range") || "");
    if (key !== jobsState.key) {
      Object.assign(jobsState, { key, rows: [], firstPage: 0, cursor: null, truncated: false, more: false });
    }
    if (older && jobsState.cursor) query.set("cursor", jobsState.cursor);
    query.set("limit", "50");
    const page = await get(BASE + "/jobs?" + query.toString(), signal);
    if (route.view !== "jobs" || key !== jobsState.key) return;
    if (older) {
      jobsState.rows = jobsState.rows.concat(page.data);
      jobsState.cursor = page.next_cursor;
      jobsState.truncated = page.truncated_scan;
      jobsState.more = page.has_more;
    } else {
      // The live refresh replaces the newest page; older pages loaded by hand stay.
      const kept = jobsState.rows.slice(jobsState.firstPage).filter((r) => !page.data.some((n) => n.id === r.id));
      jobsState.rows = page.data.concat(kept);
      if (jobsState.rows.length === page.data.length) {
        jobsState.cursor = page.next_cursor;
        jobsState.truncated = page.truncated_scan;
        jobsState.more = page.has_more;
      }
      jobsState.firstPage = page.data.length;
      jobsState.scanLimit = page.scan_limit;
    }
    renderJobs(page.scan_limit);
  }
  function renderJobs(scanLimit) {
    const operator = me && me.operator;
    $("th-tenant").hidden = !operator;
    const now = nowUnix();
    const rows = jobsState.rows.map((job) => el("tr", {
      class: "clickable", "data-job": job.id, "data-state": job.state,
      onclick: () => go("#/jobs/" + encodeURIComponent(job.id)),
    },
    el("td", { class: "mono" }, el("a", { href: "#/jobs/" + encodeURIComponent(job.id), class: "plain" }, job.id)),
    operator ? el("td", { "data-tenant": job.tenant }, job.tenant) : null,
    el("td", null, job.model),
    el("td", null, stateBadge(job.state, job.cancel_requested && job.state === "running" ? " · cancelling" : null)),
    el("td", null, progressBar(job.progress, STATE_CLASS[job.state] || "")),
    el("td", { class: "prompt-cell", title: job.prompt || "" }, job.prompt || "–"),
    el("td", { class: "num" }, job.attempt + " / " + job.max_attempts),
    el("td", { title: new Date(job.created_at * 1000).toISOString() }, fmtTime(job.created_at),
      " ", el("span", { class: "muted" }, "(" + fmtAgo(now - job.created_at) + ")")),
    el("td", { class: "num" }, fmtDuration(job.duration_s)),
    el("td", null, job.error_code ? el("span", { class: "err" + (job.state === "cancelled" ? " cancelled" : "") }, job.error_code)
      : el("span", { class: "muted" }, "–"))));
    const filtered = [...route.params.keys()].length > 0;
    $("jobs").replaceChildren(...(rows.length ? rows
      : [emptyRow(operator ? 10 : 9, jobsState.truncated
        ? "No match among the newest " + scanLimit + " jobs; search older ones below."
        : filtered ? "No job matches these filters." : "No jobs yet.")]));
    $("jobs-note").textContent = jobsState.rows.length + " shown" + (operator ? " · every tenant (operator key)" : "");
    $("jobs-more").hidden = !jobsState.more;
    $("jobs-more").textContent = jobsState.truncated ? "Search older jobs" : "Load older";
    $("jobs-foot").textContent = jobsState.truncated
      ? "The state, model and prompt filters look at " + scanLimit + " jobs per request, newest first; older ones are searched on demand."
      : "";
  }

  // --- one job ---
  function kvs(node, pairs) {
    node.replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", null, k), el("dd", { "data-key": k }, v)]));
  }
  function paramValue(v) {
    if (v === null || v === undefined) return "–";
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  }
  async function loadJob(signal) {
    const id = route.id;
    const job = await get(BASE + "/jobs/" + encodeURIComponent(id), signal);
    if (route.view !== "job" || route.id !== id) return;
    renderJob(job);
  }
  function renderJob(job) {
    $("job-id").textContent = job.id;
    $("job-badge").replaceChildren(stateBadge(job.state, job.cancel_requested && job.state === "running" ? " · cancelling" : null));
    $("job-tenant").textContent = "tenant " + job.tenant + " · " + job.model + " · pool " + job.pool;
    $("job-progress").replaceChildren(progressBar(job.progress, STATE_CLASS[job.state] || ""));
    $("job-cancel").disabled = !job.actions.cancel;
    $("job-retry").disabled = !job.actions.retry;
    $("job-delete").disabled = !job.actions.delete;
    if (armedDelete !== job.id) { $("job-delete").classList.remove("armed"); $("job-delete").textContent = "Delete"; }
    const errorBox = $("job-error");
    if (job.error_code && (job.state === "failed" || job.state === "cancelled" || job.state === "queued")) {
      errorBox.hidden = false;
      errorBox.replaceChildren(el("strong", null, job.state === "queued" ? "Last attempt's error: " : "Error: "),
        el("code", { id: "job-error-code" }, job.error_code), " ",
        el("span", { id: "job-error-message" }, job.error_message || ""));
    } else {
      errorBox.hidden = true;
      errorBox.replaceChildren();
    }
    $("job-prompt").textContent = job.prompt || "–";
    $("job-negative").replaceChildren(...(job.negative_prompt
      ? [el("div", { class: "panel-head" }, el("h2", null, "Negative prompt")), el("div", { class: "prompt-text" }, job.negative_prompt)] : []));
    const params = Object.entries(job.params).filter(([k]) => k !== "prompt" && k !== "negative_prompt");
    kvs($("job-params"), [
      ["size", job.size], ...params.map(([k, v]) => [k, paramValue(v)]),
      ["priority", String(job.priority)], ["batch", job.batch_id || "–"], ["item key", job.item_key || "–"],
      ...Object.entries(job.result || {}).map(([k, v]) => ["result." + k, paramValue(v)]),
      ["output", job.output ? job.output.uri + " (" + fmtBytes(job.output.bytes) + ")" : "–"],
      ["sha256", job.output && job.output.sha256 ? job.output.sha256 : "–"],
      ["expires", job.expired ? "expired" : job.expires_at ? fmtTime(job.expires_at) : "kept until deleted"],
    ]);
    const timings = Object.entries(job.stage_timings || {});
    const total = timings.reduce((t, [, v]) => t + (typeof v === "number" ? v : 0), 0);
    $("job-timings").replaceChildren(...(timings.length ? timings.map(([name, seconds]) => {
      const fill = el("div", { class: "fill" });
      fill.style.width = (total ? (100 * seconds) / total : 0) + "%";
      return el("div", { class: "timing", "data-stage": name }, el("span", null, name), el("div", { class: "bar" }, fill),
        el("span", { class: "num" }, Number(seconds).toFixed(3)));
    }) : [el("div", { class: "note", style: null }, "No stage timings (recorded when an attempt succeeds).")]));
    kvs($("job-attempts"), [
      ["attempt", job.attempt + " of " + job.max_attempts],
      ["worker", job.worker_id || "–"],
      ["created", fmtTime(job.created_at)], ["started", fmtTime(job.started_at)],
      ["finished", fmtTime(job.finished_at)], ["heartbeat", fmtTime(job.heartbeat_at)],
      ["queue wait", fmtDuration(job.queue_wait_s)], ["run time", fmtDuration(job.duration_s)],
    ]);
    $("events-note").textContent = job.events.length + " events" + (job.events_truncated ? " (the first ones)" : "");
    $("job-events").replaceChildren(...(job.events.length ? job.events.map((e) => el("tr", { "data-to": e.to_status },
      el("td", { title: new Date(e.at * 1000).toISOString() }, fmtTime(e.at)),
      el("td", null, e.from_status || "–"), el("td", null, e.to_status),
      el("td", { class: "num" }, e.attempt), el("td", { class: "muted" }, e.detail || "–")))
      : [emptyRow(5, "No events.")]));
    renderVideo(job);
  }
  async function renderVideo(job) {
    const box = $("video-box");
    if (!job.actions.play) {
      videoFor = null;
      box.replaceChildren(el("div", { class: "note", style: null }, job.expired ? "This video expired; its files were deleted."
        : job.state === "succeeded" ? "No stored video." : "The video plays here once the job has succeeded."));
      $("video-note").textContent = "";
      return;
    }
    if (videoFor === job.id) return;  // already playing: a refresh must not restart it
    videoFor = job.id;
    try {
      const link = await post(BASE + "/jobs/" + encodeURIComponent(job.id) + "/media");
      if (videoFor !== job.id) return;
      const video = el("video", { id: "player", controls: "", preload: "auto", playsinline: "", loop: "",
        "data-job": job.id, src: link.url });
      video.muted = true;
      box.replaceChildren(video);
      $("video-note").textContent = (job.result.frames ? job.result.frames + " frames at " + job.result.fps + " fps · " : "")
        + "link valid until " + fmtTime(link.expires_at);
    } catch (err) {
      videoFor = null;
      box.replaceChildren(el("div", { class: "errbox" }, "Cannot play: " + err.message));
    }
  }
  async function jobAction(action) {
    const id = route.id;
    if (action === "delete" && armedDelete !== id) {
      armedDelete = id;
      $("job-delete").classList.add("armed");
      $("job-delete").textContent = "Click again to delete";
      return;
    }
    armedDelete = null;
    for (const b of ["job-cancel", "job-retry", "job-delete"]) $(b).disabled = true;
    try {
      const result = await post(BASE + "/jobs/" + encodeURIComponent(id) + "/" + action);
      banner(null);
      if (action === "delete") { go("#/jobs"); return; }
      videoFor = null;
      renderJob(result);
    } catch (err) {
      if (err.status === 401) { unauthorized(err); return; }
      actionFailed(action[0].toUpperCase() + action.slice(1), err);
      refresh();
    }
  }
  async function batchAction(action) {
    const id = route.id;
    try {
      await post(BASE + "/batches/" + encodeURIComponent(id) + "/" + action);
      banner(null);
      refresh();
    } catch (err) {
      if (err.status === 401) { unauthorized(err); return; }
      actionFailed(action === "cancel" ? "Cancel" : "Retry failed", err);
    }
  }
  async function exportManifest() {
    try {
      const link = await post(BASE + "/batches/" + encodeURIComponent(route.id) + "/manifest");
      const a = el("a", { href: link.url, download: route.id + ".manifest.jsonl", id: "manifest-link" });
      document.body.append(a);
      a.click();
      a.remove();
    } catch (err) {
      actionFailed("Export", err);
    }
  }

  // --- the view in hand, refreshed every REFRESH_MS ---
  function showView() {
    for (const name of ["overview", "jobs", "job", "batches", "batch", "workers"]) {
      $("view-" + name).hidden = route.view !== name;
    }
    const tab = route.view === "job" ? "jobs" : route.view === "batch" ? "batches" : route.view;
    for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.view === tab);
    if (route.view === "jobs") fillFilterForm();
    if (route.view !== "job") { videoFor = null; $("video-box").replaceChildren(); }
  }
  async function loadMe(signal) {
    if (me) return;
    me = await get(BASE + "/me", signal);
    $("role").replaceChildren("tenant " + me.tenant, me.operator ? " " : "",
      me.operator ? el("span", { class: "badge", id: "operator-badge" }, "operator") : "");
    $("f-tenant-label").hidden = !me.operator;
  }
  async function loadView(signal) {
    await loadMe(signal);
    if (route.view === "jobs") {
      await ensureModels();
      await loadJobs(signal, false);
    } else if (route.view === "job") {
      await loadJob(signal);
    } else if (route.view === "batch") {
      await loadBatch(signal);
    } else if (route.view === "workers") {
      renderFleet(await get(BASE + "/fleet", signal));
    } else {
      const data = await get(DATA_URL, signal);
      if (route.view === "overview") {
        renderCounts(data.counts);
        renderRates(data);
        renderCharts(data);
        renderPools(data.pools);
      } else if (route.view === "batches") {
        renderBatches(data);
      }
    }
  }
  function schedule() {
    clearTimeout(timer);
    if (halted) return;
    timer = setTimeout(() => { if (!document.hidden) refresh(); else schedule(); }, REFRESH_MS);
  }
  async function refresh() {
    clearTimeout(timer);
    if (inflight) inflight.abort();
    const controller = new AbortController();
    inflight = controller;
    const deadline = setTimeout(() => controller.abort(), TIMEOUT_MS);
    try {
      await loadView(controller.signal);
      if (inflight !== controller) return;
      $("main").hidden = false;
      lastOk = Date.now();
      if ($("banner").classList.contains("warn")) banner(null);
      setLive("ok", "updated " + fmtTime(nowUnix()) + " · every 2 s");
    } catch (err) {
      if (inflight !== controller) return;
      if (err.status === 401) { unauthorized(err); return; }
      if (err.status === 404 && (route.view === "job" || route.view === "batch")) {
        $("main").hidden = false;
        banner("error", "Not found (404).", [err.message]);
        return;
      }
      const reason = err.name === "AbortError" ? "no answer in " + TIMEOUT_MS / 1000 + " s" : err.message;
      setLive(lastOk ? "stale" : "down", lastOk ? "stale since " + fmtTime(lastOk / 1000) : "no data");
      banner("warn", "Cannot load the dashboard data; retrying every 2 s.", [reason]);
    } finally {
      clearTimeout(deadline);
      if (inflight === controller) {
        inflight = null;
        schedule();
      }
    }
  }
  async function loadOlder() {
    try {
      await loadJobs(undefined, true);
    } catch (err) {
      actionFailed("Loading older jobs", err);
    }
  }

  // --- wiring ---
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    saveKey(key);
    $("key-input").value = "";
    me = null;
    models = null;
    jobsState.key = "-";
    halted = false;
    banner(null);
    setLive("", "loading…");
    refresh();
  });
  $("key-forget").addEventListener("click", () => {
    saveKey(null);
    me = null;
    halted = false;
    refresh();
  });
  $("job-filters").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    const params = new URLSearchParams();
    for (const [name, value] of form.entries()) {
      if (!String(value).trim()) continue;
      if ((name === "from" || name === "to") && form.get("range") !== "custom") continue;
      params.set(name, String(value).trim());
    }
    const query = params.toString();
    go("#/jobs" + (query ? "?" + query : ""));
  });
  $("f-range").addEventListener("change", () => {
    const custom = $("f-range").value === "custom";
    $("f-from-label").hidden = !custom;
    $("f-to-label").hidden = !custom;
  });
  $("f-reset").addEventListener("click", () => go("#/jobs"));
  $("jobs-more").addEventListener("click", loadOlder);
  $("job-cancel").addEventListener("click", () => jobAction("cancel"));
  $("job-retry").addEventListener("click", () => jobAction("retry"));
  $("job-delete").addEventListener("click", () => jobAction("delete"));
  $("batch-cancel").addEventListener("click", () => batchAction("cancel"));
  $("batch-retry").addEventListener("click", () => batchAction("retry_failed"));
  $("batch-export").addEventListener("click", exportManifest);
  document.addEventListener("visibilitychange", () => { if (!document.hidden && !halted) refresh(); });
  window.addEventListener("hashchange", () => {
    readFragment();
    armedDelete = null;
    showView();
    halted = false;
    refresh();
  });

  readFragment();
  showView();
  refresh();
})();
