// The editor page: settings -> a job on the server's native API, its steps shown as a progress
// bar and a live preview, its result placed on the canvas and in the history strip. Everything
// the engine does (the mask blend, the outpaint canvas, the metadata) happens on the server.

import { ApiError, apiKey, getBlob, getJson, jobEvents, postJson, setApiKey } from "./api.js";
import { EditorCanvas } from "./canvas.js";

const $ = (selector) => document.querySelector(selector);
const fields = {
  prompt: $("#prompt"), negative: $("#negative"), model: $("#model"), sampler: $("#sampler"),
  steps: $("#steps"), cfg: $("#cfg"), seed: $("#seed"), width: $("#width"), height: $("#height"),
  strength: $("#strength"), maskBlur: $("#mask-blur"), onlyMasked: $("#only-masked"), padding: $("#padding"),
};
const canvas = new EditorCanvas($("#canvas-frame"), updateButtons);
const history = []; // {blob, url, infotext}
let selected = -1;
let running = null; // {jobId, abort}

// ---- start-up: what the server offers ----

async function connect() {
  try {
    const server = await getJson("/api/v1/server");
    fill(fields.model, server.models, server.model);
    const samplers = await getJson("/sdapi/v1/samplers");
    fill(fields.sampler, samplers.map((s) => s.name), "Euler");
    const devices = server.workers.map((w) => w.device).join(", ");
    $("#server-status").textContent = `pocketdiffusion ${server.version} · ${devices} · max ${server.limits.max_side}px`;
  } catch (error) {
    if (error instanceof ApiError && error.status === 401 && askForKey()) return connect();
    $("#server-status").textContent = `cannot reach the server: ${error.message}`;
  }
}

function fill(select, names, current) {
  select.replaceChildren(...names.map((name) => new Option(name, name, false, name === current)));
}

function askForKey() {
  const key = prompt("This server needs its API key:", apiKey());
  if (key === null) return false;
  setApiKey(key.trim());
  return true;
}

// ---- building a request ----

function number(input) {
  return input.value === "" ? null : Number(input.value);
}

function baseRequest() {
  const seed = number(fields.seed);
  return {
    prompt: fields.prompt.value, negative_prompt: fields.negative.value, model: fields.model.value || null,
    sampler: fields.sampler.value || "euler", steps: number(fields.steps) ?? 20, cfg: number(fields.cfg) ?? 7.5,
    seed: seed === null || seed < 0 ? null : seed,
  };
}

function generateRequest() {
  return { ...baseRequest(), width: number(fields.width), height: number(fields.height) };
}

// img2img from the canvas; inpainting where the mask is; outpainting when an edge was dragged.
function editRequest() {
  const request = { ...baseRequest(), init_image: canvas.pictureDataURL(), strength: number(fields.strength) };
  if (canvas.extended()) {
    request.outpaint = { ...canvas.margins };
    request.strength = null; // the server's outpainting default (1.0)
  } else if (canvas.hasMask()) {
    Object.assign(request, { mask: canvas.maskDataURL(), mask_blur: number(fields.maskBlur) ?? 4,
                             inpaint_only_masked: fields.onlyMasked.checked,
                             only_masked_padding: number(fields.padding) ?? 32 });
  }
  return request;
}

// ---- running a job ----

async function run(request) {
  setMessage("");
  const abort = new AbortController();
  running = { jobId: null, abort };
  updateButtons();
  const progress = $("#progress");
  const preview = $("#preview");
  progress.value = 0;
  try {
    const job = await postJson("/api/v1/jobs", request);
    running.jobId = job.id;
    for await (const { event, data } of jobEvents(job.id, abort.signal)) {
      if (event === "state" && data.state === "queued") setMessage(`queued: ${data.position} ahead`);
      else if (event === "state" && data.state === "running") setMessage("");
      else if (event === "step") {
        progress.value = data.progress;
        if (data.preview) { preview.src = data.preview; preview.hidden = false; }
      } else if (event === "done") {
        progress.value = 1;
        await addResult(data);
      } else if (event === "cancelled") setMessage("cancelled");
      else if (event === "failed") setMessage(data.error);
    }
  } catch (error) {
    if (error instanceof ApiError && error.status === 401 && askForKey()) return run(request);
    if (error.name !== "AbortError") setMessage(error.message);
  } finally {
    preview.hidden = true;
    running = null;
    updateButtons();
  }
}

