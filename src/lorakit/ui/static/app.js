"use strict";
/*
 * lorakit ui: the playground page. Four views (train, chat, adapters, evaluate) over the HTTP API of
 * `lorakit ui` (src/lorakit/ui/*.py). No framework: small render functions that rebuild a part of the DOM
 * from the state the server returned. Every call goes through fetch, so an API key (when the server asks for
 * one) travels as an Authorization header everywhere, server-sent events and downloads included.
 */

// ---------------------------------------------------------------------------------------------------------
// Small helpers

const $ = (selector, root = document) => root.querySelector(selector);
const enc = encodeURIComponent;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const LIVE = new Set(["starting", "running", "stopping"]); // run statuses whose events stream stays open
const OPEN_SECTIONS = new Set(["model", "lora", "data", "train"]);
const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];

/** el("button", {class: "x", onclick: f}, "text", child): attributes, properties and listeners in one go. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key in node && typeof node[key] !== "function" && key !== "list") node[key] = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children.filter((c) => c != null && c !== false));
  return node;
}

const fmtLoss = (v) => (Number.isFinite(v) ? v.toFixed(4) : "–");
const fmtPercent = (v) => (Number.isFinite(v) ? `${(100 * v).toFixed(1)} %` : "–");
const fmtInt = (v) => (Number.isFinite(v) ? v.toLocaleString("en-US") : "–");
const basename = (path) => path.replace(/\/+$/, "").split("/").pop();

function fmtBytes(n) {
  if (!Number.isFinite(n)) return "–";
  if (n < 1024) return `${n} B`;
  if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} KB`;
  if (n < 1024 ** 3) return `${(n / 1024 ** 2).toFixed(1)} MB`;
  return `${(n / 1024 ** 3).toFixed(2)} GB`;
}

function fmtDuration(s) {
  if (!Number.isFinite(s)) return "–";
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

/** A config mapping as YAML-like text (for reading, not for parsing back: config.yaml is the real file). */
function toYaml(value, indent = "") {
  const scalar = (v) => (v === null ? "null" : typeof v === "string" ? (v === "" ? '""' : v) : JSON.stringify(v));
  return Object.entries(value)
    .map(([key, v]) =>
      v && typeof v === "object" && !Array.isArray(v) && Object.keys(v).length
        ? `${indent}${key}:\n${toYaml(v, indent + "  ")}`
        : `${indent}${key}: ${Array.isArray(v) ? `[${v.map(scalar).join(", ")}]` : scalar(v)}`,
    )
    .join("\n");
}

// ---------------------------------------------------------------------------------------------------------
// API access: the key, JSON calls, errors, server-sent events, jobs and downloads

const state = {
  key: sessionStorage.getItem("lorakit.key") || "",
  info: null,
  ready: false, // /api/info answered: the views may call the API
  workspace: { data: [], adapters: [], runs: [], exports: [] },
  adapters: [],
};

class ApiError extends Error {
  constructor(message, status = 0, code = null) {
    super(message);
    this.status = status;
    this.code = code; // the OpenAI-shaped error's code, such as "context_length_exceeded"
  }
}

async function request(path, { method = "GET", json, body, headers = {}, signal } = {}) {
  const init = { method, signal, headers: { ...headers } };
  if (state.key) init.headers.Authorization = `Bearer ${state.key}`;
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (body !== undefined) init.body = body;
  const res = await fetch(path, init);
  if (!res.ok) throw await errorFrom(res);
  return res;
}

/** The OpenAI-shaped error body's message, or the HTTP status when there is none. */
async function errorFrom(res) {
  let message = `${res.status} ${res.statusText}`.trim();
  let code = null;
  try {
    const data = JSON.parse(await res.text());
    message = data?.error?.message || message;
    code = data?.error?.code ?? null;
  } catch {
    /* not JSON: keep the status line */
  }
  if (res.status === 401) showAuth(message);
  return new ApiError(message, res.status, code);
}

const getJSON = async (path, opts) => (await request(path, opts)).json();
const postJSON = (path, json) => getJSON(path, { method: "POST", json });

/** Read a text/event-stream response, calling onEvent(event, data, id) per event (default event "message"; id
 * null when the event has none). */
async function readSSE(res, onEvent) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      const blocks = buffer.split(/\r?\n\r?\n/);
      buffer = done ? "" : blocks.pop();
      for (const block of blocks) dispatchSSE(block, onEvent);
      if (done) return;
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function dispatchSSE(block, onEvent) {
  let event = "message";
  let id = null;
  const data = [];
  for (const line of block.split(/\r?\n/)) {
    if (line.startsWith(":")) continue; // a comment / keep-alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event = value;
    else if (field === "id") id = value;
    else if (field === "data") data.push(value);
  }
  if (data.length) onEvent(event, data.join("\n"), id);
}

const JOB_LIVE = new Set(["running", "cancelling"]);

/** Start a job (POST `path` with `body`), show its state in `view` ({status, log, cancel} elements) while it
 * runs, with `cancel` offering to stop it; resolve to the finished job: status "done" or "cancelled". */
async function runJob(path, body, view) {
  const { job: id } = await postJSON(path, body);
  view.cancel.hidden = false;
  view.cancel.disabled = false;
  view.cancel.onclick = () => {
    view.cancel.disabled = true;
    postJSON(`/api/jobs/${enc(id)}/cancel`).catch((err) => (view.status.textContent = err.message));
  };
  try {
    for (;;) {
      const job = await getJSON(`/api/jobs/${enc(id)}`);
      showJob(job, view.status, view.log);
      if (job.status === "failed") throw new ApiError(job.error || "the job failed");
      if (!JOB_LIVE.has(job.status)) return job;
      await sleep(1000);
    }
  } finally {
    view.cancel.hidden = true;
  }
}

/** Download through fetch (so the key header goes along), then save the blob under the server's file name. */
async function download(url, fallbackName) {
  const res = await request(url);
  const disposition = res.headers.get("Content-Disposition") || "";
  const match = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(disposition);
  const name = match ? decodeURIComponent(match[1]) : fallbackName;
  const href = URL.createObjectURL(await res.blob());
  const a = el("a", { href, download: name || "download" });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(href), 30000);
}

/** A link whose click downloads through `download` (links are real hrefs, so they can be inspected). */
function downloadLink(url, name, text = name) {
  return el("a", { class: "download", href: url, download: name, dataset: { fetch: "" } }, text);
}
const fileLink = (path, text = basename(path)) => downloadLink(`/api/download?path=${enc(path)}`, basename(path), text);

document.addEventListener("click", (event) => {
  const a = event.target.closest("a[data-fetch]");
  if (!a) return;
  event.preventDefault();
  const view = a.closest(".view")?.id.replace("view-", "") || "app";
  download(a.href, a.getAttribute("download")).catch((err) => showError(view, err));
});

// ---------------------------------------------------------------------------------------------------------
// Errors and busy buttons

function showError(view, err) {
  const box = $(`#${view}-error`) || $("#app-error");
  box.textContent = err instanceof Error ? err.message : String(err);
  box.hidden = false;
}

function clearError(view) {
  const box = $(`#${view}-error`);
  if (box) box.hidden = true;
}

