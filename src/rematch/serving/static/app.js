// The rematch search page: plain JS, no build step. It only calls the server's own API.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { image: null, authRequired: false };

function apiKey() { return $("api-key").value.trim(); }

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (apiKey()) h["Authorization"] = "Bearer " + apiKey();
  return h;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function loadInfo() {
  try {
    const info = await (await fetch("/health")).json();
    state.authRequired = info.auth_required;
    $("key-row").hidden = !info.auth_required;
    const saved = sessionStorage.getItem("rematch-api-key");
    if (saved) $("api-key").value = saved;
    $("server-info").textContent = "model " + info.model + " · " + info.dimension + "-d embeddings · " +
      (info.index ? info.index.count + " indexed items" : "no index loaded (start the server with --index)");
  } catch (error) {
    $("server-info").textContent = "the server does not answer: " + error;
  }
}

function setImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) { showError("that file is not an image"); return; }
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;  // a data: URL, sent as the query's image
    $("preview").src = state.image;
    $("preview").hidden = false;
    $("clear-image").hidden = false;
    $("drop-label").textContent = file.name;
  };
  reader.readAsDataURL(file);
}

function clearImage() {
  state.image = null;
  $("preview").hidden = true;
  $("clear-image").hidden = true;
  $("image-file").value = "";
  $("drop-label").textContent = "Drop an image here, or click to choose one (optional)";
}

async function thumbnail(url, img) {
  // fetched (not <img src>) so that the API key travels in the Authorization header
  const response = await fetch(url, { headers: headers(false) });
  if (response.ok) img.src = URL.createObjectURL(await response.blob());
}

function card(hit) {
  const div = document.createElement("div");
  div.className = "result";
  div.dataset.id = hit.id;
  if (hit.thumbnail_url) {
    const box = document.createElement("div");
    box.className = "thumb";
    const img = document.createElement("img");
    img.alt = hit.id;
    box.appendChild(img);
    div.appendChild(box);
    thumbnail(hit.thumbnail_url, img);
  }
  if (hit.text) {
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = hit.text;
    div.appendChild(text);
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = "#" + hit.rank;
  const id = document.createElement("span");
  id.className = "id";
  id.textContent = hit.id;
  id.title = hit.id;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3) + (hit.rerank_score !== undefined ? " · p=" + hit.rerank_score.toFixed(3) : "");
  score.title = "cosine similarity" + (hit.rerank_score !== undefined ? "; p(Yes) of the matching head" : "");
  meta.append(rank, id, score);
  div.appendChild(meta);
  return div;
}

async function search(event) {
  if (event) event.preventDefault();
  showError("");
  const text = $("query").value.trim();
  if (!text && !state.image) { showError("type a query or drop an image"); return; }
  if (apiKey()) sessionStorage.setItem("rematch-api-key", apiKey());
  const query = {};
  if (text) query.text = text;
  if (state.image) query.image = state.image;
  const body = { query: query, k: parseInt($("k").value, 10), rerank: $("rerank").checked };
  const results = $("results");
  results.dataset.state = "loading";
  const started = performance.now();
  try {
    const response = await fetch("/v1/search", { method: "POST", headers: headers(true), body: JSON.stringify(body) });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error ? answer.error.message : response.statusText);
    results.replaceChildren(...answer.data.map(card));
    $("summary").textContent = answer.data.length + " results in " + Math.round(performance.now() - started) +
      " ms" + (answer.rerank ? " · top " + answer.rerank + " reranked" : "");
    results.dataset.state = "done";
  } catch (error) {
    results.replaceChildren();
    $("summary").textContent = "";
    showError(String(error.message || error));
    results.dataset.state = "error";
  }
}

function wire() {
  $("search-form").addEventListener("submit", search);
  $("rerank").addEventListener("change", () => { if ($("results").dataset.state === "done") search(); });
  const drop = $("drop");
  drop.addEventListener("click", (event) => { if (event.target.id !== "clear-image") $("image-file").click(); });
  drop.addEventListener("keydown", (event) => { if (event.key === "Enter") $("image-file").click(); });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    setImage(event.dataTransfer.files[0]);
  });
  $("image-file").addEventListener("change", () => setImage($("image-file").files[0]));
  $("clear-image").addEventListener("click", (event) => { event.stopPropagation(); clearImage(); });
  loadInfo();
}

wire();
