// aevb explorer: the page's side. Every number comes from the server's JSON API (/api/...); the model runs there.
"use strict";

const page = {
  state: null,      // /api/state
  plane: null,      // the name of the plane shown
  z: null,          // the latent point shown decoded, [D]
  hovered: null,    // the index of the test example under the pointer, or null
  picks: {a: null, b: null},
  seed: 0,
  pending: null,    // the latest decode request waiting while one is in flight
  inFlight: false,
};

const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const options = body === undefined ? {} :
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, options);
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.error || response.statusText);
  $("error").hidden = true;
  return answer;
}

function showError(error) {
  $("error").textContent = "error: " + error.message;
  $("error").hidden = false;
}

// -- an output of the model: an image, or a table's row in its file's units ------------------------

function outputElement(output, z) {
  if (output.png !== undefined) {
    const img = document.createElement("img");
    img.className = "pixel";
    img.src = output.png;
    img.alt = "decoded image";
    if (z) img.dataset.z = JSON.stringify(z);
    return img;
  }
  const table = document.createElement("table");
  table.className = "row-table";
  if (z) table.dataset.z = JSON.stringify(z);
  page.state.columns.forEach((name, i) => {
    const tr = table.insertRow();
    const th = document.createElement("th");
    th.textContent = name;
    tr.appendChild(th);
    tr.insertCell().textContent = Number(output.row[i]).toPrecision(4);
  });
  return table;
}

function tile(output, caption, z) {
  const div = document.createElement("div");
  div.className = "tile";
  div.appendChild(outputElement(output, z));
  const span = document.createElement("span");
  span.textContent = caption;
  div.appendChild(span);
  return div;
}

// -- the current latent point: decoded, on the sliders, marked in the plane ------------------------

function showDecoded(answer, caption) {
  page.z = answer.z;
  const box = $("decoded");
  box.replaceChildren(outputElement(answer.output, answer.z));
  $("decoded-caption").textContent = caption;
  $("set-a").disabled = $("set-b").disabled = false;
  setSliders(answer.z);
  markPoint(answer.z);
}

// one decode in flight at a time; moves made meanwhile collapse into the latest
async function decode(body, caption) {
  if (page.inFlight) { page.pending = [body, caption]; return; }
  page.inFlight = true;
  try {
    showDecoded(await api("/api/decode", body), caption);
  } catch (error) {
    showError(error);
  } finally {
    page.inFlight = false;
    if (page.pending) { const [b, c] = page.pending; page.pending = null; decode(b, c); }
  }
}

function project(z, plane) {
  const p = page.state.planes[plane];
  const centred = z.map((v, i) => v - p.origin[i]);
  return p.axes.map((axis) => axis.reduce((sum, a, i) => sum + a * centred[i], 0));
}

function markPoint(z) {
  const [u, v] = project(z, page.plane);
  const gd = $("plane");
  Plotly.restyle(gd, {x: [[u]], y: [[v]]}, [gd.data.length - 1]);
}

// -- the plane -------------------------------------------------------------------------------------

function drawPlane() {
  const s = page.state, p = s.planes[page.plane];
  const traces = [];
  const groups = new Map();
  p.points.forEach((point, i) => {
    const key = s.labels ? s.labels[i] : "test examples";
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(i);
  });
  [...groups.keys()].sort((a, b) => (a > b) - (a < b)).forEach((key) => {
    const indices = groups.get(key);
    const name = s.labels && s.classes ? s.classes[key] : String(key);
    traces.push({type: "scatter", mode: "markers", name, x: indices.map((i) => p.points[i][0]),
                 y: indices.map((i) => p.points[i][1]), customdata: indices, hoverinfo: "none",
                 marker: {size: 6, opacity: 0.75}});
  });
  traces.push({type: "scatter", mode: "markers", name: "decoded", x: [], y: [], hoverinfo: "skip",
               marker: {size: 16, symbol: "x-thin", line: {width: 3, color: "#000"}}});
  const layout = {margin: {l: 50, r: 10, t: 10, b: 45}, hovermode: "closest", hoverdistance: 6,
                  xaxis: {title: {text: p.axis_titles[0]}, zeroline: false},
                  yaxis: {title: {text: p.axis_titles[1]}, zeroline: false},
                  legend: {title: {text: s.labels ? "label" : ""}}, dragmode: "zoom"};
  const gd = $("plane");
  Plotly.react(gd, traces, layout, {displaylogo: false, responsive: true, modeBarButtonsToRemove: ["select2d", "lasso2d"]});
  $("inverse").textContent = p.inverse + ".";
  if (page.z) markPoint(page.z);
}