/** Run fn with `button` disabled and the view's error cleared; a failure shows in the view's error area. */
async function busy(button, view, fn) {
  button.disabled = true;
  clearError(view);
  try {
    return await fn();
  } catch (err) {
    if (err.name !== "AbortError") showError(view, err);
  } finally {
    button.disabled = false;
    updateRunButtons();
  }
}

// ---------------------------------------------------------------------------------------------------------
// Top bar: server info, the API key, tabs

function showAuth(message) {
  $("#auth-form").hidden = false;
  $("#auth-note").textContent = message;
}

$("#auth-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("#api-key").value.trim();
  sessionStorage.setItem("lorakit.key", state.key);
  boot();
});

const VIEWS = ["train", "chat", "adapters", "eval"];
const ON_OPEN = {}; // view -> function run each time the view is shown (after boot)

function currentView() {
  const name = location.hash.slice(1);
  return VIEWS.includes(name) ? name : "train";
}

function showView(name) {
  for (const view of VIEWS) {
    $(`#view-${view}`).hidden = view !== name;
    $(`#tab-${view}`).setAttribute("aria-selected", String(view === name));
  }
  if (!state.ready) return;
  if (name !== "train") closeStreams();
  ON_OPEN[name]?.();
}

for (const view of VIEWS) $(`#tab-${view}`).addEventListener("click", () => (location.hash = view));
window.addEventListener("hashchange", () => showView(currentView()));

async function boot() {
  try {
    state.info = await getJSON("/api/info");
  } catch (err) {
    if (err.status !== 401) showError("app", err);
    return;
  }
  $("#app-error").hidden = true;
  $("#auth-form").hidden = true;
  const { info } = state;
  $("#base-name").textContent = info.base_name;
  $("#base-name").title = [info.model_path, info.dtype, info.cpu].filter(Boolean).join(" · ");
  $("#workspace").textContent = info.workspace;
  document.title = `lorakit · ${info.base_name}`;
  $("#combine-method").replaceChildren(...(info.combine_methods || []).map((m) => el("option", { value: m }, m)));
  state.ready = true;
  await Promise.all([loadSchema().catch((err) => showError("train", err)), refreshWorkspace()]);
  syncDataSource(); // needs both the form and the data select
  showView(currentView());
}

// ---------------------------------------------------------------------------------------------------------
// Workspace: data files, adapter folders, exports; the selects and lists built from them

async function refreshWorkspace() {
  try {
    state.workspace = await getJSON("/api/workspace");
  } catch (err) {
    showError(currentView(), err);
    return;
  }
  fillDataSelect($("#data-source"));
  fillDataSelect($("#eval-data"));
  $("#adapter-paths").replaceChildren(...state.workspace.adapters.map((a) => el("option", { value: a.path })));
  fillAdapterSelect($("#export-adapter"));
  fillAdapterSelect($("#eval-adapter"));
  renderWorkspaceFiles();
}

/** Options "task:NAME" for the built-in tasks and "file:PATH" for the workspace's data files. */
function fillDataSelect(select) {
  const previous = select.value;
  const tasks = (state.info?.tasks || []).map((t) => el("option", { value: `task:${t}` }, `built-in task: ${t}`));
  const files = state.workspace.data.map((f) => el("option", { value: `file:${f.path}` }, f.path));
  select.replaceChildren(
    el("optgroup", { label: "Built-in tasks" }, ...tasks),
    files.length ? el("optgroup", { label: "Workspace files" }, ...files) : null,
  );
  restoreChoice(select, previous);
}

/** Keep what the user chose in a select that is being refilled (else its first option stays selected). */
function restoreChoice(select, previous) {
  if (select.dataset.chosen && [...select.options].some((o) => o.value === previous)) select.value = previous;
}
for (const id of ["data-source", "eval-data", "export-adapter", "eval-adapter"]) {
  $(`#${id}`).addEventListener("change", (event) => (event.target.dataset.chosen = "1"));
}

/** Loaded adapters by name, then the workspace's adapter folders by path. */
function fillAdapterSelect(select) {
  const previous = select.value;
  const loaded = state.adapters.map((a) => el("option", { value: a.name }, a.name));
  const paths = state.workspace.adapters.map((a) => el("option", { value: a.path }, a.path));
  select.replaceChildren(
    loaded.length ? el("optgroup", { label: "Loaded" }, ...loaded) : null,
    paths.length ? el("optgroup", { label: "Workspace folders" }, ...paths) : null,
  );
  restoreChoice(select, previous);
}

const DELETABLE = ["data", "adapters", "mixes", "exports"];

/** A delete button for a workspace entry the server lets the page delete (an entry of DELETABLE's folders). */
function deleteButton(path) {
  const parts = path.split("/");
  if (parts.length !== 2 || !DELETABLE.includes(parts[0])) return null;
  return el("button", {
    type: "button",
    class: "link delete-file",
    title: `delete ${path}`,
    text: "delete",
    dataset: { path },
    onclick: (event) => {
      if (!confirm(`Delete ${path}?`)) return;
      busy(event.target, "adapters", async () => {
        await request(`/api/files?path=${enc(path)}`, { method: "DELETE" });
        await Promise.all([refreshWorkspace(), refreshJobs("export")]); // an export's row says its file is gone
      });
    },
  });
}

function renderWorkspaceFiles() {
  const ws = state.workspace;
  const group = (title, items, describe) =>
    el(
      "div",
      { class: "file-group" },
      el("h3", { text: title }),
      items.length
        ? el("ul", { class: "files" }, ...items.map((item) => el("li", {}, fileLink(item.path, item.path), describe(item), deleteButton(item.path))))
        : el("p", { class: "note", text: "none" }),
    );
  const size = (item) => el("span", { class: "note", text: ` ${fmtBytes(item.size)}` });
  $("#workspace-files").replaceChildren(
    group("Data", ws.data, size),
    group("Adapters", ws.adapters, () => el("span", { class: "note", text: " folder (zip)" })),
    group("Exports", ws.exports, size),
  );
}

// ---------------------------------------------------------------------------------------------------------
// Train view: the settings form built from /api/schema

const controls = new Map(); // "section.key" -> its input or select

async function loadSchema() {
  const schema = await getJSON("/api/schema");
  controls.clear();
  $("#train-fields").replaceChildren(...schema.sections.map(sectionElement));
  updateMethodSections();
}

function sectionElement(section) {
  const fieldset = el(
    "fieldset",
    {},
    el("legend", { class: "sr-only", text: section.name }),
    section.doc ? el("p", { class: "section-doc", text: section.doc }) : null,
    el("div", { class: "fields" }, ...section.fields.map((f) => fieldElement(section.name, f))),
  );
  const gate = section.method ? "method" : section.objective ? "objective" : null;
  const summary = el("summary", {}, section.name, gate ? el("span", { class: "tag", text: gate }) : null);
  return el(
    "details",
    {
      class: "section",
      open: OPEN_SECTIONS.has(section.name),
      hidden: Boolean(gate), // shown by updateMethodSections when train.method (or train.objective) asks for it
      // objective: every train.objective the section shows for, space-separated
      dataset: { section: section.name, method: section.method || "", objective: (section.objectives || [section.objective || ""]).join(" ") },
    },
    summary,
    fieldset,
  );
}

