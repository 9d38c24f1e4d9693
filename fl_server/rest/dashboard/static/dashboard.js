// Federated Learning Hub dashboard: polls the server's JSON and redraws small SVG charts.
// Plain JavaScript, no library, no network access beyond this server (see the page's CSP).
// Every plotted number is also in the DOM: each point or bar carries data-series, data-round and
// data-value (the value exactly as the JSON had it), and each chart's data-series attribute holds
// its series as JSON, so the page can be checked against /status.
"use strict";

(function () {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const COLORS = ["#1f77b4", "#d62728", "#7f7f7f", "#2ca02c", "#9467bd"];
  const params = new URLSearchParams(window.location.search);
  const pollMs = Math.max(250, Number(params.get("poll")) || Number(document.body.dataset.pollMs) || 2000);
  let adminToken = null; // held in memory only: never stored, never put in a URL
  let polls = 0;
  let timer = null;

  // ------------------------------------------------------------------ small DOM helpers
  function h(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function s(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function setText(id, text) {
    document.getElementById(id).textContent = text;
  }

  function fmt(value, digits) {
    if (value === null || value === undefined || value === "") return "\u2013";
    return Number(value).toFixed(digits);
  }

  function fmtBytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let v = Number(n);
    let u = 0;
    while (Math.abs(v) >= 1024 && u < units.length - 1) { v /= 1024; u += 1; }
    return (u === 0 ? String(Math.round(v)) : v.toFixed(v >= 100 ? 0 : 1)) + " " + units[u];
  }

  function fmtAxis(v) {
    const a = Math.abs(v);
    if (a !== 0 && (a < 0.01 || a >= 1e5)) return v.toExponential(1);
    return String(Number(v.toPrecision(3)));
  }

  function num(v) {
    return v === "" || v === null || v === undefined ? null : Number(v);
  }

  async function getJSON(url, headers) {
    const resp = await fetch(url, { headers: headers || {}, cache: "no-store", credentials: "omit" });
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (!resp.ok) {
      const err = new Error((body && body.message) || resp.statusText || "request failed");
      err.status = resp.status;
      err.code = body && body.error;
      throw err;
    }
    return body;
  }

  // ------------------------------------------------------------------ charts
  // series: [{name, label, kind: "line" | "bar", points: [[round, value], ...]}]
  // opts: {yMin, yMax, integer (whole-number ticks), budget: {value, label}, yFormat, valueFormat, empty,
  //        xLabel (axis title, default "round"), xName (the x value's name in a point's tooltip, default "round")}
  // The x value of a point is always in data-round, whatever the axis shows (a round, a model version, a staleness).
  function drawChart(id, series, opts) {
    opts = opts || {};
    const box = document.getElementById(id);
    const data = {};
    for (const sr of series) data[sr.name] = sr.points;
    box.dataset.series = JSON.stringify(data);
    box.replaceChildren();
    const all = series.flatMap((sr) => sr.points);
    if (all.length === 0) {
      box.append(h("p", { class: "empty" }, opts.empty || "no completed round yet"));
      return;
    }
    const W = 480, H = 230, L = 58, R = 14, T = 12, B = 34;
    const xs = all.map((p) => p[0]);
    const ys = all.map((p) => p[1]);
    if (opts.budget) ys.push(opts.budget.value);
    const xMin = Math.min(...xs), xMax = Math.max(...xs);
    let yMin = opts.yMin !== undefined ? opts.yMin : Math.min(...ys);
    let yMax = opts.yMax !== undefined ? opts.yMax : Math.max(...ys);
    if (opts.yMin === undefined && yMin > 0 && series.some((sr) => sr.kind === "bar")) yMin = 0;
    if (yMax === yMin) { yMax = yMin + (yMin === 0 ? 1 : Math.abs(yMin) * 0.1); }
    const ticks = [];
    if (opts.integer) { // counts: whole-number ticks, the top one at or above the highest bar
      yMin = Math.floor(yMin);
      const step = Math.max(1, Math.ceil((yMax - yMin) / 4));
      yMax = yMin + step * Math.max(1, Math.ceil((yMax - yMin) / step));
      for (let v = yMin; v <= yMax; v += step) ticks.push(v);
    } else {
      const pad = (yMax - yMin) * 0.06;
      if (opts.yMax === undefined) yMax += pad;
      if (opts.yMin === undefined && yMin !== 0) yMin -= pad;
      for (let i = 0; i <= 4; i += 1) ticks.push(yMin + ((yMax - yMin) * i) / 4);
    }
    const slots = xMax - xMin + 1;
    const slotW = (W - L - R) / slots;
    const X = (x) => L + (x - xMin + 0.5) * slotW;
    const Y = (y) => T + (H - T - B) * (1 - (y - yMin) / (yMax - yMin));
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": id });
    const yFormat = opts.yFormat || fmtAxis;
    for (const v of ticks) {
      svg.append(s("line", { class: "grid-line", x1: L, x2: W - R, y1: Y(v), y2: Y(v) }));
      svg.append(s("text", { x: L - 6, y: Y(v) + 4, "text-anchor": "end" }, yFormat(v)));
    }
    const step = Math.max(1, Math.ceil(slots / 12));
    for (let x = xMin; x <= xMax; x += step) {
      svg.append(s("text", { x: X(x), y: H - B + 16, "text-anchor": "middle" }, x));
    }
    svg.append(s("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, opts.xLabel || "round"));
    const xName = opts.xName || "round";
    svg.append(s("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
    svg.append(s("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
    const bars = series.filter((sr) => sr.kind === "bar");
    const barW = (slotW * 0.8) / Math.max(1, bars.length);
    series.forEach((sr, k) => {
      const color = COLORS[k % COLORS.length];
      const g = s("g", { "data-series": sr.name });
      if (sr.kind === "bar") {
        const j = bars.indexOf(sr);
        for (const [x, y] of sr.points) {
          const top = Y(Math.max(y, yMin));
          const base = Y(Math.max(yMin, 0));
          const rect = s("rect", {
            x: X(x) - (slotW * 0.8) / 2 + j * barW, y: Math.min(top, base), width: Math.max(1, barW - 1),
            height: Math.max(0.5, Math.abs(base - top)), fill: color,
            "data-series": sr.name, "data-round": x, "data-value": y,
          });
          rect.append(s("title", {}, `${xName} ${x}: ${sr.label || sr.name} ${opts.valueFormat ? opts.valueFormat(y) : y}`));
          g.append(rect);
        }
      } else {
        const pts = sr.points.map(([x, y]) => `${X(x)},${Y(y)}`).join(" ");
        if (sr.points.length > 1) g.append(s("polyline", { points: pts, fill: "none", stroke: color, "stroke-width": 2 }));
        for (const [x, y] of sr.points) {
          const c = s("circle", { cx: X(x), cy: Y(y), r: 3.5, fill: color,
                                   "data-series": sr.name, "data-round": x, "data-value": y });
          c.append(s("title", {}, `${xName} ${x}: ${sr.label || sr.name} ${y}`));
          g.append(c);
        }
      }
      svg.append(g);
    });
    if (opts.budget) {
      const line = s("line", { class: "budget", x1: L, x2: W - R, y1: Y(opts.budget.value), y2: Y(opts.budget.value),
                               "data-series": "budget", "data-value": opts.budget.value });
      line.append(s("title", {}, opts.budget.label));
      svg.append(line);
    }
    box.append(svg);
    const legend = h("ul", { class: "legend" });
    series.forEach((sr, k) => {
      const li = h("li");
      const sw = h("span", { class: "swatch" });
      sw.style.background = COLORS[k % COLORS.length]; // CSSOM, not a style attribute: the CSP forbids inline styles
      li.append(sw);
      li.append(document.createTextNode(sr.label || sr.name));
      legend.append(li);
    });
    if (opts.budget) {
      const li = h("li");
      li.append(h("span", { class: "swatch budget-swatch" }));
      li.append(document.createTextNode(opts.budget.label));
      legend.append(li);
    }
    box.append(legend);
  }

  function column(history, key) {
    const out = [];
    for (const row of history) {
      const v = num(row[key]);
      if (v !== null && Number.isFinite(v)) out.push([Number(row.round), v]);
    }
    return out;
  }

  // ------------------------------------------------------------------ panels
  function renderSummary(st) {
    setText("v-state", st.state.replace(/_/g, " ") + (st.stop_reason ? " (stopped early)" : ""));
    setText("v-rounds", `${st.completed_rounds} / ${st.num_rounds}`);
    setText("v-clients", `${st.clients.online} / ${st.clients.registered}`);
    setText("v-accuracy", fmt(st.accuracy, 4));
    setText("v-loss", fmt(st.loss, 4));
    const refused = Object.values(st.rejected || {}).reduce((a, b) => a + b, 0);
    setText("v-updates", `${st.updates_accepted} / ${refused}`);
    document.getElementById("summary").dataset.state = st.state;
  }

  function renderCurrentRound(st) {
    const box = document.getElementById("round-progress");
    box.replaceChildren();
    const cur = st.current_round;
    if (!cur) {
      delete box.dataset.round;
      const why = st.state === "finished" ? "the run has finished"
        : st.training_mode === "async" ? "asynchronous run: no rounds; each client trains on a model version as its own job " +
                                         "(see Asynchronous training)"
        : "no round is open: waiting for enough live clients";
      box.append(h("p", { class: "empty" }, why));
      return;
    }
    box.dataset.round = cur.round;
    box.dataset.selected = cur.selected;
    box.dataset.arrived = cur.arrived;
    box.dataset.quorum = cur.quorum;
    box.append(h("p", {}, `Round ${cur.round}: ${cur.arrived} of ${cur.quorum} updates needed have arrived; ` +
                        `${cur.selected} clients selected; deadline in ${Math.round(cur.deadline_in_s)} s.`));
    box.append(h("progress", { max: Math.max(1, cur.quorum), value: cur.arrived }));
  }

  function renderCharts(st, rounds) {
    const hist = st.history || [];
    drawChart("chart-accuracy", [{ name: "test_accuracy", label: "test accuracy", kind: "line",
                                   points: column(hist, "test_accuracy") }], { empty: "no evaluated round yet" });
    drawChart("chart-loss", [
      { name: "test_loss", label: "test loss", kind: "line", points: column(hist, "test_loss") },
      { name: "train_loss", label: "train loss (clients' mean)", kind: "line", points: column(hist, "train_loss") },
    ], { empty: "no loss recorded yet" });
    const closed = {};
    for (const a of (rounds && rounds.rounds) || []) if (a.state === "closed") closed[a.round] = a;
    const selected = hist.filter((r) => closed[r.round]).map((r) => [Number(r.round), closed[r.round].selected]);
    drawChart("chart-participation", [
      { name: "selected", label: "selected", kind: "bar", points: selected },
      { name: "clients", label: "updates aggregated", kind: "bar", points: column(hist, "clients") },
    ], { integer: true });
    drawChart("chart-bytes", [{ name: "bytes", label: "bytes", kind: "bar", points: column(hist, "bytes") }],
              { yFormat: fmtBytes, valueFormat: fmtBytes });
    renderPrivacy(st, hist);
    renderSecAgg(st);
    renderAsync(st, hist);
  }

  function renderPrivacy(st, hist) {
    const meter = document.getElementById("privacy-meter");
    meter.replaceChildren();
    const p = st.privacy || {};
    if (p.differential_privacy !== true) {
      meter.dataset.enabled = "false";
      meter.append(h("p", { class: "empty" }, "Differential privacy is off for this run: no privacy budget is tracked " +
                                             "and no (epsilon, delta) guarantee is claimed."));
      drawChart("chart-privacy", [{ name: "epsilon", label: "epsilon spent", kind: "line", points: [] }],
                { empty: "no epsilon: differential privacy is off" });
      return;
    }
    meter.dataset.enabled = "true";
    meter.dataset.spent = p.epsilon_spent;
    meter.dataset.budget = p.epsilon_budget;
    const share = p.epsilon_budget > 0 ? (100 * p.epsilon_spent) / p.epsilon_budget : 0;
    meter.append(h("p", {}, `epsilon spent ${fmt(p.epsilon_spent, 4)} of ${p.epsilon_budget} ` +
                           `(${share.toFixed(1)}%), delta ${p.delta}, ${p.mode}-level, ${p.accountant} accountant`));
    meter.append(h("meter", { min: 0, max: p.epsilon_budget, value: p.epsilon_spent }));
    drawChart("chart-privacy", [{ name: "epsilon", label: "epsilon spent", kind: "line", points: column(hist, "epsilon") }],
              { yMin: 0, budget: { value: p.epsilon_budget, label: `budget ${p.epsilon_budget}` },
                empty: "no round accounted yet" });
  }

  // ------------------------------------------------------------------ secure aggregation
  // The protocol's phases in order, with the set of clients /status counts for each (U1..U3, the
  // survivors that signed U3 in the consistency check, U4 the unmask answers: those whose message of
  // that phase was accepted; while the phase is open, so far).
  const SECAGG_PHASES = [["advertise_keys", "u1", "advertise keys"], ["share_keys", "u2", "share keys"],
                         ["masked_input", "u3", "masked input"],
                         ["consistency_check", "signed", "consistency check"], ["unmask", "u4", "unmask"]];
  const SECAGG_AUTH = {
    "ed25519": "key advertisements signed with Ed25519 (each client checks its neighbours' signatures)",
    "hmac-sha256": "key advertisements authenticated with HMAC-SHA256 (the server vouches for them: assumes an " +
                   "honest-but-curious server)",
  };

  function setData(node, values) {
    for (const [k, v] of Object.entries(values)) {
      if (v === null || v === undefined) delete node.dataset[k];
      else node.dataset[k] = v;
    }
  }

  // CKKS rounds (secure_aggregation_method: ckks): /status's ckks block, in the same panel
  const CKKS_PHASES = [["public_key", "public key"], ["inputs", "encrypted inputs"], ["decrypt", "decryption"]];

  // A protected round's per-phase table: rows of [phase, label, [[field, value], ...]], the current one marked.
  function phaseTable(id, titles, rows, current) {
    const table = h("table", { id: id, class: "phases" });
    const head = h("tr");
    for (const title of titles) head.append(h("th", {}, title));
    const thead = h("thead");
    thead.append(head);
    table.append(thead);
    const body = h("tbody");
    for (const [phase, label, cells] of rows) {
      const tr = h("tr", { "data-phase": phase });
      if (current === phase) { tr.className = "current"; tr.setAttribute("aria-current", "step"); }
      tr.append(h("td", { "data-field": "phase" }, label));
      for (const [field, value] of cells) {
        const td = h("td", { "data-field": field, class: "num" }, value === null ? "\u2013" : value);
        if (value !== null) td.dataset.value = value;
        tr.append(td);
      }
      body.append(tr);
    }
    table.append(body);
    return table;
  }

  // Completed rounds, aborted attempts and the last abort reasons of a protected-round block.
  function appendTotals(box, block, what) {
    box.append(h("p", { "data-field": "totals" }, `${block.rounds_completed} ${what} round(s) completed; ` +
                                                  `${block.aborted_attempts} attempt(s) aborted (nothing of them applied).`));
    if ((block.abort_reasons || []).length) {
      const ul = h("ul", { class: "abort-reasons" });
      for (const reason of block.abort_reasons) ul.append(h("li", {}, reason));
      box.append(ul);
    }
  }

  function renderCKKS(box, ck) {
    const cur = ck.current;
    setData(box, { enabled: "true", method: "ckks", phase: cur ? cur.phase : "none", threshold: null, auth: null,
                   attempt: cur ? cur.attempt : null, roundsCompleted: ck.rounds_completed,
                   abortedAttempts: ck.aborted_attempts, inputs: cur ? cur.inputs : null,
                   selected: cur ? cur.selected : null });
    box.append(h("p", { "data-field": "mode" }, "CKKS homomorphic encryption: each selected client encrypts its update " +
                                               "under the attempt's public key; the server adds ciphertexts and never " +
                                               "holds a key; one selected client, the decryptor, decrypts only the sum."));
    if (cur) {
      const label = (CKKS_PHASES.find((p) => p[0] === cur.phase) || [null, cur.phase.replace(/_/g, " ")])[1];
      box.append(h("p", { "data-field": "current" }, `Round ${cur.round}, attempt ${cur.attempt}: phase ${label}, ` +
                                                    `${Math.round(cur.deadline_in_s)} s left in it; ` +
                                                    `${cur.inputs} of ${cur.selected} selected clients' inputs in the sum.`));
    } else {
      box.append(h("p", { "data-field": "current", class: "empty" }, "No CKKS attempt is open."));
    }
    const order = CKKS_PHASES.map((p) => p[0]);
    const at = cur ? order.indexOf(cur.phase) : -1;
    const rows = CKKS_PHASES.map(([phase, label], i) => [phase, label, [
      ["state", !cur ? null : (i < at || cur.phase === "done" ? "done" : (i === at ? "open" : "pending"))],
      ["clients", cur && phase === "inputs" ? cur.inputs : null]]]);
    box.append(phaseTable("ckks-phases", ["phase", "state (this attempt)", "inputs summed (this attempt)"], rows,
                          cur ? cur.phase : null));
    appendTotals(box, ck, "CKKS");
  }

  function renderSecAgg(st) {
    const box = document.getElementById("secagg-panel");
    box.replaceChildren();
    if (st.ckks) {
      renderCKKS(box, st.ckks);
      return;
    }
    setData(box, { method: null, inputs: null, selected: null });
    const sa = st.secagg;
    if (!sa || sa.enabled !== true) {
      setData(box, { enabled: "false", phase: null, threshold: null, auth: null, attempt: null,
                     roundsCompleted: null, abortedAttempts: null });
      box.append(h("p", { class: "empty" }, "Secure aggregation is off for this run: the server sees each client's " +
                                           "update, not only their sum."));
      return;
    }
    const cur = sa.current;
    const last = sa.last_round || null;
    const params = cur || (last && last.params) || null; // between attempts: the last completed one's
    const auth = (cur && cur.auth) || (last && last.auth) || null;
    setData(box, { enabled: "true", phase: cur ? cur.phase : "none", threshold: params ? params.threshold : null,
                   auth: auth, attempt: cur ? cur.attempt : null, roundsCompleted: sa.rounds_completed,
                   abortedAttempts: sa.aborted_attempts });
    if (params) {
      const n = cur ? cur.selected : params.clients;
      const graph = params.complete_graph ? "classic SecAgg (every pair of clients masks)"
        : `SecAgg+ (neighbour graph of degree ${params.degree})`;
      const signed = SECAGG_AUTH[auth] || (auth ? `key advertisements signed with ${auth}` : "signature scheme not recorded");
      const feeds = cur && cur.aggregation ? `; the unmasked sum feeds the ${cur.aggregation} aggregator` : "";
      box.append(h("p", { "data-field": "mode" }, `${graph}; ${signed}${feeds}; integers mod 2^${params.modulus_bits} (a ring, not a field: uniform masks hide each input all the same).`));
      box.append(h("p", { "data-field": "threshold" }, `Threshold ${params.threshold}: ${cur ? "this" : "the last"} attempt ` +
                                                      `over ${n} clients unmasks only while at least ${params.threshold} ` +
                                                      `of a client's share holders remain.`));
      if (params.tolerated_corrupt !== undefined) {
        const bound = params.failure_bound === undefined ? "" : ` Planned failure bound ${Number(params.failure_bound)
          .toExponential(1)} (target ${Number(params.failure_target).toExponential(0)}` +
          `${params.failure_bound <= params.failure_target ? ", met" : ", NOT met"}).`;
        box.append(h("p", { "data-field": "active" }, `Against a server that lies about who dropped: every survivor signs ` +
                                                     `the survivor set, and a client reveals shares only once ${params.threshold} ` +
                                                     `of its share holders signed the same set; tolerates ` +
                                                     `${params.tolerated_corrupt} colluding client(s) per neighbourhood ` +
                                                     `(2t > holders + colluders).${bound}`));
      }
    } else {
      box.append(h("p", { class: "empty" }, "Secure aggregation is on; no attempt has been planned yet."));
    }
    if (cur) {
      const label = (SECAGG_PHASES.find((p) => p[0] === cur.phase) || [null, null, cur.phase.replace(/_/g, " ")])[2];
      box.append(h("p", { "data-field": "current" }, `Round ${cur.round}, attempt ${cur.attempt}: phase ${label}, ` +
                                                    `${Math.round(cur.deadline_in_s)} s left in it; ${cur.selected} clients selected.`));
    } else {
      box.append(h("p", { "data-field": "current", class: "empty" }, "No secure attempt is open."));
    }
    const curDrops = (cur && cur.dropouts_by_phase) || {};
    const pastDrops = sa.dropouts_by_phase || {};
    const rows = SECAGG_PHASES.map(([phase, set, label]) => [phase, label, [
      ["clients", cur ? cur[set] : null], ["dropped", cur ? (curDrops[phase] || 0) : null],
      ["dropped_total", pastDrops[phase] || 0]]]);
    box.append(phaseTable("secagg-phases", ["phase", "clients through it (this attempt)", "dropped (this attempt)",
                                            "dropped (finished attempts)"], rows, cur ? cur.phase : null));
    appendTotals(box, sa, "secure");
  }

  // ------------------------------------------------------------------ asynchronous training
  function renderAsync(st, hist) {
    const box = document.getElementById("async-panel");
    const summary = document.getElementById("async-summary");
    const charts = document.getElementById("async-charts");
    summary.replaceChildren();
    const a = st.asynchronous;
    if (st.training_mode !== "async" || !a) {
      setData(box, { mode: "sync", algorithm: null, modelVersion: null, buffered: null, bufferK: null, inFlight: null,
                     concurrency: null, updatesApplied: null });
      summary.append(h("p", { class: "empty" }, "Synchronous run: no staleness. Every round waits for its selected " +
                                              "clients, and each of them trains on the round's current model."));
      drawChart("chart-staleness", [{ name: "staleness_mean", kind: "line", points: [] }], { empty: "synchronous run" });
      drawChart("chart-staleness-hist", [{ name: "updates", kind: "bar", points: [] }], { empty: "synchronous run" });
      charts.hidden = true;
      return;
    }
    const sl = a.staleness || {};
    const fedbuff = a.buffer_k !== undefined && a.buffer_k !== null;
    setData(box, { mode: "async", algorithm: a.algorithm, modelVersion: a.model_version, buffered: a.buffered,
                   bufferK: fedbuff ? a.buffer_k : null, inFlight: a.in_flight, concurrency: a.concurrency,
                   updatesApplied: a.updates_applied });
    const name = a.algorithm === "fedbuff" ? "FedBuff" : a.algorithm === "fedasync" ? "FedAsync" : a.algorithm;
    summary.append(h("p", { "data-field": "version" }, `${name}: model version ${a.model_version} of ${st.num_rounds} ` +
                                                      `server updates; ${a.updates_applied} client update(s) applied; ` +
                                                      `${a.in_flight} of ${a.concurrency} training slots in use.`));
    if (fedbuff) {
      const p = h("p", { "data-field": "buffer" }, `Buffer: ${a.buffered} of K = ${a.buffer_k} updates waiting for ` +
                                                  "the next server update.");
      summary.append(p);
      summary.append(h("meter", { min: 0, max: a.buffer_k, value: a.buffered }));
    } else {
      summary.append(h("p", { "data-field": "buffer" }, `No buffer: each accepted update is mixed in at once ` +
                                                       `(alpha ${a.alpha}).`));
    }
    const limit = a.max_staleness === null || a.max_staleness === undefined ? "no limit" : `limit ${a.max_staleness}`;
    summary.append(h("p", { "data-field": "staleness" }, `Staleness of ${sl.accepted || 0} accepted update(s): mean ` +
                                                        `${fmt(sl.mean, 2)}, median ${fmt(sl.median, 1)}, p90 ` +
                                                        `${fmt(sl.p90, 1)}, max ${sl.max === null || sl.max === undefined ? "\u2013" : sl.max} ` +
                                                        `(${limit}; ${sl.refused_too_stale || 0} refused as too stale, ` +
                                                        `${sl.cancelled || 0} job(s) cancelled); weight ${a.staleness_function}.`));
    charts.hidden = false;
    drawChart("chart-staleness", [
      { name: "staleness_mean", label: "mean staleness", kind: "line", points: column(hist, "staleness_mean") },
      { name: "staleness_max", label: "max staleness", kind: "line", points: column(hist, "staleness_max") },
    ], { yMin: 0, xLabel: "model version (server update)", xName: "version", empty: "no server update yet" });
    const bins = Object.entries(sl.histogram || {}).map(([k, v]) => [Number(k), Number(v)]).sort((p, q) => p[0] - q[0]);
    drawChart("chart-staleness-hist", [{ name: "updates", label: "accepted updates", kind: "bar", points: bins }],
              { integer: true, xLabel: "staleness (server updates behind)", xName: "staleness",
                empty: "no update accepted yet" });
  }

  function renderClients(list) {
    const table = document.getElementById("client-table");
    const body = table.querySelector("tbody");
    body.replaceChildren();
    for (const c of list) {
      const tr = h("tr", { "data-client-id": c.client_id });
      const cell = (field, text, cls) => {
        const td = h("td", { "data-field": field }, text);
        if (cls) td.className = cls;
        tr.append(td);
      };
      cell("name", c.name || c.client_id);
      cell("online", c.online ? "yes" : "no", c.online ? "online-yes" : "online-no");
      cell("last_seen", `${fmt(c.last_seen_s_ago, 0)} s ago`, "num");
      cell("rounds_participated", c.rounds_participated, "num");
      cell("dropped", c.dropped, "num");
      const cap = Object.entries(c.capability || {}).map(([k, v]) => `${k}=${v}`).join(", ");
      cell("capability", cap || "\u2013");
      const acc = c.last_metrics ? c.last_metrics.train_accuracy : undefined;
      cell("last_accuracy", acc === undefined ? "\u2013" : fmt(acc, 4), "num");
      if (acc !== undefined) tr.lastChild.dataset.value = acc;
      body.append(tr);
    }
    table.hidden = false;
    table.dataset.count = list.length;
  }

  // ------------------------------------------------------------------ polling
  async function refreshClients() {
    const msg = document.getElementById("clients-message");
    if (!adminToken) {
      document.getElementById("client-table").hidden = true;
      msg.textContent = "Enter the admin token to see the clients.";
      return;
    }
    try {
      const data = await getJSON("/api/v1/clients", { Authorization: `Bearer ${adminToken}` });
      msg.textContent = "";
      renderClients(data.clients);
    } catch (err) {
      if (err.status === 401) {
        adminToken = null;
        msg.textContent = "The admin token was refused; enter it again.";
      } else {
        msg.textContent = `Could not load the clients: ${err.message}`;
      }
      document.getElementById("client-table").hidden = true;
    }
  }

  async function poll() {
    const conn = document.getElementById("conn");
    try {
      const [st, rounds] = await Promise.all([getJSON("/status"), getJSON("/api/v1/dashboard/rounds")]);
      renderSummary(st);
      renderCurrentRound(st);
      renderCharts(st, rounds);
      await refreshClients();
      polls += 1;
      document.body.dataset.polls = polls;
      document.body.dataset.state = st.state;
      document.body.dataset.completedRounds = st.completed_rounds;
      conn.dataset.state = "ok";
      conn.textContent = "live";
      setText("updated", `updated ${new Date().toLocaleTimeString()}`);
    } catch (err) {
      conn.dataset.state = "error";
      conn.textContent = `server unreachable (${err.message}); retrying`;
    } finally {
      timer = window.setTimeout(poll, pollMs);
    }
  }

  function start() {
    const form = document.getElementById("admin-form");
    const input = document.getElementById("admin-token");
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      adminToken = input.value.trim() || null;
      input.value = "";
      refreshClients();
    });
    document.getElementById("admin-forget").addEventListener("click", () => {
      adminToken = null;
      refreshClients();
    });
    if (timer === null) poll();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