function planePoint(event) {
  const gd = $("plane");
  const box = gd.querySelector(".nsewdrag").getBoundingClientRect();
  const x = gd._fullLayout.xaxis.range, y = gd._fullLayout.yaxis.range;
  const u = x[0] + (event.clientX - box.left) / box.width * (x[1] - x[0]);
  const v = y[1] - (event.clientY - box.top) / box.height * (y[1] - y[0]);
  const inside = event.clientX >= box.left && event.clientX <= box.right &&
                 event.clientY >= box.top && event.clientY <= box.bottom;
  return inside ? [u, v] : null;
}

async function showExample(index) {
  try {
    const answer = await api(`/api/examples/${index}`);
    const label = answer.label === null ? "" : ` (label ${labelName(answer.label)})`;
    showDecoded({z: answer.z, output: answer.reconstruction},
                `test example ${index}${label}: its posterior mean, decoded`);
  } catch (error) {
    showError(error);
  }
}

function labelName(label) {
  const classes = page.state.classes;
  return classes ? classes[label] : String(label);
}

async function showTooltip(index, event) {
  const tooltip = $("tooltip"), s = page.state;
  const label = s.labels ? `label ${labelName(s.labels[index])}` : "";
  $("tooltip-text").textContent = `test example ${index} ${label}`;
  const img = $("tooltip-image"), row = $("tooltip-row");
  tooltip.style.left = `${event.clientX + 14}px`;
  tooltip.style.top = `${event.clientY + 14}px`;
  tooltip.hidden = false;
  if (s.kind === "image") {
    img.hidden = false;
    img.src = `/api/thumbnails/${index}`;
    img.dataset.index = index;
    return;
  }
  img.hidden = true;  // a table's row, in the units of its file
  row.replaceChildren();
  try {
    const answer = await api(`/api/examples/${index}`);
    if (page.hovered === index) row.replaceChildren(outputElement(answer.input));
  } catch (error) {
    showError(error);
  }
}

function wirePlane() {
  const gd = $("plane");
  gd.on("plotly_hover", (data) => {
    const point = data.points.find((pt) => pt.customdata !== undefined);
    if (!point) return;
    page.hovered = point.customdata;
    showTooltip(point.customdata, data.event);
  });
  gd.on("plotly_unhover", () => { page.hovered = null; $("tooltip").hidden = true; });
  let last = 0;
  gd.addEventListener("click", (event) => {
    if (event.timeStamp - last < 50) return;  // one press, seen once
    last = event.timeStamp;
    if (page.hovered !== null && !event.shiftKey) { showExample(page.hovered); return; }
    const point = planePoint(event);
    if (!point) return;
    decode({plane: page.plane, point}, `the point (${point.map((v) => v.toFixed(2)).join(", ")}) of the plane, decoded`);
  });
}

// -- sliders ---------------------------------------------------------------------------------------

function buildSliders() {
  const box = $("sliders");
  page.state.dims.forEach((dim) => {
    const row = document.createElement("label");
    row.className = "slider" + (dim.active ? "" : " inactive");
    const name = document.createElement("span");
    name.textContent = `${dim.name} ${dim.score_name} ${dim.score.toFixed(2)}`;
    const input = document.createElement("input");
    Object.assign(input, {type: "range", min: dim.low, max: dim.high, step: (dim.high - dim.low) / 400, value: 0});
    input.dataset.dim = dim.dim;
    const out = document.createElement("output");
    out.textContent = "0.00";
    input.addEventListener("input", () => {
      out.textContent = Number(input.value).toFixed(2);
      const z = page.z ? page.z.slice() : new Array(page.state.latent_dim).fill(0);
      z[dim.dim] = Number(input.value);
      decode({z}, `${dim.name} moved to ${Number(input.value).toFixed(2)}`);
    });
    row.append(name, input, out);
    box.appendChild(row);
  });
}