/** The text a default reads as on the command line: lists and mappings as JSON (which YAML reads too). */
function defaultText(value) {
  if (value == null) return "";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function fieldElement(sectionName, field) {
  const name = `${sectionName}.${field.name}`;
  const id = `f-${name.replace(/[^\w-]/g, "-")}`;
  const initial = field.type === "bool" ? String(field.default === true) : defaultText(field.default);
  let control;
  if (field.type === "bool") {
    control = el("input", { type: "checkbox", checked: field.default === true });
  } else if (field.choices) {
    const options = field.choices.map((c) => el("option", { value: String(c) }, String(c)));
    if (field.optional) options.unshift(el("option", { value: "" }, "(none)"));
    control = el("select", {}, ...options);
    control.value = initial;
  } else {
    const numeric = field.type === "int" || field.type === "float";
    control = el("input", { type: "text", value: initial, placeholder: initial || "none", spellcheck: false });
    if (numeric) control.inputMode = "decimal";
  }
  Object.assign(control, { id, name, title: field.doc || "", disabled: Boolean(field.locked) });
  control.dataset.default = initial;
  controls.set(name, control);
  if (name === "train.method" || name === "train.objective")
    ["input", "change"].forEach((e) => control.addEventListener(e, updateMethodSections));

  const label = el("label", { for: id, text: field.name });
  const isBool = field.type === "bool";
  return el(
    "div",
    { class: `field${isBool ? " bool" : ""}${field.locked ? " locked" : ""}` },
    isBool ? el("div", { class: "check" }, control, label) : label,
    isBool ? null : control,
    field.doc ? el("small", { class: "hint", text: field.locked ? `${field.doc} (set by the UI)` : field.doc }) : null,
  );
}

const controlText = (c) => (c.type === "checkbox" ? String(c.checked) : c.value);

function setField(name, text) {
  const c = controls.get(name);
  if (!c) return;
  if (c.type === "checkbox") c.checked = text === "true";
  else c.value = text;
}

/** Show the sections of the methods train.method names ("adalora+loraplus"), and the section of the
 * preference objective train.objective names (dpo, simpo, orpo, cpo, kto); a section that appears opens. */
function updateMethodSections() {
  const method = controls.get("train.method");
  const methods = (method ? controlText(method) : "lora").split("+").map((m) => m.trim());
  const objective = controls.get("train.objective");
  for (const details of document.querySelectorAll("#train-fields details.section")) {
    const { method: wants, objective: needs } = details.dataset;
    if (!wants && !needs) continue;
    const show = wants ? methods.includes(wants) : needs.split(" ").includes(objective ? controlText(objective) : "sft");
    if (show && details.hidden) details.open = true;
    details.hidden = !show;
  }
}

/** {section: {key: text}} of the visible, enabled fields whose text differs from their default. */
function changedValues() {
  const values = {};
  for (const [name, c] of controls) {
    if (c.disabled || c.closest("details").hidden) continue;
    const text = controlText(c);
    if (text === c.dataset.default) continue;
    const dot = name.indexOf(".");
    (values[name.slice(0, dot)] ??= {})[name.slice(dot + 1)] = text;
  }
  return values;
}

// The data picker writes data.task / data.train_file; this reads them back when the form is (re)built.
function syncDataSource() {
  const file = controls.get("data.train_file")?.value;
  const task = controls.get("data.task")?.value;
  const select = $("#data-source");
  const want = file ? `file:${file}` : task ? `task:${task}` : "";
  select.dataset.chosen = "1";
  restoreChoice(select, want);
}

function dataChoice(select) {
  const colon = select.value.indexOf(":");
  return colon < 0 ? null : { kind: select.value.slice(0, colon), value: select.value.slice(colon + 1) };
}

$("#train-form").addEventListener("submit", (event) => event.preventDefault());

$("#data-source").addEventListener("change", () => {
  const choice = dataChoice($("#data-source"));
  if (!choice) return;
  setField("data.task", choice.kind === "task" ? choice.value : "");
  setField("data.train_file", choice.kind === "file" ? choice.value : "");
});

$("#upload").addEventListener("change", async (event) => {
  const input = event.target;
  const file = input.files[0];
  if (!file) return;
  clearError("train");
  const limit = state.info?.max_upload_mb;
  try {
    if (limit && file.size > limit * 1024 * 1024) throw new Error(`${file.name} is larger than ${limit} MB`);
    input.disabled = true;
    const fields = controls.get("data.fields")?.value?.trim(); // a file with its own column names
    const query = fields && fields !== "{}" ? `&fields=${enc(fields)}` : "";
    const res = await request(`/api/upload?name=${enc(file.name)}${query}`, {
      method: "POST",
      body: file,
      headers: { "Content-Type": "application/octet-stream" },
    });
    const { path, examples, pairs } = await res.json();
    $("#upload-note").textContent = `uploaded ${path}: ${fmtInt(examples)} ${pairs ? "preference pairs" : "examples"}`;
    await refreshWorkspace();
    $("#data-source").value = `file:${path}`;
    $("#data-source").dispatchEvent(new Event("change"));
  } catch (err) {
    showError("train", err);
  } finally {
    input.disabled = false;
    input.value = "";
  }
});

$("#preview-btn").addEventListener("click", (event) =>
  busy(event.target, "train", async () => {
    const choice = dataChoice($("#data-source"));
    if (!choice) throw new Error("choose a task or a data file first");
    const body = { [choice.kind]: choice.value, n: 3 };
    const objective = controls.get("train.objective");
    // dpo, simpo, orpo, cpo, kto: the built-in task's pairs; classify, regression: labelled texts
    if (objective) body.objective = controlText(objective);
    for (const key of ["chat", "train_on_all"]) {
      const c = controls.get(`data.${key}`);
      if (c) body[key] = c.checked;
    }
    const maxLen = parseInt(controls.get("data.max_len")?.value, 10);
    if (Number.isFinite(maxLen)) body.max_len = maxLen;
    const fields = controls.get("data.fields")?.value?.trim();
    if (fields && fields !== "{}") body.fields = fields; // the file's column names, as the run will read them
    renderPreview(await postJSON("/api/preview", body));
  }),
);

function renderPreview({ total, examples, pairs }) {
  // a preference pair comes as its two sides, chosen then rejected
  const items = examples.slice(0, pairs ? 6 : 3).map((ex, i) =>
    el(
      "div",
      { class: ex.side ? `side ${ex.side}` : "" },
      el("div", {
        class: "note",
        text:
          `#${pairs ? Math.floor(i / 2) + 1 : i + 1}${ex.side ? ` ${ex.side}` : ""}: ${ex.tokens} tokens, ` +
          (ex.label !== undefined // a classifier's (a regression's) example: its label, no token learned
            ? `label ${ex.label}`
            : `${ex.learned_tokens} learned`) +
          `${ex.truncated ? ", truncated" : ""}`,
      }),
      el("pre", { class: "example" }, ...ex.segments.map((s) => (s.learned ? el("span", { class: "learned", text: s.text }) : s.text))),
    ),
  );
  const count = pairs ? items.length / 2 : items.length;
  const unit = pairs ? "preference pairs" : "examples";
  const shown = total > count ? `${fmtInt(total)} ${unit}, the first ${count} here; ` : "";
  $("#preview").replaceChildren(
    el("p", { class: "note" }, shown, el("span", { class: "learned", text: "learned tokens" }), " highlighted:"),
    ...items,
  );
}

// ---------------------------------------------------------------------------------------------------------
// Train view: runs, their event streams, progress and charts

const runs = {
  list: [], // as /api/runs returned it, merged with status events
  current: localStorage.getItem("lorakit.run") || null,
  overlays: new Set(JSON.parse(localStorage.getItem("lorakit.overlays") || "[]")),
  streams: new Map(), // run name -> {data, lastMetric, controller, active, openedAt}
  rows: new Map(), // run name -> its <tr> in #runs-list
  colors: new Map(),
  pending: false, // a Start/Stop/Resume call is in flight
  failedShown: null, // the failed run whose error is on screen
};

const runByName = (name) => runs.list.find((r) => r.name === name);

function saveRunChoice() {
  if (runs.current) localStorage.setItem("lorakit.run", runs.current);
  else localStorage.removeItem("lorakit.run");
  localStorage.setItem("lorakit.overlays", JSON.stringify([...runs.overlays]));
}

function colorFor(name) {
  if (!runs.colors.has(name)) runs.colors.set(name, PALETTE[runs.colors.size % PALETTE.length]);
  return runs.colors.get(name);
}

/** Merge a run object (from the list, a status event or a POST's answer) into runs.list. */
function mergeRun(run) {
  const known = runByName(run.name);
  if (known) Object.assign(known, run);
  else runs.list.unshift({ ...run });
}

async function refreshRuns() {
  const { runs: list } = await getJSON("/api/runs");
  // keep what a status event said about a run the list does not mention yet (just started)
  const fresh = new Set(list.map((r) => r.name));
  runs.list = [...list, ...runs.list.filter((r) => !fresh.has(r.name) && r.justStarted)];
  if (runs.current && !runByName(runs.current)) runs.current = null;
  for (const name of runs.overlays) if (!runByName(name)) runs.overlays.delete(name);
  saveRunChoice();
  runsChanged();
}

function runsChanged() {
  renderRuns();
  ensureStreams();
  updateProgress();
  updateRunButtons();
  showFailure();
}

function renderRuns() {
  const body = $("#runs-list tbody");
  for (const [name, row] of runs.rows) {
    if (!runByName(name)) {
      row.remove();
      runs.rows.delete(name);
    }
  }
  for (const run of runs.list) {
    const row = runs.rows.get(run.name) || runRow(run.name);
    const cells = row.children;
    cells[0].firstChild.checked = runs.overlays.has(run.name);
    cells[2].firstChild.textContent = run.status;
    cells[2].firstChild.className = `badge ${run.status}`;
    cells[3].textContent = `${run.step ?? 0}/${run.steps ?? "?"}`;
    cells[4].textContent = LIVE.has(run.status) ? fmtDuration(run.eta_s) : "–";
    row.classList.toggle("current", run.name === runs.current);
    body.append(row); // (re)appending keeps the rows in the list's order
  }
  if (!runs.list.length && !body.querySelector(".empty")) {
    body.append(el("tr", { class: "empty" }, el("td", { colSpan: 6, class: "note", text: "No runs yet" })));
  } else if (runs.list.length) body.querySelector(".empty")?.remove();
}

function runRow(name) {
  const overlay = el("input", {
    type: "checkbox",
    class: "overlay",
    title: "draw this run in the charts",
    onchange: (e) => {
      if (e.target.checked) runs.overlays.add(name);
      else runs.overlays.delete(name);
      saveRunChoice();
      ensureStreams();
    },
  });
  const link = el("button", { type: "button", class: "link run-link", text: name, onclick: () => selectRun(name) });
  const row = el(
    "tr",
    { dataset: { run: name } },
    el("td", {}, overlay),
    el("td", {}, link),
    el("td", {}, el("span", { class: "badge" })),
    el("td", { class: "num" }),
    el("td", { class: "num" }),
    el("td", {}, downloadLink(`/api/runs/${enc(name)}/config.yaml`, `${name}-config.yaml`, "config.yaml")),
  );
  runs.rows.set(name, row);
  return row;
}

function selectRun(name) {
  runs.current = name;
  saveRunChoice();
  $("#run-details").hidden = true;
  $("#run-config").textContent = ""; // another run's config must not linger under this one
  runs.failedShown = null;
  runsChanged();
  scheduleCharts();
}

/** Open the event streams of the current and the overlaid runs; close the others. A stream that ended while
 * its run is live again (resumed, or the connection dropped) is reopened after its last record. */
function ensureStreams() {
  const wanted = new Set([runs.current, ...runs.overlays].filter((n) => n && runByName(n)));
  for (const [name, stream] of runs.streams) {
    if (wanted.has(name)) continue;
    stream.controller.abort();
    runs.streams.delete(name);
  }
  for (const name of wanted) {
    const stream = runs.streams.get(name);
    const live = LIVE.has(runByName(name).status);
    const dropped = stream && !stream.active && live && Date.now() - stream.openedAt > 3000;
    if (!stream || stream.closed || dropped) openStream(name);
  }
  scheduleCharts();
}

/** Close all event streams, keeping their points (leaving the Train view: the browser allows only six
 * connections per server, and the chat view wants them for its parallel requests). */
function closeStreams() {
  for (const stream of runs.streams.values()) {
    stream.closed = true;
    stream.controller.abort();
  }
}

/** (Re)open a run's event stream. A reopened stream keeps its points and asks only for the records after the
 * last one it got (Last-Event-ID: the server's byte offset in metrics.jsonl); if the server refuses that offset,
 * the whole history is replayed instead. */
function openStream(name, { replay = false } = {}) {
  const old = replay ? null : runs.streams.get(name);
  runs.streams.get(name)?.controller.abort();
  const stream = {
    data: old ? old.data : { loss: [], eval: [], lr: [], tps: [] },
    lastMetric: old ? old.lastMetric : null,
    lastId: old ? old.lastId : null,
    controller: new AbortController(),
    active: true,
    openedAt: Date.now(),
  };
  runs.streams.set(name, stream);
  const headers = stream.lastId ? { "Last-Event-ID": stream.lastId } : {};
  request(`/api/runs/${enc(name)}/events`, { signal: stream.controller.signal, headers })
    .then((res) => readSSE(res, (event, data, id) => onRunEvent(name, stream, event, data, id)))
    .catch((err) => {
      if (err.status === 400 && stream.lastId && runs.streams.get(name) === stream) openStream(name, { replay: true });
      else if (err.name !== "AbortError") showError("train", err);
    })
    .finally(() => (stream.active = false));
}

function onRunEvent(name, stream, event, text, id) {
  if (runs.streams.get(name) !== stream) return; // a replaced stream's last words
  if (id !== null) stream.lastId = id;
  const data = text ? JSON.parse(text) : {};
  if (event === "metric") addMetric(stream, data);
  else if (event === "status") {
    mergeRun(data);
    renderRuns();
    updateRunButtons();
    showFailure();
  }
  if (name === runs.current) updateProgress();
  scheduleCharts();
}

/** Append [step, value] to a series; a step at or before the last one (a resumed run replays the steps after
 * its checkpoint) replaces the points from there on. */
function pushPoint(points, step, value) {
  if (!Number.isFinite(value)) return;
  while (points.length && points[points.length - 1][0] >= step) points.pop();
  points.push([step, value]);
}

/** Put [step, value] into a series kept sorted by step (the same step again replaces it). Eval records do not
 * arrive in step order: the run writes its "before" evaluation (step 0, or the resumed step) at the end. */
function upsertPoint(points, step, value) {
  if (!Number.isFinite(value)) return;
  const at = points.findIndex((p) => p[0] >= step);
  if (at === -1) points.push([step, value]);
  else points.splice(at, points[at][0] === step ? 1 : 0, [step, value]);
}

function addMetric(stream, m) {
  const { data } = stream;
  if ("eval_loss" in m) upsertPoint(data.eval, m.step, m.eval_loss);
  if ("loss" in m) {
    pushPoint(data.loss, m.step, m.loss);
    pushPoint(data.lr, m.step, m.lr);
    pushPoint(data.tps, m.step, m.tokens_per_s);
    stream.lastMetric = m;
  }
}

function updateProgress() {
  const run = runByName(runs.current);
  $("#current-run").textContent = runs.current || "none";
  $("#run-status").textContent = run ? run.status : "";
  $("#run-status").className = `badge ${run ? run.status : ""}`;
  const progress = $("#progress");
  if (!run) {
    progress.max = 1;
    progress.value = 0;
    $("#progress-text").textContent = "No run selected";
    return;
  }
  const last = runs.streams.get(run.name)?.lastMetric;
  const step = Math.max(run.step || 0, last?.step || 0);
  progress.max = run.steps || 1;
  progress.value = Math.min(step, progress.max);
  const parts = [`step ${step}/${run.steps ?? "?"}`];
  if (LIVE.has(run.status) && Number.isFinite(run.eta_s)) parts.push(`ETA ${fmtDuration(run.eta_s)}`);
  if (Number.isFinite(last?.tokens_per_s)) parts.push(`${Math.round(last.tokens_per_s)} tok/s`);
  $("#progress-text").textContent = parts.join(" · ");
}

function updateRunButtons() {
  const run = runByName(runs.current);
  const idle = !runs.pending && Boolean(runs.current);
  // unknown status: leave the button on and let the server say no
  $("#stop-btn").disabled = !idle || ["stopping", "stopped", "finished", "failed"].includes(run?.status);
  $("#resume-btn").disabled =
    !idle || LIVE.has(run?.status) || run?.status === "finished" || run?.has_checkpoint === false;
  $("#config-btn").disabled = !runs.current;
  $("#delete-btn").disabled = !idle || LIVE.has(run?.status);
}

/** Run Start/Stop/Resume: POST, merge the run it answers, make it current. */
async function runAction(button, path, body) {
  runs.pending = true;
  updateRunButtons();
  await busy(button, "train", async () => {
    try {
      const run = await postJSON(path, body);
      mergeRun({ ...run, justStarted: true });
      // a resumed (or restarted) run: replay its stream now rather than at the next reconnect check
      const stream = runs.streams.get(run.name);
      if (stream && !stream.active && LIVE.has(run.status)) openStream(run.name);
      runs.current = run.name;
      saveRunChoice();
      runsChanged();
      await refreshRuns().catch(() => {});
    } finally {
      runs.pending = false;
    }
  });
}

$("#start-btn").addEventListener("click", (event) => {
  const body = { values: changedValues() };
  const name = $("#run-name").value.trim();
  if (name) body.name = name;
  runAction(event.target, "/api/runs", body);
});
$("#stop-btn").addEventListener("click", (e) => runAction(e.target, `/api/runs/${enc(runs.current)}/stop`));
$("#resume-btn").addEventListener("click", (e) => runAction(e.target, `/api/runs/${enc(runs.current)}/resume`));

$("#delete-btn").addEventListener("click", (event) => {
  const name = runs.current;
  if (!name || !confirm(`Delete run ${name}, with its checkpoints, adapter and curves?`)) return;
  busy(event.target, "train", async () => {
    await request(`/api/runs/${enc(name)}`, { method: "DELETE" });
    runs.streams.get(name)?.controller.abort();
    runs.streams.delete(name);
    runs.overlays.delete(name);
    runs.list = runs.list.filter((r) => r.name !== name);
    runs.current = null;
    $("#run-details").hidden = true;
    await refreshRuns();
    ensureStreams();
    await refreshWorkspace();
  });
});

$("#config-btn").addEventListener("click", (event) =>
  busy(event.target, "train", async () => renderRunDetails(await getJSON(`/api/runs/${enc(runs.current)}`), true)),
);

function renderRunDetails(run, withConfig) {
  $("#run-details").hidden = false;
  $("#details-name").textContent = run.name;
  const link = $("#config-download");
  link.href = `/api/runs/${enc(run.name)}/config.yaml`;
  link.download = `${run.name}-config.yaml`;
  $("#run-error").hidden = !run.error;
  $("#run-error").textContent = run.error || "";
  const showLog = run.status === "failed" && Boolean(run.log_tail);
  $("#run-log").hidden = !showLog;
  $("#run-log").textContent = showLog ? run.log_tail : "";
  if (withConfig) {
    const summary = run.summary ? `\n\n# summary\n${toYaml(run.summary)}` : "";
    $("#run-config").textContent = toYaml(run.config || {}) + summary;
  }
}

/** When the current run has failed, fetch and show its error and the end of its output (once). */
function showFailure() {
  const run = runByName(runs.current);
  if (run?.status !== "failed" || runs.failedShown === run.name) return;
  runs.failedShown = run.name;
  getJSON(`/api/runs/${enc(run.name)}`)
    .then((details) => renderRunDetails(details, false))
    .catch((err) => showError("train", err));
}

// Charts: the current run and the overlays, one colour per run; redrawn at most once per frame.
const charts = {};
let chartsPending = false;

function makeCharts() {
  charts.loss = new LineChart($("#chart-loss"), { title: "Loss (dashed: eval)", yLabel: "loss", logY: true });
  charts.lr = new LineChart($("#chart-lr"), { title: "Learning rate", yLabel: "lr" });
  charts.tps = new LineChart($("#chart-tps"), { title: "Throughput", yLabel: "tokens/s" });
}

function scheduleCharts() {
  if (chartsPending) return;
  chartsPending = true;
  requestAnimationFrame(drawCharts);
}

function drawCharts() {
  chartsPending = false;
  const names = [runs.current, ...runs.overlays].filter((n, i, all) => n && all.indexOf(n) === i);
  const loss = [];
  const lr = [];
  const tps = [];
  for (const name of names) {
    const stream = runs.streams.get(name);
    if (!stream) continue;
    const color = colorFor(name);
    loss.push({ name: `${name} train`, run: name, color, points: stream.data.loss });
    if (stream.data.eval.length) {
      loss.push({ name: `${name} eval`, run: name, eval: true, color, dashed: true, markers: true, points: stream.data.eval });
    }
    lr.push({ name, color, points: stream.data.lr });
    tps.push({ name, color, points: stream.data.tps });
  }
  charts.loss.setSeries(loss);
  charts.lr.setSeries(lr);
  charts.tps.setSeries(tps);
}

// For browser tests: the steps of the train-loss (or, with eval, the eval-loss) points the loss chart draws.
window.lorakitChart = {
  steps(runName, evalLoss = false) {
    if (chartsPending) drawCharts();
    const series = charts.loss?.series.find((s) => s.run === runName && !s.eval === !evalLoss);
    return series ? series.points.map((p) => p[0]) : [];
  },
  points(runName) {
    return this.steps(runName).length;
  },
};

// Poll the runs list every 2 s while the Train view is on screen.
let pollTimer = null;
ON_OPEN.train = () => {
  ensureStreams();
  refreshRuns().catch((err) => showError("train", err));
  clearInterval(pollTimer);
  pollTimer = setInterval(() => {
    if (currentView() !== "train") return clearInterval(pollTimer);
    if (!document.hidden) refreshRuns().catch((err) => err.status === 401 || showError("train", err));
  }, 2000);
  scheduleCharts();
};

// ---------------------------------------------------------------------------------------------------------
// Chat view: one column per checked model, all streaming at once

const chat = {
  models: [], // [{id, parent}] from /v1/models, plus the mixes added here
  mixes: [],
  checked: null, // Set of ids; null until the first list arrives (then the base is checked)
  columns: new Map(), // model id -> {root, out, error, history: the finished turns as chat messages}
};

ON_OPEN.chat = () => refreshModels().catch((err) => showError("chat", err));

async function refreshModels() {
  const { data } = await getJSON("/v1/models");
  const ids = new Set(data.map((m) => m.id));
  chat.models = [...data, ...chat.mixes.filter((m) => !ids.has(m.id))];
  if (!chat.checked) chat.checked = new Set(data.filter((m) => m.parent == null).map((m) => m.id));
  renderModels();
}

function renderModels() {
  const kind = (m) => (m.parent == null ? "base" : m.id.startsWith("mix:") ? "mix" : "adapter");
  $("#chat-models").replaceChildren(
    ...chat.models.map((m) =>
      el(
        "label",
        { class: "check" },
        el("input", {
          type: "checkbox",
          value: m.id,
          checked: chat.checked.has(m.id),
          onchange: (e) => (e.target.checked ? chat.checked.add(m.id) : chat.checked.delete(m.id)),
        }),
        el("span", { text: m.id }),
        el("span", { class: "tag", text: kind(m) }),
      ),
    ),
  );
}

$("#mix-btn").addEventListener("click", (event) =>
  busy(event.target, "chat", async () => {
    let weights;
    try {
      weights = JSON.parse($("#mix-weights").value);
    } catch {
      throw new Error('mix weights: write JSON such as {"a": 0.7, "b": 0.3}');
    }
    const { name } = await postJSON("/api/mix", { weights });
    if (!chat.mixes.some((m) => m.id === name)) chat.mixes.push({ id: name, parent: "mix" });
    chat.checked ??= new Set();
    chat.checked.add(name);
    await refreshModels();
  }),
);

// Enter in the mix field adds the mix (instead of submitting the chat form)
$("#mix-weights").addEventListener("keydown", (event) => {
  if (event.key !== "Enter") return;
  event.preventDefault();
  $("#mix-btn").click();
});

function chatColumn(model) {
  if (!chat.columns.has(model)) {
    const out = el("pre", { class: "chat-out" });
    const note = el("p", { class: "note chat-trimmed", hidden: true });
    const error = el("div", { class: "error", role: "alert", hidden: true });
    const root = el(
      "div",
      { class: "chat-col", dataset: { model } },
      el("div", { class: "chat-head", text: model }),
      note,
      error,
      out,
    );
    // history: the finished turns as chat messages; skip: how many of them (oldest first, whole turns) are left
    // out of what is sent, because the conversation outgrew the model's context
    chat.columns.set(model, { root, out, error, note, history: [], skip: 0 });
  }
  return chat.columns.get(model);
}

function numberInput(id, parse) {
  const value = parse($(`#${id}`).value);
  if (!Number.isFinite(value)) throw new Error(`${$(`#${id}`).parentElement.textContent.trim()}: not a number`);
  return value;
}

$("#chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  busy($("#send-btn"), "chat", async () => {
    const models = chat.models.map((m) => m.id).filter((id) => chat.checked?.has(id));
    const prompt = $("#prompt").value;
    if (!models.length) throw new Error("check at least one model");
    if (!prompt.trim()) throw new Error("write a prompt first");
    const system = $("#system-prompt").value;
    const params = {
      stream: true,
      max_tokens: numberInput("max-tokens", (v) => parseInt(v, 10)),
      temperature: numberInput("temperature", parseFloat),
      top_p: numberInput("top-p", parseFloat),
    };
    const columns = models.map(chatColumn);
    $("#chat-columns").replaceChildren(...columns.map((c) => c.root));
    // all requests leave at once, so the server can batch them; each column sends its own conversation
    const turn = { role: "user", content: prompt };
    const head = system.trim() ? [{ role: "system", content: system }] : [];
    chat.stopper = new AbortController();
    $("#chat-stop").hidden = false;
    try {
      const signal = chat.stopper.signal;
      const sent = columns.map((c) => streamChat(c, { model: c.root.dataset.model, ...params }, head, turn, signal));
      const replies = await Promise.all(sent);
      columns.forEach((c, i) => replies[i] !== null && c.history.push(turn, { role: "assistant", content: replies[i] }));
      if (replies.every((r) => r !== null)) $("#prompt").value = "";
    } finally {
      $("#chat-stop").hidden = true;
      chat.stopper = null;
    }
  });
});

