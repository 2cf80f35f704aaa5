// The digitgan playground: digits from the `sample` signature through TF Serving's REST API.
//
// Query parameters: ?model=NAME (default digitgan) and ?server=http://HOST:PORT (default: the
// server that served this page; another server must run with --rest-api-enable-cors-support).
// <body data-state> is loading, drawing, drawn or error; every draw ends with a
// "playground:done" event on document (detail: {state, count}).
"use strict";

(() => {
  const params = new URLSearchParams(location.search);
  const model = params.get("model") || "digitgan";
  const server = (params.get("server") || "").replace(/\/+$/, "");
  const modelUrl = `${server}/v1/models/${encodeURIComponent(model)}`;
  const SCALE = 2, GAP = 4, SIDE = 28;  // the downloaded grid: 56-pixel digits, 4-pixel gaps
  const $ = (id) => document.getElementById(id);
  let drawn = null;  // {rows: [[HTMLImageElement, ...], ...], seed}

  function finish(state, text, count = 0) {
    document.body.dataset.state = state;
    $("message").textContent = text;
    $("message").classList.toggle("error", state === "error");
    document.dispatchEvent(new CustomEvent("playground:done", {detail: {state, count}}));
  }

  async function errorText(response) {
    try {
      return (await response.json()).error || `HTTP ${response.status}`;
    } catch {
      return `HTTP ${response.status} ${response.statusText}`;
    }
  }

  async function getJson(url, options) {
    const response = await fetch(url, options);
    if (!response.ok) throw new Error(await errorText(response));
    return response.json();
  }

  async function showModel() {
    const status = $("model-status");
    try {
      const versions = (await getJson(modelUrl)).model_version_status || [];
      const text = versions.map((v) => `version ${v.version} ${v.state}`).join(", ") || "no version";
      status.textContent = `model ${model}: ${text}`;
      status.className = versions.some((v) => v.state === "AVAILABLE") ? "ok" : "bad";
    } catch (error) {
      status.textContent = `model ${model}: ${error.message}`;
      status.className = "bad";
    }
  }

  function readForm() {
    const digits = [...document.querySelectorAll("#digits input:checked")].map((box) => Number(box.value));
    const count = Number($("count").value), seed = Number($("seed").value);
    if (!digits.length) throw new Error("Pick at least one digit.");
    if (!Number.isInteger(count) || count < 1 || count > Number($("count").max)) {
      throw new Error(`Per digit must be a whole number from 1 to ${$("count").max}.`);
    }
    if (!Number.isSafeInteger(seed) || seed < 0) throw new Error("Seed must be a whole number from 0.");
    return {digits, count, seed};
  }

  // Seeds seed, seed+1, ... row by row: what `cli.py generate --digit ... --count ... --seed ...` asks for.
  function sampleInputs({digits, count, seed}) {
    const digit = [], seeds = [];
    digits.forEach((d, row) => {
      for (let i = 0; i < count; i++) {
        digit.push(d);
        seeds.push(seed + row * count + i);
      }
    });
    return {digit, seed: seeds};
  }

  async function showGrid(digits, count, pngs) {
    const rows = [], loads = [];
    const grid = $("grid");
    grid.replaceChildren();
    digits.forEach((d, row) => {
      const line = document.createElement("div");
      line.className = "row";
      const label = document.createElement("span");
      label.className = "digit-label";
      label.textContent = d;
      line.append(label);
      const images = pngs.slice(row * count, (row + 1) * count).map((png) => {
        const image = new Image(SIDE, SIDE);
        image.alt = `a generated ${d}`;
        image.src = `data:image/png;base64,${png.b64}`;
        loads.push(image.decode());
        return image;
      });
      line.append(...images);
      grid.append(line);
      rows.push(images);
    });
    await Promise.all(loads);
    return rows;
  }

  async function draw(event) {
    event?.preventDefault();
    $("draw").disabled = true;
    try {
      const form = readForm();
      document.body.dataset.state = "drawing";
      $("message").classList.remove("error");
      $("message").textContent = `Drawing ${form.digits.length * form.count} digits…`;
      const reply = await getJson(`${modelUrl}:predict`, {
        method: "POST",
        headers: {"Content-Type": "application/json"},
        body: JSON.stringify({signature_name: "sample", inputs: sampleInputs(form)}),
      });
      const pngs = reply.outputs.png_bytes;
      drawn = {rows: await showGrid(form.digits, form.count, pngs), seed: form.seed};
      $("download").disabled = false;
      finish("drawn", `${pngs.length} digits from seed ${form.seed}.`, pngs.length);
    } catch (error) {
      finish("error", error.message);
    } finally {
      $("draw").disabled = false;
    }
  }

  // The grid as one PNG, drawn on a canvas: SCALE x the model's pixels, GAP pixels between.
  function gridCanvas() {
    const columns = Math.max(...drawn.rows.map((row) => row.length));
    const cell = SIDE * SCALE + GAP;
    const canvas = document.createElement("canvas");
    canvas.width = columns * cell + GAP;
    canvas.height = drawn.rows.length * cell + GAP;
    const context = canvas.getContext("2d");
    context.fillStyle = "#000";
    context.fillRect(0, 0, canvas.width, canvas.height);
    context.imageSmoothingEnabled = false;
    drawn.rows.forEach((row, r) => row.forEach((image, c) => {
      context.drawImage(image, GAP + c * cell, GAP + r * cell, SIDE * SCALE, SIDE * SCALE);
    }));
    return canvas;
  }

  function download() {
    gridCanvas().toBlob((blob) => {
      const link = document.createElement("a");
      link.href = URL.createObjectURL(blob);
      link.download = `digitgan-${model}-seed${drawn.seed}.png`;
      link.click();
      setTimeout(() => URL.revokeObjectURL(link.href), 0);
    }, "image/png");
  }

  window.playground = {gridCanvas};  // for scripts and tests: the grid a download would save

  $("model-name").textContent = model;
  $("controls").addEventListener("submit", draw);
  $("download").addEventListener("click", download);
  showModel().then(() => draw());
})();