function setSliders(z) {
  document.querySelectorAll("#sliders input").forEach((input) => {
    input.value = z[Number(input.dataset.dim)];
    input.nextElementSibling.textContent = Number(z[Number(input.dataset.dim)]).toFixed(2);
  });
}

// -- interpolation ---------------------------------------------------------------------------------

function pick(which) {
  page.picks[which] = page.z.slice();
  const box = $(`pick-${which}`);
  box.replaceChildren(outputElement(currentOutput(), page.z));
  $("interpolate").disabled = !(page.picks.a && page.picks.b);
}

function currentOutput() {
  const shown = $("decoded").firstElementChild;
  if (shown.tagName === "IMG") return {png: shown.src};
  return {row: [...shown.rows].map((tr) => Number(tr.cells[1].textContent))};
}

async function interpolate() {
  try {
    const steps = Number($("steps").value);
    const answer = await api("/api/interpolate", {a: page.picks.a, b: page.picks.b, steps});
    const box = $("interpolation");
    box.replaceChildren();
    for (const kind of ["linear", "slerp"]) {
      const row = document.createElement("div");
      row.className = "path tiles";
      row.id = `path-${kind}`;
      const title = document.createElement("strong");
      title.textContent = kind === "linear" ? "linear" : "spherical";
      row.appendChild(title);
      answer[kind].forEach((output, i) => row.appendChild(tile(output, `t ${answer.t[i].toFixed(2)}`, answer[`z_${kind}`][i])));
      box.appendChild(row);
    }
  } catch (error) {
    showError(error);
  }
}

// -- draws -----------------------------------------------------------------------------------------

async function draw() {
  const sampler = $("sampler").value;
  if (!sampler) return;
  try {
    const answer = await api("/api/samples", {sampler, n: 16, seed: page.seed});
    $("draws").replaceChildren(...answer.outputs.map((output, i) => tile(output, "", answer.z[i])));
    $("draws-note").textContent = `16 draws from ${sampler}, seed ${answer.seed}, decoded (the means of p(x|z))`;
    page.seed += 1;
  } catch (error) {
    showError(error);
  }
}

// -- start -----------------------------------------------------------------------------------------

async function start() {
  const s = page.state = await api("/api/state");
  $("title").textContent = `aevb explorer: ${s.title}`;
  $("about").textContent = `${s.about}; ${s.latent_dim} latent dimensions`;
  $("points-note").textContent = s.examples < s.total_examples ?
    `the first ${s.examples} of ${s.total_examples} test examples` : `${s.examples} test examples`;
  const choice = $("plane-choice");
  for (const [name, p] of Object.entries(s.planes)) choice.add(new Option(p.label, name));
  page.plane = choice.value = "pca" in s.planes && s.latent_dim > 2 ? "pca" : "coords";
  choice.addEventListener("change", () => { page.plane = choice.value; drawPlane(); });
  for (const name of s.samplers) $("sampler").add(new Option(name, name));
  if (!s.samplers.length) {
    $("draw").disabled = true;
    $("draws-note").textContent = "this model has no prior to draw from (an autoencoder's codes are not fitted to one)";
  }
  drawPlane();
  wirePlane();
  buildSliders();
  $("set-a").addEventListener("click", () => pick("a"));
  $("set-b").addEventListener("click", () => pick("b"));
  $("interpolate").addEventListener("click", interpolate);
  $("draw").addEventListener("click", draw);
  await draw();
  document.body.dataset.ready = "true";
}

start().catch(showError);