// Stop: every column's stream is cut where it is (the server frees their rows when the connections close)
$("#chat-stop").addEventListener("click", () => chat.stopper?.abort());

// Ctrl+Enter (or Cmd+Enter) in the prompt sends it
$("#prompt").addEventListener("keydown", (event) => {
  if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey)) return;
  event.preventDefault();
  $("#chat-form").requestSubmit();
});

/** One turn in one column: the prompt, then the reply as it streams; resolves to the reply's text, or null
 * when it failed (the error stays in this column, and the turn stays out of its conversation). The request
 * carries the system prompt (`head`), the column's earlier turns and `turn`; when the server answers that this
 * outgrows the model's context, the oldest turn is left out and the request sent again, down to `turn` alone.
 * Stopped (`signal` aborted), the reply keeps the text that came, marked as stopped, and the turn joins the
 * conversation with it; stopped before any text, the turn stays out, as a failed one. */
async function streamChat(column, params, head, turn, signal) {
  column.error.hidden = true;
  const reply = el("span", { class: "turn-reply" });
  column.out.append(el("span", { class: "turn-prompt", text: `› ${turn.content}\n` }), reply, "\n\n");
  let text = "";
  try {
    let res;
    let skip = column.skip;
    for (;;) {
      const messages = [...head, ...column.history.slice(skip), turn];
      try {
        res = await request("/v1/chat/completions", { method: "POST", json: { ...params, messages }, signal });
        break;
      } catch (err) {
        if (err.code !== "context_length_exceeded" || skip >= column.history.length) throw err;
        skip += 2; // the oldest turn left: its prompt and its reply
      }
    }
    column.skip = skip; // kept only once a request fits: a failed turn leaves the conversation as it was
    const left = skip / 2;
    column.note.hidden = left === 0;
    column.note.textContent = left
      ? `The ${left} oldest turn${left === 1 ? " is" : "s are"} left out: the conversation outgrew the model's context of ${state.info?.max_model_len} tokens.`
      : "";
    await readSSE(res, (event, data) => {
      if (data.trim() === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(chunk.error.message || "generation failed");
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) {
        reply.append(delta);
        text += delta;
      }
      column.out.scrollTop = column.out.scrollHeight;
    });
    return text;
  } catch (err) {
    if (err.name === "AbortError") {
      reply.classList.add("stopped");
      reply.after(el("span", { class: "turn-stopped", text: " [stopped]" }));
      return text || null;
    }
    column.error.textContent = err.message;
    column.error.hidden = false;
    reply.classList.add("failed");
    return null;
  }
}

