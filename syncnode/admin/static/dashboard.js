"use strict";
// The dashboard of a syncnode. It asks for an API key once, opens a session with it
// (POST /api/v1/session: an HttpOnly cookie it never sees, plus a CSRF token kept in
// memory) and then sends no key again; the key is never stored by the page.
const $ = (id) => document.getElementById(id);
let csrf = "";
let role = "";
let following = false;

class SignedOut extends Error {}

async function api(url, options = {}) {
  const r = await fetch(url, { credentials: "same-origin", ...options });
  if (r.status === 401) { showLogin(""); throw new SignedOut("signed out"); }
  return r;
}
function showLogin(message) {
  $("app").hidden = true; $("who").hidden = true; $("login").hidden = false;
  $("login-msg").textContent = message; $("login-key").focus();
}
function showApp() {
  $("login").hidden = true; $("app").hidden = false; $("who").hidden = false;
  $("role").textContent = role === "admin" ? "admin" : "read-only";
  for (const b of document.querySelectorAll("#add-peer button")) b.disabled = role !== "admin";
}
// The viewer (/viewer/) sends a visitor without a session here with ?next=/viewer/...;
// once signed in, go back there. Only a path of the viewer: never another site.
function viewerNext() {
  const next = new URLSearchParams(window.location.search).get("next") || "";
  return /^\/viewer\/[^\\]*$/.test(next) && !next.startsWith("/viewer//") ? next : "";
}
async function start() {
  const r = await fetch("/api/v1/session", { credentials: "same-origin" });
  if (r.status !== 200) {
    showLogin(viewerNext() ? "sign in to open the viewer" : ""); return;
  }
  const j = await r.json(); csrf = j.csrf || ""; role = j.role;
  const next = viewerNext();
  if (next) { window.location.replace(next); return; }
  showApp(); refresh();
  if (!following) { following = true; follow(); }
}
$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const key = $("login-key").value.trim();
  const r = await fetch("/api/v1/session", { method: "POST", credentials: "same-origin",
                                             headers: { "X-API-Key": key } });
  $("login-key").value = "";
  if (r.status !== 201) {
    const j = await r.json().catch(() => ({}));
    showLogin(j.error || ("HTTP " + r.status)); return;
  }
  start();
});
$("logout").addEventListener("click", async () => {
  await fetch("/api/v1/session", { method: "DELETE", credentials: "same-origin",
                                   headers: { "X-CSRF-Token": csrf } });
  csrf = ""; role = ""; showLogin("signed out");
});

function bytes(n) {
  const u = ["B", "KB", "MB", "GB", "TB"]; let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}
