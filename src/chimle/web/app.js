// The chimle page: upload or pick an input, draw samples, choose one, vary it, download it.
// Talks to the JSON endpoints of chimle.serve; no libraries, nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const range = (start, end) => Array.from({ length: Math.max(0, end - start) }, (_, i) => start + i);

const state = { models: [], limits: {}, image: null, chosen: null, history: [], busy: false };

function currentModel() {
  return state.models.find((m) => m.name === $("model").value);
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    throw new Error(`The server cannot be reached (${error.message}). Is chimle serve still running?`);
  }
  const text = await response.text();
  let body = {};
  try {
    body = text ? JSON.parse(text) : {};
  } catch {
    body = { error: text };
  }
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function showError(message) {
  $("error").textContent = message ? message.charAt(0).toUpperCase() + message.slice(1) : "";
  $("error").hidden = !message;
}

function setBusy(busy) {
  state.busy = busy;
  for (const id of ["model", "file", "example", "use-example", "count", "seed"]) $(id).disabled = busy;
  $("use-example").disabled = $("example").disabled = busy || currentModel()?.input !== "image";
  $("sample").disabled = busy || !state.image;
  const m = currentModel();
  const canVary = !busy && state.chosen && m && m.levels > 1;
  $("vary-details").disabled = $("vary-structure").disabled = !canVary;
}

// Model and input -----------------------------------------------------------------------------------------------

async function init() {
  const info = await api("/api/models");
  state.models = info.models;
  state.limits = info.limits;
  for (const m of info.models) $("model").add(new Option(`${m.name} (${m.task})`, m.name));
  for (const name of info.examples) $("example").add(new Option(name, name));
  $("count").max = info.limits.samples;
  modelChanged();
}

function modelChanged() {
  const m = currentModel();
  const size = m.scale > 1 ? `outputs ${m.scale}x the input's size` : "outputs the input's size";
  const sides = m.multiple > 1 ? `; the input's sides must be multiples of ${m.multiple} px` : "";
  const tiles = m.tile ? `; rendered in tiles of ${m.tile.size} px` : "";
  $("model-info").textContent = `${m.summary}. ${m.levels} levels, ${size}${sides}${tiles}.`;
  $("split").max = Math.max(1, m.levels - 1);
  $("split").value = Math.min(Math.max(1, Math.floor(m.levels / 2)), m.levels - 1) || 1;
  $("split-box").hidden = m.levels < 2;
  updateSplit();
  clearResults();
  updateInputInfo();
  setBusy(false);
}

