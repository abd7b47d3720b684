"use strict";
// The lipsync-ray page. It reads the parameters this service takes (GET v1/options) and draws a control for each,
// submits an async job (POST v1/jobs), follows it (GET v1/jobs/{id}) and plays its result beside the input.
// Paths are relative to <base>, the app's route prefix. API errors ({"error": {"field", "message"}}) are shown next
// to the field they name. When the service answers 401, the page asks for the API key and sends it as X-API-Key;
// the key is kept in this tab's sessionStorage only.

const LABELS = {
  steps: "Steps", guidance: "Guidance", seed: "Seed", deepcache: "DeepCache (0: off)", face: "Face",
  length: "Length", enhance: "Face restoration", enhance_strength: "Restoration strength",
};
const POLL_MS = 500;
const KEY_STORE = "lipsync-ray-api-key";
const $ = (selector) => document.querySelector(selector);
let apiKey = sessionStorage.getItem(KEY_STORE) || "";
let resultUrl = null;

class ApiError extends Error {
  constructor(error) {
    super(error.message || "request failed");
    this.field = error.field || "";
  }
}

async function api(path, options = {}) {
  const headers = apiKey ? { "X-API-Key": apiKey } : {};
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    $("#key").hidden = false;
    $("#api-key").focus();
    throw new ApiError({ field: "X-API-Key", message: apiKey ? "wrong API key" : "enter the API key" });
  }
  if (!response.ok) {
    let error = { message: `${response.status} ${response.statusText}` };
    try {
      error = (await response.json()).error || error;
    } catch (_) { /* not JSON */ }
    throw new ApiError(error);
  }
  return response;
}

function showError(err) {
  const field = err instanceof ApiError ? err.field : "";
  const target = document.querySelector(`.error[data-for="${CSS.escape(field)}"]`) || $('.error[data-for=""]');
  target.textContent = err.message;
  target.closest(".drop, .param")?.classList.add("invalid");
}

function clearErrors(field) {
  const selector = field === undefined ? ".error" : `.error[data-for="${CSS.escape(field)}"]`;
  for (const el of document.querySelectorAll(selector)) {
    el.textContent = "";
    el.closest(".drop, .param")?.classList.remove("invalid");
  }
}

function make(tag, props = {}, ...children) {
  const el = Object.assign(document.createElement(tag), props);
  el.append(...children);
  return el;
}

// One control per parameter, from its JSON schema: a list of choices, a checkbox, a number or text.
function control(name, schema) {
  const spec = { ...schema, ...(schema.anyOf || []).find((s) => s.type && s.type !== "null") };
  const id = `param-${name}`;
  let input;
  if (spec.enum) {
    input = make("select", {}, ...spec.enum.map((v) => make("option", { value: v, textContent: v })));
    input.value = spec.default;
  } else if (spec.type === "boolean") {
    input = make("input", { type: "checkbox", checked: Boolean(spec.default) });
  } else if (spec.type === "integer" || spec.type === "number") {
    input = make("input", { type: "number", step: spec.type === "integer" ? "1" : "any", value: spec.default ?? "" });
    if (spec.minimum !== undefined) input.min = spec.minimum;
    if (spec.maximum !== undefined) input.max = spec.maximum;
  } else {
    input = make("input", { type: "text", value: spec.default ?? "" });
  }
  Object.assign(input, { id, name, title: spec.description || "" });
  input.addEventListener("input", () => clearErrors(name));
  const error = make("p", { className: "error" });
  error.dataset.for = name;
  error.setAttribute("role", "alert");
  const label = make("label", { htmlFor: id, textContent: LABELS[name] || spec.title || name, title: spec.description || "" });
  return make("div", { className: "param" }, label, input, error);
}

async function loadOptions() {
  return (await api("v1/options")).json();
}

function showOptions(options) {
  const fieldset = $("#params");
  fieldset.replaceChildren(make("legend", { textContent: "Settings" }));
  for (const [name, schema] of Object.entries(options.params)) fieldset.append(control(name, schema));
  $("#model").textContent = `Model: ${options.model}. Files up to ${Math.floor(options.max_upload_bytes / 2 ** 20)} MB, `
    + `output up to ${options.max_job_seconds} s.`;
  $("#submit").disabled = false;
}

function preview(input) {
  clearErrors(input.name);
  const player = $(`#${input.name}-preview`);
  if (player.src) URL.revokeObjectURL(player.src);
  const file = input.files[0];
  player.hidden = !file;
  if (file) player.src = URL.createObjectURL(file);
}

function setUpDropZones() {
  for (const zone of document.querySelectorAll(".drop")) {
    const input = zone.querySelector("input[type=file]");
    input.addEventListener("change", () => preview(input));
    zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      const file = event.dataTransfer.files[0];
      if (!file) return;
      const picked = new DataTransfer();
      picked.items.add(file);
      input.files = picked.files;
      preview(input);
    });
  }
}

function progress(value, text) {
  const bar = $("#progress");
  bar.hidden = value === null;
  bar.value = value ?? 0;
  $("#status").textContent = text;
}

async function follow(id) {
  for (;;) {
    const job = await (await api(`v1/jobs/${id}`)).json();
    progress(job.progress, `${job.status}, ${Math.round(job.progress * 100)}%`);
    if (job.status === "failed") throw new ApiError(job.error || { message: "the job failed" });
    if (job.status === "done") return;
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

async function showResult(id, name) {
  const response = await api(`v1/jobs/${id}/result`);
  if (resultUrl) URL.revokeObjectURL(resultUrl);
  if ((response.headers.get("content-type") || "").startsWith("application/json")) {
    resultUrl = null;  // the service uploads results (output_prefix): a link to where it is
    $("#download").href = (await response.json()).url;
  } else {
    resultUrl = URL.createObjectURL(await response.blob());
    $("#result-video").src = resultUrl;
    $("#download").href = resultUrl;
  }
  $("#download").download = `${name.replace(/\.[^.]*$/, "")}-lipsync.mp4`;
  $("#result").hidden = false;
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  const form = new FormData();
  for (const name of ["video", "audio"]) {
    const file = $(`#${name}`).files[0];
    if (!file) return showError(new ApiError({ field: name, message: `choose a${name === "audio" ? "n" : ""} ${name} file` }));
    form.append(name, file);
  }
  for (const input of $("#params").querySelectorAll("[name]")) {
    if (input.type === "checkbox") form.append(input.name, String(input.checked));
    else if (input.value !== "") form.append(input.name, input.value);
  }
  $("#submit").disabled = true;
  progress(0, "uploading");
  try {
    const { id } = await (await api("v1/jobs", { method: "POST", body: form })).json();
    await follow(id);
    await showResult(id, $("#video").files[0].name);
    progress(1, "done");
  } catch (err) {
    progress(null, "");
    showError(err);
  } finally {
    $("#submit").disabled = false;
  }
}

async function useKey(event) {
  event.preventDefault();
  apiKey = $("#api-key").value;
  sessionStorage.setItem(KEY_STORE, apiKey);
  clearErrors("X-API-Key");
  try {
    const options = await loadOptions();  // checks the key
    if (!$("#params [name]")) showOptions(options);  // drawn once: what was set stays
    $("#key").hidden = true;
  } catch (err) {
    showError(err);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setUpDropZones();
  $("#job").addEventListener("submit", submit);
  $("#key-form").addEventListener("submit", useKey);
  loadOptions().then(showOptions).catch(showError);
});