$("#chat-clear").addEventListener("click", () => {
  chat.columns.clear();
  $("#chat-columns").replaceChildren();
});

// ---------------------------------------------------------------------------------------------------------
// Adapters view: resident adapters, load, combine, export, workspace files

async function refreshAdapters() {
  const data = await getJSON("/api/adapters");
  state.adapters = data.adapters;
  $("#adapters-base").textContent = `on ${data.base}`;
  renderAdapters();
  fillAdapterSelect($("#export-adapter"));
  fillAdapterSelect($("#eval-adapter"));
  renderCombineSources();
}

ON_OPEN.adapters = () =>
  Promise.all([refreshAdapters(), refreshWorkspace(), refreshJobs("export")]).catch((err) => showError("adapters", err));
ON_OPEN.eval = () =>
  Promise.all([refreshAdapters(), refreshWorkspace(), refreshJobs("eval")]).catch((err) => showError("eval", err));

function renderAdapters() {
  const rows = state.adapters.map((a) =>
    el(
      "tr",
      { dataset: { adapter: a.name } },
      el("td", { text: a.name, title: a.path }),
      el("td", { text: a.kind || "" }),
      el("td", { class: "num", text: a.rank ?? "–" }),
      el("td", { class: "num", text: a.alpha ?? "–" }),
      el("td", { class: "targets", text: (a.targets || []).join(", ") }),
      el("td", { class: "num", text: fmtInt(a.params) }),
      el("td", { class: "num", text: fmtBytes(a.size_bytes) }),
      el("td", {}, el("button", { type: "button", class: "unload-btn", text: "Unload", onclick: (e) => unload(e.target, a.name) })),
    ),
  );
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 8, class: "note", text: "No adapters loaded" })));
  $("#adapters-table tbody").replaceChildren(...rows);
}