function ago(t) {
  if (!t) return "never";
  const s = Math.max(0, Date.now() / 1000 - t);
  return s < 90 ? Math.round(s) + " s ago" : s < 5400 ? Math.round(s / 60) + " min ago"
       : Math.round(s / 3600) + " h ago";
}
// Catalog values (study dates, modalities) came from other sites: show control and
// invisible formatting characters escaped, as syncnode.safetext.clean does server-side.
function shown(text) {
  return String(text).replace(/[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/gu, (c) => {
    const h = c.codePointAt(0).toString(16);
    return c.codePointAt(0) < 0x100 ? "\\x" + h.padStart(2, "0") : "\\u" + h.padStart(4, "0");
  });
}
function cell(tr, text, cls) {
  const td = document.createElement("td"); td.textContent = shown(text);
  if (cls) td.className = cls; tr.appendChild(td); return td;
}
async function change(method, url, body) {
  const r = await api(url, { method, headers: { "Content-Type": "application/json",
                                                "X-CSRF-Token": csrf },
                             body: body ? JSON.stringify(body) : undefined });
  const j = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(j.error || ("HTTP " + r.status));
  return j;
}

function duration(s) {
  if (s === null || s === undefined) return "?";
  return s < 90 ? Math.round(s) + " s" : s < 5400 ? Math.round(s / 60) + " min"
       : (s / 3600).toFixed(1) + " h";
}
// A bar whose filled width is the share of the round's bytes already received: the
// instances and bytes still needed are written beside it (never an averaged percentage).
function progressBar(pr) {
  const bar = document.createElement("div"); bar.className = "bar";
  const fill = document.createElement("div"); fill.className = "fill";
  fill.style.width = (100 * Math.min(1, Math.max(0, pr.fraction_done))).toFixed(1) + "%";
  bar.appendChild(fill); return bar;
}
// Throughput over the last minutes, one polyline per direction, scaled to the peak.
const SVG = "http://www.w3.org/2000/svg";
function sparkline(tp) {
  const ins = tp.in || [], outs = tp.out || [];
  const n = Math.max(ins.length, outs.length);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "spark"); svg.setAttribute("viewBox", "0 0 120 24");
  svg.setAttribute("preserveAspectRatio", "none");
  const top = Math.max(1, ...ins, ...outs);
  for (const [vals, cls] of [[ins, "in"], [outs, "out"]]) {
    if (!vals.length) continue;
    const line = document.createElementNS(SVG, "polyline");
    const step = n > 1 ? 120 / (n - 1) : 0, off = n - vals.length;
    line.setAttribute("points", vals.map((v, i) =>
      `${((i + off) * step).toFixed(1)},${(23 - 22 * v / top).toFixed(1)}`).join(" "));
    line.setAttribute("class", cls); svg.appendChild(line);
  }
  const title = document.createElementNS(SVG, "title");
  title.textContent = `last ${duration(n * (tp.interval || 2))}: peak in ` +
    `${bytes(Math.max(0, ...ins))}/s, out ${bytes(Math.max(0, ...outs))}/s`;
  svg.appendChild(title);
  return svg;
}
function renderPeers(peers) {
  const tb = $("peers").tBodies[0]; tb.replaceChildren();
  $("no-peers").hidden = peers.length > 0;
  for (const p of peers) {
    const tr = document.createElement("tr"); tr.dataset.nodeId = p.node_id;
    cell(tr, p.node_id.slice(0, 15) + "…", "mono").title = p.node_id;
    cell(tr, p.url, "mono");
    const st = cell(tr, ""); const pill = document.createElement("span");
    const state = p.state || "never contacted";
    pill.className = "pill " + state; pill.textContent = state.replace("_", " ");
    st.appendChild(pill);
    const need = cell(tr, "");
    const pr = p.progress;
    if (pr) {
      need.appendChild(progressBar(pr));
      const text = document.createElement("div"); text.className = "need";
      text.textContent = `${pr.instances_needed} of ${pr.instances_total} instances, ` +
        `${bytes(pr.bytes_needed)} of ${bytes(pr.bytes_total)} still needed` +
        (pr.eta_seconds !== null ? `, ${bytes(pr.rate)}/s, about ${duration(pr.eta_seconds)} left`
                                 : "");
      need.appendChild(text);
      for (const [study, [n, b]] of Object.entries(p.studies_needed || {})) {
        const line = document.createElement("div"); line.className = "mono study";
        line.textContent = shown(`study ${study}: ${n} instances, ${bytes(b)}`);
        need.appendChild(line);
      }
    } else if (p.in_sync) {
      need.textContent = p.peer_lacks ? `nothing (it still lacks ${p.peer_lacks} events of ours)`
                                      : "nothing";
    }
    const flow = cell(tr, bytes(p.bytes_received || 0) + " / " + bytes(p.bytes_sent || 0));
    if (p.throughput) flow.appendChild(sparkline(p.throughput));
    cell(tr, ago(p.last_success));
    cell(tr, p.last_error || "", "err");
    const act = cell(tr, ""); const b = document.createElement("button");
    b.textContent = "Remove"; b.disabled = role !== "admin";
    b.onclick = async () => {
      if (!confirm("Stop trusting " + p.node_id + "?")) return;
      try { await change("DELETE", "/api/v1/nodes/" + encodeURIComponent(p.node_id)); refresh(); }
      catch (e) { alert(e.message); }
    };
    act.appendChild(b); tb.appendChild(tr);
  }
}
function renderArrivals(rows, peers) {
  const tb = $("arrivals").tBodies[0]; tb.replaceChildren();
  $("arrivals-section").hidden = rows.length === 0;
  for (const a of rows) {
    const tr = document.createElement("tr");
    cell(tr, a.study_instance_uid, "mono"); cell(tr, a.instances);
    cell(tr, a.instances_needed ? `arriving: ${a.instances_needed} more instances to come`
                                : ago(a.arrived)).title = new Date(a.arrived * 1000).toISOString();
    const at = Object.entries(a.at_peers || {});
    cell(tr, at.length ? at.map(([id, t]) => id.slice(0, 7) + " " + ago(t)).join(", ")
                       : (peers.length ? "not confirmed yet" : "–"));
    tb.appendChild(tr);
  }
}
function renderExport(exp) {
  const tb = $("outbox").tBodies[0]; tb.replaceChildren();
  const dests = Object.entries(exp || {});
  $("outbox-section").hidden = dests.length === 0;
  for (const [dest, e] of dests) {
    const tr = document.createElement("tr"); tr.dataset.dest = dest;
    cell(tr, dest, "mono"); cell(tr, e.pending); cell(tr, e.done); cell(tr, e.failed);
    cell(tr, e.skipped); cell(tr, ago(e.last_contact)); cell(tr, e.last_error || "", "err");
    tb.appendChild(tr);
  }
}
function renderDicom(d) {
  $("dicom-section").hidden = !d;
  if (!d) return;
  $("scp").textContent = shown(`${d.ae_title} on port ${d.port}${d.tls ? " (DICOM TLS)" : ""}: ` +
    `${d.associations || 0} associations (${d.rejected_associations} refused), ` +
    `${d.stored} instances stored, ${d.duplicates} duplicates, ${d.failed} failed, ` +
    `${d.finds} C-FIND`);
  const tb = $("imports").tBodies[0]; tb.replaceChildren();
  const sources = Object.entries(d.import_from || {});
  $("imports").hidden = sources.length === 0;
  for (const [src, s] of sources) {
    const tr = document.createElement("tr");
    cell(tr, src, "mono"); cell(tr, s.state || "");
    cell(tr, `${s.studies_retrieved} studies, ${s.instances_retrieved || 0} instances`);
    cell(tr, `${s.runs || 0} (${s.errors || 0} failed), last ${ago(s.last_run)}`);
    cell(tr, s.last_error || "", "err"); tb.appendChild(tr);
  }
}
function renderVerify(v, sched) {
  const el = $("verify"); el.replaceChildren();
  const line = document.createElement("div");
  if (!v) line.textContent = "never run: `syncnode verify`, or set verify_interval (e.g. 7d)";
  else {
    line.textContent = `last ${ago(v.finished)} (${v.source}): ${v.blobs_checked} blobs, ` +
      `${bytes(v.bytes_checked)} checked: ` +
      (v.ok ? "OK" : `${v.problems} PROBLEMS (syncnode verify --repair mends them from peers)`);
    line.className = v.ok ? "ok" : "err";
  }
  el.appendChild(line);
  for (const d of (v && v.damaged) || []) {
    const x = document.createElement("div"); x.className = "mono err";
    x.textContent = shown(`damaged ${d.blob}: ${d.reason}`); el.appendChild(x);
  }
  for (const h of (v && v.missing) || []) {
    const x = document.createElement("div"); x.className = "mono err";
    x.textContent = `missing ${h}`; el.appendChild(x);
  }
  if (sched && sched.interval) {
    const x = document.createElement("div"); x.className = "muted";
    x.textContent = `background verify every ${duration(sched.interval)}, at most ` +
      `${sched.rate_mb} MB/s` + (sched.running ? ": running now" : "");
    el.appendChild(x);
  }
}
function renderDiscovered(list) {
  const tb = $("discovered").tBodies[0]; tb.replaceChildren();
  for (const d of list) {
    const tr = document.createElement("tr");
    cell(tr, d.node_id, "mono"); cell(tr, d.url, "mono");
    const act = cell(tr, ""); const b = document.createElement("button");
    b.textContent = "Accept"; b.disabled = role !== "admin";
    b.onclick = async () => {
      try { await change("POST", "/api/v1/discovered/" + encodeURIComponent(d.node_id) + "/accept");
            refresh(); } catch (e) { alert(e.message); }
    };
    act.appendChild(b); tb.appendChild(tr);
  }
}
function renderStudies(studies) {
  const tb = $("studies").tBodies[0]; tb.replaceChildren();
  studies.sort((a, b) => (b.study_date || "").localeCompare(a.study_date || ""));
  for (const s of studies.slice(0, 50)) {
    const tr = document.createElement("tr");
    cell(tr, s.study_instance_uid, "mono"); cell(tr, s.study_date || "–");
    cell(tr, s.modalities || "–"); cell(tr, s.series); cell(tr, s.instances);
    cell(tr, bytes(s.bytes || 0)); tb.appendChild(tr);
  }
}
// One refresh at a time: changes arriving meanwhile cause one more, not one each.
let refreshing = null, again = false;
function refresh() {
  if (refreshing) { again = true; return refreshing; }
  refreshing = load().finally(() => {
    refreshing = null;
    if (again) { again = false; refresh(); }
  });
  return refreshing;
}
async function load() {
  try {
    const [st, disc, studies] = await Promise.all([
      api("/api/v1/status").then(r => r.json()),
      api("/api/v1/discovered").then(r => r.json()),
      api("/api/v1/studies").then(r => r.json())]);
    $("node-id").textContent = st.node_id;
    $("n-instances").textContent = st.instances; $("n-studies").textContent = st.studies;
    $("n-bytes").textContent = bytes(st.blob_bytes); $("n-events").textContent = st.events;
    $("root").textContent = st.merkle_root.slice(0, 16) + "…"; $("root").title = st.merkle_root;
    renderPeers(st.peers); renderDiscovered(disc); renderStudies(studies);
    renderArrivals(st.arrivals || [], st.peers); renderExport(st.export);
    renderDicom(st.dicom); renderVerify(st.verify, st.verify_schedule);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.ready = "1";
  } catch (e) {
    if (!(e instanceof SignedOut)) $("updated").textContent = "cannot reach the node: " + e.message;
  }
}
$("add-peer").addEventListener("submit", async (ev) => {
  ev.preventDefault(); const f = new FormData(ev.target);
  try { await change("POST", "/api/v1/nodes", { node_id: f.get("node_id"), url: f.get("url") });
        $("add-msg").textContent = "trusted"; ev.target.reset(); refresh(); }
  catch (e) { $("add-msg").textContent = e.message; }
});
// Long-poll the event feed; refresh on any change, and at least every 5 s.
let since = 0;
async function follow() {
  for (;;) {
    if ($("app").hidden) { await new Promise(res => setTimeout(res, 1000)); continue; }
    try {
      const r = await api(`/api/v1/events?since=${since}&timeout=5`);
      const j = await r.json(); since = j.last_id; refresh();
    } catch (e) { await new Promise(res => setTimeout(res, 2000)); }
  }
}
start();