async function upload(file) {
  showError("");
  const limit = state.limits.upload_bytes;
  if (file.size > limit) {
    showError(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MB; this server takes up to ` +
              `${(limit / 2 ** 20).toFixed(0)} MB: downscale or compress it first.`);
    return;
  }
  // The server sniffs the type itself; a non-image type (text/plain, ...) would be refused before that.
  const type = file.type.startsWith("image/") ? file.type : "application/octet-stream";
  setBusy(true);
  try {
    setImage(await api("/api/images", {
      method: "POST",
      body: file,
      headers: { "Content-Type": type, "X-Filename": encodeURIComponent(file.name) },
    }));
  } catch (error) {
    showError(error.message);
  } finally {
    setBusy(false);
  }
}

async function useExample() {
  showError("");
  setBusy(true);
  try {
    setImage(await api("/api/examples", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: currentModel().name, example: $("example").value }),
    }));
  } catch (error) {
    showError(error.message);
  } finally {
    setBusy(false);
  }
}

function setImage(info) {
  state.image = info;
  $("input-box").hidden = false;
  $("input-preview").src = info.preview;
  $("input-original").href = info.original;
  $("input-original").download = info.name;
  clearResults();
  updateInputInfo();
}

function updateInputInfo() {
  const m = currentModel();
  const image = state.image;
  if (!image || !m) return;
  const out = `${image.width * m.scale}x${image.height * m.scale}`;
  let text = `${image.name}: ${image.width}x${image.height} px in, ${out} px out`;
  if (image.width % m.multiple || image.height % m.multiple) {
    text += ` (this model needs sides that are multiples of ${m.multiple} px)`;
  }
  $("input-info").textContent = text;
}

// Sampling and variations -------------------------------------------------------------------------------------

function seedValue() {
  const text = $("seed").value.trim();
  return text === "" ? null : text;
}

async function runJob(request, title) {
  showError("");
  setBusy(true);
  $("progress-box").hidden = false;
  $("progress").value = 0;
  $("progress-text").textContent = "Starting...";
  $("results").hidden = false;
  $("results-title").textContent = title;
  $("grid").replaceChildren();
  try {
    const job = await api("/api/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request),
    });
    $("results-title").textContent = `${title}, seed ${job.seed}`;
    let shown = 0;
    for (;;) {
      const status = await api(`/api/jobs/${job.id}`);
      for (const result of status.results.slice(shown)) {
        addCell({ ...result, model: request.model, image: request.image });
      }
      shown = status.results.length;
      $("progress").max = status.total;
      $("progress").value = status.done;
      $("progress-text").textContent = status.state === "queued"
        ? "Waiting for the model (another request is rendering)..."
        : `Rendering ${status.done} of ${status.total}...`;
      if (status.state === "error") throw new Error(status.error);
      if (status.state === "done") break;
      await sleep(200);
    }
  } catch (error) {
    showError(error.message);
  } finally {
    $("progress-box").hidden = true;
    setBusy(false);
  }
}

function sample() {
  const request = { model: currentModel().name, image: state.image.id, n: Number($("count").value), seed: seedValue() };
  runJob(request, "Samples");
}

function vary(kind) {
  const m = currentModel();
  const split = Number($("split").value);
  const keep = kind === "details" ? range(0, split) : range(split, m.levels);
  const request = {
    model: state.chosen.model, image: state.chosen.image, n: Number($("count").value), seed: seedValue(),
    base: state.chosen.sources, keep,
  };
  const kept = keep.length === 1 ? `level ${keep[0] + 1}` : `levels ${keep[0] + 1}-${keep[keep.length - 1] + 1}`;
  const title = `${kind === "details" ? "Details" : "Structure"} varied (${kept} kept) of ${state.chosen.sources}`;
  runJob(request, title);
}

function updateSplit() {
  const m = currentModel();
  const split = Number($("split").value);
  $("split-value").textContent = split;
  const levels = (a, b) => (a === b ? `level ${a}` : `levels ${a}-${b}`);
  const fine = levels(split + 1, m.levels);
  $("split-info").textContent = `Coarse (structure): ${levels(1, split)}. Fine (details): ${fine}.`;
}

// Results, the chosen image and its history -------------------------------------------------------------------

function addCell(result) {
  const cell = document.createElement("button");
  cell.type = "button";
  cell.className = "cell";
  cell.dataset.sources = result.sources;
  const img = document.createElement("img");
  img.src = result.url;
  img.alt = `Sample with sources ${result.sources}`;
  const label = document.createElement("span");
  label.textContent = result.sources;
  cell.append(img, label);
  cell.addEventListener("click", () => choose(result));
  $("grid").append(cell);
}

function choose(result) {
  state.chosen = result;
  for (const cell of $("grid").children) cell.classList.toggle("selected", cell.dataset.sources === result.sources);
  $("chosen").hidden = false;
  $("chosen-image").src = result.url;
  $("chosen-sources").textContent = result.sources;
  $("download").href = result.download;
  $("command").textContent = result.command || "";
  if (!state.history.some((h) => h.url === result.url)) state.history.push(result);
  drawHistory();
  setBusy(state.busy);
}

function drawHistory() {
  const buttons = state.history.map((result) => {
    const button = document.createElement("button");
    button.type = "button";
    button.title = result.sources;
    button.classList.toggle("current", result === state.chosen);
    const img = document.createElement("img");
    img.src = result.url;
    img.alt = `Chosen earlier: ${result.sources}`;
    button.append(img);
    button.addEventListener("click", () => choose(result));
    return button;
  });
  $("history").replaceChildren(...buttons);
}

function clearResults() {
  state.chosen = null;
  state.history = [];
  $("grid").replaceChildren();
  $("history").replaceChildren();
  $("results").hidden = true;
  $("chosen").hidden = true;
}

// Wiring ----------------------------------------------------------------------------------------------------------

window.addEventListener("DOMContentLoaded", () => {
  $("model").addEventListener("change", modelChanged);
  $("file").addEventListener("change", () => $("file").files[0] && upload($("file").files[0]));
  $("use-example").addEventListener("click", useExample);
  $("sample").addEventListener("click", sample);
  $("vary-details").addEventListener("click", () => vary("details"));
  $("vary-structure").addEventListener("click", () => vary("structure"));
  $("split").addEventListener("input", updateSplit);
  init().catch((error) => showError(error.message));
});