function unload(button, name) {
  return busy(button, "adapters", async () => {
    await request("/v1/unload_lora_adapter", { method: "POST", json: { lora_name: name } });
    await refreshAdapters();
  });
}

/** "runs/r1/adapter" -> "r1", "adapters/mix" -> "mix": a name to load a folder under. */
function nameFromPath(path) {
  const parts = path.replace(/\/+$/, "").split("/");
  return (parts.length > 1 && parts[parts.length - 1] === "adapter" ? parts[parts.length - 2] : parts.pop()) || "";
}

$("#load-form").addEventListener("submit", (event) => {
  event.preventDefault();
  busy($("#load-btn"), "adapters", async () => {
    $("#load-result").textContent = "";
    const path = $("#load-path").value.trim();
    if (!path) throw new Error("choose an adapter folder to load");
    const name = $("#load-name").value.trim() || nameFromPath(path);
    const res = await request("/v1/load_lora_adapter", { method: "POST", json: { lora_name: name, lora_path: path } });
    $("#load-result").textContent = (await res.text()) || `loaded ${name}`;
    await refreshAdapters();
  });
});

function renderCombineSources() {
  const previous = new Set([...document.querySelectorAll("#combine-sources input:checked")].map((c) => c.value));
  const items = state.adapters.map((a) =>
    el("label", { class: "check" }, el("input", { type: "checkbox", value: a.name, checked: previous.has(a.name) }), a.name),
  );
  $("#combine-sources").replaceChildren(...(items.length ? items : [el("span", { class: "note", text: "load adapters first" })]));
}

