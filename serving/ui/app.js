// The demo page: sends a file or a drawing to POST /predict?details=true and shows what comes back.
"use strict";

const api = (path) => new URL(path, new URL("../", window.location.href)).toString();
const $ = (id) => document.getElementById(id);

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("result").hidden = true;
  $("status").textContent = "The service could not classify that.";
}

async function errorMessage(response) {
  // The service answers {"error": "..."}; anything else (a proxy's page, BentoML's 503) is shown as text.
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && typeof body.error === "string") return body.error;
  } catch (_) { /* not JSON */ }
  return text.trim().slice(0, 300) || response.statusText;
}

function drawModelInput(pixels) {
  const canvas = $("model-input");
  const size = pixels.length;
  canvas.width = canvas.height = size;
  const context = canvas.getContext("2d");
  const image = context.createImageData(size, size);
  pixels.flat().forEach((grey, i) => {
    image.data.set([grey, grey, grey, 255], i * 4);
  });
  context.putImageData(image, 0, 0);
}

function drawBars(probabilities, top) {
  const list = $("probabilities");
  list.replaceChildren(...probabilities.map(({ class_name, probability }) => {
    const item = document.createElement("li");
    item.className = class_name === top ? "top" : "";
    item.dataset.className = class_name;
    const name = Object.assign(document.createElement("span"), { className: "name", textContent: class_name });
    const track = Object.assign(document.createElement("span"), { className: "track" });
    const fill = Object.assign(document.createElement("span"), { className: "fill" });
    fill.style.width = `${(probability * 100).toFixed(1)}%`;
    fill.style.display = "block";
    track.append(fill);
    const value = Object.assign(document.createElement("span"), {
      className: "value", textContent: `${(probability * 100).toFixed(1)}%`,
    });
    item.append(name, track, value);
    return item;
  }));
}

async function classify(blob, filename) {
  $("status").textContent = `Classifying ${filename}…`;
  $("error").hidden = true;
  const form = new FormData();
  form.append("image", blob, filename);
  let response;
  try {
    response = await fetch(api("predict?details=true"), { method: "POST", body: form });
  } catch (error) {
    return showError(`The service did not answer: ${error.message}`);
  }
  if (!response.ok) {
    return showError(`Error ${response.status}: ${await errorMessage(response)}`);
  }
  const result = await response.json();
  drawModelInput(result.model_input);
  drawBars(result.probabilities, result.class_name);
  $("predicted-class").textContent = result.class_name;
  $("predicted-confidence").textContent = `(${(result.confidence * 100).toFixed(1)}%)`;
  $("ood-score").textContent = result.ood_score.toFixed(1);
  $("out-of-distribution").hidden = !result.out_of_distribution;
  $("result").hidden = false;
  $("status").textContent = `Classified ${filename}.`;
}

async function showModelCard() {
  const card = $("model-card");
  try {
    const response = await fetch(api("model"));
    if (!response.ok) throw new Error(`error ${response.status}: ${await errorMessage(response)}`);
    const model = await response.json();
    const percent = (x) => (typeof x === "number" ? `${(x * 100).toFixed(2)}%` : "—");
    const rows = [
      ["Model", model.model_name], ["Dataset", model.dataset], ["Classes", (model.class_names || []).join(", ")],
      ["Validation accuracy", percent(model.val_accuracy)], ["Test accuracy", percent(model.test_accuracy)],
      ["Parameters", model.parameters?.toLocaleString("en")],
      ["Test-time augmentation", model.test_time_augmentation ?? "none"],
      ["Execution provider", model.execution_provider], ["BentoML model", model.bentoml_tag],
      ["MLflow run", model.mlflow_run_id], ["Git commit", model.git_commit],
    ];
    card.replaceChildren(...rows.flatMap(([label, value]) => [
      Object.assign(document.createElement("dt"), { textContent: label }),
      Object.assign(document.createElement("dd"), { textContent: value ?? "—" }),
    ]));
  } catch (error) {
    card.replaceChildren(Object.assign(document.createElement("dt"), {
      className: "error", textContent: `The model card could not be loaded: ${error.message}`,
    }));
  }
}

function setUpUpload() {
  const zone = $("drop-zone");
  $("file-input").addEventListener("change", (event) => {
    const [file] = event.target.files;
    if (file) classify(file, file.name);
  });
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    const [file] = event.dataTransfer.files;
    if (file) classify(file, file.name);
  });
}

function setUpDrawing() {
  const canvas = $("sketch");
  const context = canvas.getContext("2d");
  const clear = () => { context.fillStyle = "#000"; context.fillRect(0, 0, canvas.width, canvas.height); };
  clear();
  context.strokeStyle = "#fff";
  context.lineWidth = 22;
  context.lineCap = context.lineJoin = "round";
  let drawing = false;
  const point = (event) => {
    const box = canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * canvas.width / box.width, (event.clientY - box.top) * canvas.height / box.height];
  };
  canvas.addEventListener("pointerdown", (event) => {
    drawing = true;
    canvas.setPointerCapture(event.pointerId);
    context.beginPath();
    context.moveTo(...point(event));
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    context.lineTo(...point(event));
    context.stroke();
  });
  canvas.addEventListener("pointerup", () => { drawing = false; });
  $("clear-drawing").addEventListener("click", clear);
  $("classify-drawing").addEventListener("click", () => {
    canvas.toBlob((blob) => classify(blob, "drawing.png"), "image/png");
  });
}

setUpUpload();
setUpDrawing();
showModelCard();
