// The tether dashboard: one page, hash routes, data from the control plane's REST API.
// No framework and nothing fetched from elsewhere; every request carries the token the
// user typed (kept in this tab's sessionStorage) as X-Tether-Token, when there is one.
"use strict";

const API = "/api/v1";
const REFRESH_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
const HEIGHT = 380;  // of the graph's drawing, in its own units (1200 wide)
let timer = null;

function token() { return sessionStorage.getItem("tether-token") || ""; }

async function get(path) {
  const headers = {};
  if (token()) headers["X-Tether-Token"] = token();
  const resp = await fetch(API + path, { headers, cache: "no-store" });
  const body = await resp.json().catch(() => ({}));
  if (resp.status === 401 || resp.status === 403) {
    notice((body.message || resp.statusText) + " — enter a registry token above.");
    throw new Error("unauthorized");
  }
  if (!resp.ok) throw new Error(body.message || resp.statusText);
  notice("");
  return body;
}

function notice(text) {
  const el = document.getElementById("notice");
  el.textContent = text;
  el.hidden = !text;
}

function el(tag, attrs, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    // Widths go through CSSOM: the page's CSP refuses inline style attributes.
    if (k === "text") node.textContent = v; else if (k === "width" && tag === "span") node.style.width = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function pct(v) { return v === null || v === undefined ? "-" : (v * 100).toFixed(1) + "%"; }
function ms(v) { return v === null || v === undefined ? "-" : v.toFixed(1) + " ms"; }
function rps(v) { return (v || 0).toFixed(1) + "/s"; }
function health(success, rate) {
  if (!rate || success === null || success === undefined) return "idle";
  return success >= 0.99 ? "ok" : success >= 0.95 ? "warn" : "bad";
}
const COLORS = { ok: "#3fb950", warn: "#d29922", bad: "#f85149", idle: "#56687a" };

function table(headers, rows, numeric) {
  const num = new Set(numeric || []);
  return el("table", {},
    el("thead", {}, el("tr", {}, ...headers.map((h, i) => el("th", { class: num.has(i) ? "num" : null, text: h })))),
    el("tbody", {}, ...rows.map(r => el("tr", {}, ...r.map((c, i) => {
      const td = el("td", { class: num.has(i) ? "num" : null });
      td.append(c instanceof Node ? c : document.createTextNode(String(c)));
      return td;
    })))));
}

function span(text, cls) { return el("span", { class: cls, text }); }

// -- YAML of a resource (plain data: maps, lists, strings, numbers, booleans) ------------
function yaml(value, indent) {
  indent = indent || "";
  const scalar = v => {
    if (v === null) return "null";
    if (typeof v === "string") return /^[\w./-]+$/.test(v) && !/^(true|false|null|\d.*)$/.test(v) ? v : JSON.stringify(v);
    return String(v);
  };
  if (Array.isArray(value)) {
    if (!value.length) return indent + "[]\n";
    return value.map(v => (v !== null && typeof v === "object")
      ? indent + "- " + yaml(v, indent + "  ").trimStart()
      : indent + "- " + scalar(v) + "\n").join("");
  }
  if (value !== null && typeof value === "object") {
    const keys = Object.keys(value);
    if (!keys.length) return indent + "{}\n";
    return keys.map(k => {
      const v = value[k];
      if (v !== null && typeof v === "object" && (Array.isArray(v) ? v.length : Object.keys(v).length))
        return indent + k + ":\n" + yaml(v, indent + "  ");
      return indent + k + ": " + (Array.isArray(v) ? "[]" : (v !== null && typeof v === "object") ? "{}" : scalar(v)) + "\n";
    }).join("");
  }
  return indent + scalar(value) + "\n";
}

// -- the service graph ---------------------------------------------------------------------
function graphEdges(stats) {
  // One arrow per caller -> callee; subsets summed (the canary page shows them apart).
  const by = new Map();
  for (const e of stats.edges) {
    const key = e.source + " -> " + e.destination;
    const g = by.get(key) || { source: e.source, destination: e.destination, rps: 0, requests: 0, ok: 0, p99: null };
    g.rps += e.rps || 0;
    g.requests += e.requests || 0;
    g.ok += (e.success_rate || 0) * (e.requests || 0);
    if (e.p99_ms !== null && (g.p99 === null || e.p99_ms > g.p99)) g.p99 = e.p99_ms;
    by.set(key, g);
  }
  return [...by.values()].map(g => ({ ...g, success: g.requests ? g.ok / g.requests : null }));
}

function layout(names, edges) {
  // Columns by longest path from a caller nobody calls; rows in name order.
  const depth = new Map(names.map(n => [n, 0]));
  for (let i = 0; i < names.length; i++) {
    let moved = false;
    for (const e of edges) {
      if (e.source === e.destination || !depth.has(e.destination)) continue;
      const d = depth.get(e.source) + 1;
      if (d > depth.get(e.destination) && d < names.length) { depth.set(e.destination, d); moved = true; }
    }
    if (!moved) break;
  }
  const columns = new Map();
  for (const n of names) {
    const d = depth.get(n);
    if (!columns.has(d)) columns.set(d, []);
    columns.get(d).push(n);
  }
  const pos = new Map();
  const ncol = Math.max(...columns.keys(), 0) + 1;
  for (const [d, col] of columns) {
    col.forEach((n, i) => pos.set(n, {
      x: 110 + d * (980 / Math.max(ncol - 1, 1)) * (ncol > 1 ? 1 : 0) + (ncol > 1 ? 0 : 380),
      y: (i + 1) * HEIGHT / (col.length + 1),
    }));
  }
  return pos;
}

function drawGraph(svg, stats) {
  const edges = graphEdges(stats);
  const names = stats.services.map(s => s.service);
  if (edges.some(e => e.destination === "egress")) names.push("egress");
  const pos = layout(names, edges);
  const svcStats = new Map(stats.services.map(s => [s.service, s]));
  svg.replaceChildren();
  const defs = el("svg:defs");
  for (const [name, color] of Object.entries(COLORS)) {
    defs.append(el("svg:marker", { id: "arrow-" + name, viewBox: "0 0 10 10", refX: "10", refY: "5",
      markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" },
      el("svg:path", { d: "M 0 0 L 10 5 L 0 10 z", fill: color })));
  }
  svg.append(defs);
  const W = 150, H = 54;
  for (const e of edges) {
    const a = pos.get(e.source), b = pos.get(e.destination);
    if (!a || !b) continue;
    const state = health(e.success, e.rps);
    const x1 = a.x + W / 2, y1 = a.y, x2 = b.x - W / 2 - 4, y2 = b.y;
    const mx = (x1 + x2) / 2;
    const g = el("svg:g", { class: "edge", "data-edge": e.source + "->" + e.destination, "data-health": state });
    g.append(el("svg:path", { d: `M ${x1} ${y1} C ${mx} ${y1}, ${mx} ${y2}, ${x2} ${y2}`,
      stroke: COLORS[state], "marker-end": `url(#arrow-${state})` }));
    const label = `${rps(e.rps)} · ${pct(e.success)} · p99 ${ms(e.p99)}`;
    g.append(el("svg:text", { x: mx, y: (y1 + y2) / 2 - 8, "text-anchor": "middle", class: "edge-label", text: label }));
    svg.append(g);
  }
  for (const n of names) {
    const p = pos.get(n);
    const s = svcStats.get(n);
    const g = el("svg:g", { class: "node", "data-service": n, transform: `translate(${p.x - W / 2}, ${p.y - H / 2})` });
    const link = el("svg:a", { href: n === "egress" ? "#/" : "#/service/" + encodeURIComponent(n) });
    link.append(el("svg:rect", { width: W, height: H, rx: 8 }));
    link.append(el("svg:text", { x: W / 2, y: 22, "text-anchor": "middle", text: n }));
    const sub = s && s.requests ? `in ${rps(s.rps)} · ${pct(s.success_rate)}` : "no requests in";
    link.append(el("svg:text", { x: W / 2, y: 40, "text-anchor": "middle", class: "sub", text: sub }));
    g.append(link);
    svg.append(g);
  }
}

async function pageGraph(main) {
  const svg = el("svg:svg", { id: "graph", viewBox: `0 0 1200 ${HEIGHT}`, preserveAspectRatio: "xMidYMid meet" });
  const legend = el("div", { class: "legend" },
    span("● success ≥ 99%", "ok"), span("● ≥ 95%", "warn"), span("● below", "bad"), span("● no traffic", "dim"),
    span("edges: requests/s · success rate · p99, as the caller's sidecar saw them"));
  const caption = el("h2", { text: "service graph" });
  main.replaceChildren(caption, svg, legend);
  const refresh = async () => {
    const stats = await get("/stats");
    drawGraph(svg, stats);
    caption.textContent = `service graph (last ${stats.window}s, replicas: ${stats.replicas.join(", ")})`;
  };
  await refresh();
  return refresh;
}

async function pageServices(main) {
  const [svc, stats] = await Promise.all([get("/services"), get("/stats")]);
  const by = new Map(stats.services.map(s => [s.service.split(".")[0], s]));
  main.replaceChildren(el("h2", { text: "services" }), table(
    ["service", "instances", "zones", "versions", "in", "success", "p99"],
    svc.services.map(s => {
      const st = by.get(s.service) || {};
      return [el("a", { href: "#/service/" + encodeURIComponent(s.service), text: s.service }),
        s.instances.length, [...new Set(s.instances.map(i => i.zone || "-"))].join(" "),
        [...new Set(s.instances.map(i => i.version || "-"))].join(" "), rps(st.rps),
        pct(st.success_rate), ms(st.p99_ms)];
    }), [1, 4, 5, 6]));
}

async function pageService(main, name) {
  const [svc, stats, res] = await Promise.all([get("/services"), get("/stats"), get("/resources")]);
  const entry = svc.services.find(s => s.service === name) || { instances: [] };
  const ns = (entry.instances[0] || {}).namespace || "default";
  const key = name + "." + ns;
  const row = stats.services.find(s => s.service === key) || {};
  const mine = stats.edges.filter(e => e.source === key || e.destination === key);
  const policies = res.items.filter(r => r.metadata.name === name && (r.metadata.namespace || "default") === ns);
  const ejections = mine.filter(e => e.destination === key).reduce((n, e) => n + (e.ejections || 0), 0);
  main.replaceChildren(
    el("h2", { text: `service ${key}` }),
    el("div", {}, span(`in ${rps(row.rps)} · success ${pct(row.success_rate)} · p50 ${ms(row.p50_ms)} · p99 ${ms(row.p99_ms)} · ejections ${ejections}`)),
    el("h3", { text: "instances" }),
    table(["instance", "address", "zone", "version", "health"], entry.instances.map(i =>
      [i.id, i.address, i.zone || "-", i.version || "-", span(i.health, i.health === "passing" ? "ok" : "bad")])),
    el("h3", { text: "edges" }),
    table(["source", "destination", "subset", "rps", "success", "p50", "p99", "retries", "ejections"],
      mine.map(e => [e.source, e.destination, e.subset || "-", rps(e.rps), pct(e.success_rate), ms(e.p50_ms),
        ms(e.p99_ms), e.retries, e.ejections]), [3, 4, 5, 6, 7, 8]),
    el("h3", { text: "policy" }),
    ...(policies.length ? policies.map(p => el("pre", { text: yaml(p) })) : [span("no policy: the defaults apply", "dim")]));
}

// A sidecar's mesh certificate expiry (Unix time, from its stats reports): the date and
// how long is left, amber within an hour, red once past; "-" without mTLS.
function certExpiry(at, now) {
  if (at === null || at === undefined) return span("- (no mTLS)", "dim");
  const left = at - now;
  const when = new Date(at * 1000).toISOString().replace(".000Z", "Z");
  const rel = left <= 0 ? "expired" : left < 3600 ? `in ${Math.floor(left / 60)}m`
    : left < 172800 ? `in ${(left / 3600).toFixed(1)}h` : `in ${Math.floor(left / 86400)}d`;
  return span(`${when} (${rel})`, left <= 0 ? "bad" : left < 3600 ? "warn" : "ok");
}

async function pageSidecars(main) {
  const body = await get("/sidecars");
  const now = Date.now() / 1000;
  main.replaceChildren(el("h2", { text: `sidecars (config version ${body.version})` }), table(
    ["sidecar", "zone", "replica", "state", "runs", "sent", "certificate expiry", "last seen", "error"],
    body.sidecars.map(s => [s.id, s.zone || "-", s.replica,
      span(s.state, s.state === "acked" ? "ok" : s.state === "pending" ? "warn" : "bad"),
      "v" + s.acked_version, "v" + s.sent_version, certExpiry(s.cert_expiry, now),
      Math.max(0, now - s.last_seen).toFixed(0) + "s ago", s.error || ""])));
}

async function pagePolicies(main) {
  const res = await get("/resources");
  main.replaceChildren(el("h2", { text: `policies (version ${res.version})` }),
    ...(res.items.length ? [] : [span("no policies stored", "dim")]),
    ...res.items.flatMap(r => [
      el("h3", { text: `${r.kind} ${r.metadata.namespace || "-"}/${r.metadata.name}` }),
      el("pre", { text: yaml(r) })]));
}

async function pageCanary(main) {
  const [res, stats] = await Promise.all([get("/resources/TrafficSplit"), get("/stats")]);
  const parts = [el("h2", { text: "canary: each TrafficSplit against what callers sent" })];
  if (!res.items.length) parts.push(span("no TrafficSplit stored", "dim"));
  for (const split of res.items) {
    const key = split.metadata.name + "." + (split.metadata.namespace || "default");
    const edges = stats.edges.filter(e => e.destination === key);
    const total = edges.reduce((n, e) => n + (e.rps || 0), 0);
    parts.push(el("h3", { text: key }), table(["subset", "weight", "", "observed", "", "success", "p99"],
      split.spec.subsets.map(s => {
        const sub = edges.filter(e => e.subset === s.name);
        const r = sub.reduce((n, e) => n + (e.rps || 0), 0);
        const share = total ? r / total : 0;
        const req = sub.reduce((n, e) => n + e.requests, 0);
        const ok = sub.reduce((n, e) => n + (e.success_rate || 0) * e.requests, 0);
        const p99 = Math.max(-1, ...sub.map(e => e.p99_ms || -1));
        return [s.name, s.weight + "%", el("span", { class: "bar want", width: `${s.weight * 2}px` }),
          (share * 100).toFixed(1) + "%", el("span", { class: "bar", width: `${share * 200}px` }),
          pct(req ? ok / req : null), ms(p99 < 0 ? null : p99)];
      }), [1, 3, 5, 6]));
  }
  main.replaceChildren(...parts);
}

const PAGES = { "": pageGraph, services: pageServices, service: pageService, sidecars: pageSidecars,
                policies: pagePolicies, canary: pageCanary };

async function show() {
  clearInterval(timer);
  const [page, arg] = location.hash.replace(/^#\/?/, "").split("/");
  const fn = PAGES[page] || pageGraph;
  for (const a of document.querySelectorAll("nav a"))
    a.classList.toggle("active", a.dataset.page === (page === "service" ? "services" : page || "graph"));
  const main = document.getElementById("page");
  const status = document.getElementById("status");
  const run = async () => {
    try {
      const again = await fn(main, decodeURIComponent(arg || ""));
      status.textContent = "updated " + new Date().toLocaleTimeString();
      return again;
    } catch (err) {
      status.textContent = "error: " + err.message;
      return null;
    }
  };
  const refresh = await run();
  timer = setInterval(async () => {
    try {
      if (refresh) await refresh(); else await run();
      status.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (err) { status.textContent = "error: " + err.message; }
  }, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  const input = document.getElementById("token");
  input.value = token();
  document.getElementById("token-form").addEventListener("submit", ev => {
    ev.preventDefault();
    if (input.value) sessionStorage.setItem("tether-token", input.value);
    else sessionStorage.removeItem("tether-token");
    show();
  });
  window.addEventListener("hashchange", show);
  show();
});