$("#combine-form").addEventListener("submit", (event) => {
  event.preventDefault();
  busy($("#combine-btn"), "adapters", async () => {
    const sources = [...document.querySelectorAll("#combine-sources input:checked")].map((c) => c.value);
    if (!sources.length) throw new Error("check the adapters to combine");
    const text = $("#combine-weights").value.trim();
    const weights = text ? text.split(/[\s,]+/).filter(Boolean).map(Number) : sources.map(() => 1);
    if (weights.length !== sources.length || weights.some((w) => !Number.isFinite(w))) {
      throw new Error(`weights: give ${sources.length} numbers, one per source`);
    }
    const out = $("#combine-out").value.trim();
    if (!out) throw new Error("give the combined adapter a name");
    const body = { sources, weights, method: $("#combine-method").value, out };
    const density = $("#combine-density").value;
    const svdRank = $("#combine-svd-rank").value;
    if (density !== "") body.density = Number(density);
    if (svdRank !== "") body.svd_rank = parseInt(svdRank, 10);
    const { path } = await postJSON("/api/combine", body);
    $("#combine-result").replaceChildren(`wrote ${path} `, fileLink(path, "download"));
    $("#load-path").value = path; // ready to load
    $("#load-name").value = out;
    await refreshWorkspace();
  });
});

$("#export-form").addEventListener("submit", (event) => {
  event.preventDefault();
  busy($("#export-btn"), "adapters", async () => {
    const adapter = $("#export-adapter").value;
    if (!adapter) throw new Error("choose an adapter to export");
    const body = { adapter, kind: $("#export-kind").value };
    const out = $("#export-out").value.trim();
    if (out) body.out = out;
    $("#export-result").replaceChildren();
    const view = { status: $("#export-status"), log: $("#export-log"), cancel: $("#export-cancel") };
    const done = await runJob("/api/export", body, view).finally(() => refreshJobs("export"));
    if (done.status === "cancelled") return;
    $("#export-result").replaceChildren(el("span", { class: "note", text: "ready: " }), fileLink(done.result.path, done.result.path));
    await refreshWorkspace();
  });
});

/** A job's status line and, while it runs or once it failed, the end of its log. */
function showJob(job, statusEl, logEl) {
  statusEl.textContent = JOB_LIVE.has(job.status) ? `${job.status}…` : job.status;
  logEl.hidden = !job.log_tail || job.status === "done" || job.status === "cancelled";
  logEl.textContent = job.log_tail || "";
  logEl.scrollTop = logEl.scrollHeight;
}

// ---------------------------------------------------------------------------------------------------------
// Evaluate view: base vs adapter on a task or a data file