async function addResult(job) {
  const blob = await getBlob(job.images[0]); // the PNG with its parameters, as downloaded
  const url = URL.createObjectURL(blob);
  history.push({ blob, url, infotext: job.infotexts[0], seed: job.seeds[0] });
  canvas.setPicture(await createImageBitmap(blob));
  select(history.length - 1);
  const thumb = new Image();
  thumb.src = url;
  thumb.alt = job.infotexts[0];
  thumb.title = job.infotexts[0];
  thumb.dataset.index = String(history.length - 1);
  thumb.addEventListener("click", async () => {
    const index = Number(thumb.dataset.index);
    canvas.setPicture(await createImageBitmap(history[index].blob));
    select(index);
  });
  $("#history").append(thumb);
}

function select(index) {
  selected = index;
  document.querySelectorAll("#history img").forEach((img, i) => img.classList.toggle("selected", i === index));
  updateButtons();
}

async function cancel() {
  if (!running) return;
  if (running.jobId) {
    try { await postJson(`/api/v1/jobs/${running.jobId}/cancel`, {}); } catch (error) { setMessage(error.message); }
  } else running.abort.abort();
}

function download() {
  const item = history[selected];
  if (!item) return;
  const link = document.createElement("a");
  link.href = item.url;
  link.download = `pocketdiffusion-${item.seed}-${selected}.png`;
  link.click();
}

// ---- a dropped or opened PNG: its parameters into the form, the picture onto the canvas ----

async function openFile(file) {
  if (!file) return;
  const dataUrl = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
  try {
    const { parameters } = await postJson("/sdapi/v1/png-info", { image: dataUrl });
    restoreParameters(parameters);
    canvas.setPicture(await createImageBitmap(file));
    setMessage(parameters.Prompt !== undefined ? "parameters restored" : "this image holds no parameters");
  } catch (error) {
    setMessage(error.message);
  }
}

function restoreParameters(p) {
  const set = (input, value) => { if (value !== undefined && value !== null) input.value = value; };
  set(fields.prompt, p.Prompt);
  set(fields.negative, p["Negative prompt"]);
  set(fields.steps, p.Steps);
  set(fields.cfg, p["CFG scale"]);
  set(fields.seed, p.Seed);
  set(fields.width, p["Size-1"]);
  set(fields.height, p["Size-2"]);
  set(fields.strength, p["Denoising strength"]);
  set(fields.maskBlur, p["Mask blur"]);
  if (p.Sampler) {
    const name = p["Schedule type"] === "Karras" ? `${p.Sampler} Karras` : p.Sampler;
    if (![...fields.sampler.options].some((o) => o.value === name)) fields.sampler.append(new Option(name, name));
    fields.sampler.value = name;
  }
}

// ---- the page's state ----

function setMessage(text) {
  $("#message").textContent = text;
}

function updateButtons() {
  $("#generate").disabled = Boolean(running);
  $("#edit").disabled = Boolean(running) || !canvas.hasPicture;
  $("#cancel").disabled = !running;
  $("#undo").disabled = canvas.undoStack.length === 0;
  $("#download").disabled = selected < 0;
  const m = canvas.margins;
  $("#outpaint-info").textContent = canvas.extended()
    ? `outpaint on the next edit: left ${m.left}, right ${m.right}, top ${m.top}, bottom ${m.bottom} px` : "";
}

$("#generate").addEventListener("click", () => run(generateRequest()));
$("#edit").addEventListener("click", () => run(editRequest()));
$("#cancel").addEventListener("click", cancel);
$("#download").addEventListener("click", download);
$("#undo").addEventListener("click", () => canvas.undo());
$("#invert-mask").addEventListener("click", () => canvas.invertMask());
$("#clear-mask").addEventListener("click", () => canvas.clearMask());
$("#api-key").addEventListener("click", () => { if (askForKey()) connect(); });
$("#colour").addEventListener("input", (e) => { canvas.colour = e.target.value; });
$("#brush-size").addEventListener("input", (e) => { canvas.size = Number(e.target.value); });
for (const radio of document.querySelectorAll("input[name=tool]")) {
  radio.addEventListener("change", (e) => { canvas.tool = e.target.value; });
}
$("#open-image").addEventListener("change", (e) => openFile(e.target.files[0]));
document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dropping"); });
document.addEventListener("dragleave", () => document.body.classList.remove("dropping"));
document.addEventListener("drop", (e) => {
  e.preventDefault();
  document.body.classList.remove("dropping");
  openFile(e.dataTransfer.files[0]);
});

updateButtons();
connect();