$("#eval-form").addEventListener("submit", (event) => {
  event.preventDefault();
  busy($("#eval-btn"), "eval", async () => {
    const adapter = $("#eval-adapter").value;
    const choice = dataChoice($("#eval-data"));
    if (!adapter) throw new Error("choose an adapter (load one in the Adapters view)");
    if (!choice) throw new Error("choose a task or a data file");
    const body = { adapter, [choice.kind]: choice.value };
    const limit = parseInt($("#eval-limit").value, 10);
    if (Number.isFinite(limit)) body.limit = limit;
    $("#eval-result").hidden = true;
    $("#eval-samples").hidden = true;
    const view = { status: $("#eval-status"), log: $("#eval-log"), cancel: $("#eval-cancel") };
    const done = await runJob("/api/eval", body, view).finally(() => refreshJobs("eval"));
    if (done.status !== "cancelled") renderEval(done.result);
  });
});

// what an evaluation measures, by the adapter's kind: a classifier's, reward model's or regression's has no base
const EVAL_ROWS = {
  classify: [["cross-entropy", "loss", fmtLoss], ["accuracy", "accuracy", fmtPercent], ["balanced accuracy", "balanced_accuracy", fmtPercent]],
  reward: [["loss", "loss", fmtLoss], ["reward accuracy", "reward_accuracy", fmtPercent], ["reward margin", "reward_margin", fmtLoss]],
  regression: [["squared error", "loss", fmtLoss], ["Pearson", "pearson", fmtLoss], ["Spearman", "spearman", fmtLoss]],
  token_classify: [
    ["cross-entropy", "loss", fmtLoss],
    ["tokens tagged right", "accuracy", fmtPercent],
    ["entity precision", "precision", fmtLoss],
    ["entity recall", "recall", fmtLoss],
    ["entity F1", "f1", fmtLoss],
  ],
  embed: [
    ["contrastive loss", "loss", fmtLoss],
    ["positive ranked first", "accuracy", fmtPercent],
    ["recall@10", "recall_at_10", fmtPercent],
    ["MRR@10", "mrr_at_10", fmtLoss],
  ],
  embed_scored: [["CoSENT loss", "loss", fmtLoss], ["Pearson", "pearson", fmtLoss], ["Spearman", "spearman", fmtLoss]],
};

function renderEval(result) {
  const row = (label, key, fmt) =>
    el("tr", {}, el("th", { text: label }), el("td", { class: "num", text: fmt(result.base?.[key]) }), el("td", { class: "num", text: fmt(result.adapter?.[key]) }));
  const scored = result.objective === "embed" && result.adapter?.spearman !== undefined; // scored pairs (STS)
  const rows = EVAL_ROWS[scored ? "embed_scored" : result.objective] || [["loss", "loss", fmtLoss], ["accuracy", "accuracy", fmtPercent]];
  $("#eval-result tbody").replaceChildren(...rows.map(([label, key, fmt]) => row(label, key, fmt)));
  $("#eval-result").hidden = false;
  // the first examples side by side: what was expected, what each model generated (a classifier: predicted)
  const base = result.base?.samples || [];
  const adapted = result.adapter?.samples || [];
  // a number; a token classifier's entities ([[words, type], ...]); anything else as it is
  const text = (v) =>
    typeof v === "number" ? v.toFixed(4) : Array.isArray(v) ? v.map((e) => (Array.isArray(e) ? `${e[1]}: ${e[0]}` : String(e))).join("; ") : String(v ?? "");
  const shown = (s) =>
    s.chosen !== undefined ? `chosen ${s.chosen.toFixed(3)}, rejected ${s.rejected.toFixed(3)}` : text(s.got ?? s.predicted);
  const samples = adapted.map((s, i) =>
    el("tr", {}, el("td", { class: "mono nowrap", text: s.expected === undefined ? "chosen > rejected" : text(s.expected) }), el("td", { class: "mono", text: base[i]?.got ?? "" }), el("td", { class: "mono", text: shown(s) })),
  );
  $("#eval-samples tbody").replaceChildren(...samples);
  $("#eval-samples").hidden = samples.length === 0;
  $("#eval-status").textContent = `done: ${fmtInt(result.examples ?? result.pairs)} ${result.pairs !== undefined ? "pairs" : "examples"}`;
}

// ---------------------------------------------------------------------------------------------------------
// Job history: past evaluations and exports, kept in the workspace's jobs/ (across sessions of the UI)

/** 1733312400 -> "2024-12-04 12:40" in the browser's time zone. */
const fmtTime = (t) => (Number.isFinite(t) ? new Date(t * 1000).toLocaleString("sv-SE").slice(0, 16) : "–");

const HISTORY = {
  eval: {
    view: "eval",
    columns: 8,
    cells: (job) => [
      el("td", { class: "mono", text: job.summary?.data ?? "" }),
      el("td", { class: "num", text: fmtInt(job.result?.examples) }),
      el("td", { class: "num", text: fmtPercent(job.result?.base?.accuracy) }),
      el("td", { class: "num", text: fmtPercent(job.result?.adapter?.accuracy) }),
    ],
    show: (job) => {
      renderEval(job.result);
      $("#eval-status").textContent = `${job.id}, ${fmtTime(job.started)}: ${fmtInt(job.result.examples)} examples`;
    },
  },
  export: {
    view: "adapters",
    columns: 6,
    cells: (job) => {
      const result = job.result;
      let output = el("span", { class: "mono", text: job.summary?.out ?? "" });
      if (result?.exists) output = fileLink(result.path, result.path);
      else if (result) output = el("span", { class: "mono note", text: `${result.path} (deleted)` });
      return [el("td", { text: job.summary?.kind ?? "" }), el("td", {}, output)];
    },
  },
};

async function refreshJobs(kind) {
  const { jobs } = await getJSON(`/api/jobs?kind=${kind}`);
  const kindOf = HISTORY[kind];
  const rows = jobs.map((job) =>
    el(
      "tr",
      { dataset: { job: job.id } },
      el("td", { class: "nowrap", text: fmtTime(job.started), title: job.id }),
      el("td", { class: "mono", text: job.summary?.adapter ?? "" }),
      ...kindOf.cells(job),
      el("td", { class: `status-${job.status}` }, job.status, job.error ? el("span", { class: "job-error", text: job.error }) : null),
      el(
        "td",
        { class: "nowrap" },
        kindOf.show && job.status === "done"
          ? el("button", { type: "button", class: "link show-job", text: "show", onclick: () => kindOf.show(job) })
          : null,
        " ",
        JOB_LIVE.has(job.status)
          ? null
          : el("button", { type: "button", class: "link delete-job", text: "delete", onclick: (e) => deleteJob(e.target, job, kind) }),
      ),
    ),
  );
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: kindOf.columns, class: "note", text: "none yet" })));
  $(`#${kind}-history tbody`).replaceChildren(...rows);
}

function deleteJob(button, job, kind) {
  const what = kind === "export" ? " (its output file stays: delete that under Workspace files)" : "";
  if (!confirm(`Delete the record of ${job.id}${what}?`)) return;
  busy(button, HISTORY[kind].view, async () => {
    await request(`/api/jobs/${enc(job.id)}`, { method: "DELETE" });
    await refreshJobs(kind);
  });
}

// ---------------------------------------------------------------------------------------------------------
// Start

if (state.key) $("#api-key").value = state.key;
makeCharts();
showView(currentView());
updateRunButtons();
boot();
