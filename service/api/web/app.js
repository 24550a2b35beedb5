// The undiffuse web page: submit a job, follow its events (progress and previews), show the
// results, list and cancel past jobs. Plain ES module, no build step, no CDN: it works offline.
// The key goes in an Authorization header on every call (EventSource cannot send headers, so
// the event stream is read with fetch and parsed here).

const $ = (id) => document.getElementById(id);
const KEY_STORE = "undiffuse.api-key";
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
let following = null; // AbortController of the job being followed
let models = [];

// --- talking to the API ---------------------------------------------------------------------

class ApiError extends Error {}

function key() {
  return $("api-key").value.trim();
}

function explain(status, body) {
  // FastAPI's detail: a sentence, or field errors [{loc: ["body", "steps"], msg: "..."}]
  const detail = body && body.detail;
  if (Array.isArray(detail)) {
    return detail
      .map((d) => {
        const field = (d.loc || []).filter((p) => !["body", "query", "path"].includes(p)).join(".");
        return field ? `${field}: ${d.msg}` : d.msg;
      })
      .join("; ");
  }
  if (typeof detail === "string") return detail;
  if (status === 401) return "the API key was not accepted";
  return `the service answered HTTP ${status}`;
}

async function api(path, options = {}) {
  if (!key()) throw new ApiError("Paste your API key first.");
  const headers = { Authorization: `Bearer ${key()}`, ...(options.headers || {}) };
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (e) {
    throw new ApiError(`Cannot reach the service (${e.message}).`);
  }
  if (response.status === 204) return null;
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const retry = response.headers.get("Retry-After");
    const later = retry ? ` Try again in ${retry} s.` : "";
    throw new ApiError(`${explain(response.status, body)} (HTTP ${response.status}).${later}`);
  }
  return body;
}

function showError(error) {
  const box = $("error");
  box.textContent = error ? (error instanceof ApiError ? error.message : `Something went wrong: ${error.message}`) : "";
  box.hidden = !error;
}

function idempotencyKey() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return `${Date.now().toString(16)}-${Math.random().toString(16).slice(2)}`;
}

// --- the form ---------------------------------------------------------------------------------

async function loadModels() {
  const body = await api("/v1/models");
  models = body.models;
  const select = $("model");
  const chosen = select.value;
  const isChosen = (m) => (chosen ? m.name === chosen : m.default);
  select.replaceChildren(
    ...models.map((m) => new Option(`${m.name} (${m.image_size}×${m.image_size})`, m.name, isChosen(m), isChosen(m)))
  );
  fillClasses();
}

function fillClasses() {
  const model = models.find((m) => m.name === $("model").value);
  const select = $("class-label");
  const chosen = select.value; // kept when the new model has that class too
  const names = model && model.num_classes ? model.class_names || [...Array(model.num_classes).keys()].map(String) : [];
  select.replaceChildren(...names.map((name, i) => new Option(name, String(i), false, String(i) === chosen)));
  select.disabled = names.length === 0;
  $("guidance").disabled = names.length === 0; // guidance steers towards a class: none without classes
  $("steps").max = model ? model.max_steps : 1000;
}

function jobBody() {
  const body = {
    model: $("model").value || undefined,
    num_images: Number($("num-images").value),
    steps: Number($("steps").value),
    sampler: $("sampler").value,
    previews: $("previews").checked,
  };
  if (!$("class-label").disabled) {
    body.class_label = Number($("class-label").value);
    body.guidance_scale = Number($("guidance").value);
  }
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("output-format").value !== "png") body.output_format = $("output-format").value;
  return body;
}

async function submit(event) {
  event.preventDefault();
  showError(null);
  const button = $("submit");
  button.disabled = true;
  try {
    rememberKey();
    const job = await api("/v1/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Idempotency-Key": idempotencyKey() },
      body: JSON.stringify(jobBody()),
    });
    follow(job);
    refreshJobs();
  } catch (e) {
    showError(e);
  } finally {
    button.disabled = false;
  }
}

function rememberKey() {
  if ($("remember-key").checked) localStorage.setItem(KEY_STORE, key());
  else localStorage.removeItem(KEY_STORE);
}

// --- following one job ------------------------------------------------------------------------

function follow(job) {
  if (following) following.abort();
  following = new AbortController();
  $("job-panel").hidden = false;
  $("job-id").textContent = job.id;
  $("gallery").replaceChildren();
  $("preview-box").hidden = true;
  $("preview").removeAttribute("src");
  showJob(job);
  watch(job.id, following.signal).catch((e) => {
    if (e.name !== "AbortError") showError(e);
  });
}

function showJob(job) {
  $("job-status").textContent = job.status;
  $("job-detail").textContent = job.error ? `— ${job.error.message}` : "";
  showProgress(job.progress);
  const cancel = $("cancel");
  cancel.hidden = TERMINAL.has(job.status);
  cancel.onclick = () => cancelJob(job.id);
  if (job.status === "succeeded") showResults(job);
}

function showProgress(p) {
  $("step-bar").max = Math.max(1, p.steps);
  $("step-bar").value = p.step;
  $("step-text").textContent = `${p.step} / ${p.steps}`;
  $("image-bar").max = Math.max(1, p.images_total);
  $("image-bar").value = p.images_done;
  $("image-text").textContent = `${p.images_done} / ${p.images_total}`;
}

function showPreview(data) {
  document.body.dataset.previews = Number(document.body.dataset.previews || 0) + 1; // for tests and curious users
  $("preview").src = `data:image/png;base64,${data.png}`;
  $("preview-caption").textContent = `first image, predicted at step ${data.step} of ${data.steps}`;
  $("preview-box").hidden = false;
}

function showResults(job) {
  const figures = job.results.map((r) => {
    const figure = document.createElement("figure");
    const link = document.createElement("a");
    link.href = r.url;
    link.download = r.key.slice(r.key.lastIndexOf("/") + 1); // 00000.png, .jpg or .webp: the job's format
    const img = document.createElement("img");
    img.src = r.url;
    img.alt = `image ${r.index} (seed ${r.seed})`;
    link.append(img);
    const caption = document.createElement("figcaption");
    caption.textContent = `#${r.index}`;
    figure.append(link, caption);
    return figure;
  });
  $("gallery").replaceChildren(...figures);
  $("preview-box").hidden = true;
}

async function watch(jobId, signal) {
  // the event stream, resumed with Last-Event-ID if it drops; polling if the server has none
  let lastId = null;
  for (let attempt = 0; attempt < 6; attempt++) {
    const headers = { Authorization: `Bearer ${key()}`, Accept: "text/event-stream" };
    if (lastId) headers["Last-Event-ID"] = lastId;
    let response;
    try {
      response = await fetch(`/v1/jobs/${jobId}/events`, { headers, signal });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      await sleep(1000 * 2 ** attempt, signal);
      continue;
    }
    if (!response.ok || !(response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
      if (response.status === 401 || response.status === 404) {
        const body = await response.json().catch(() => null);
        throw new ApiError(`${explain(response.status, body)} (HTTP ${response.status}).`);
      }
      return poll(jobId, signal);
    }
    const ended = await readEvents(response, signal, (event) => {
      if (event.id) lastId = event.id;
      attempt = 0;
      return handle(jobId, event);
    });
    if (ended) return;
    await sleep(500, signal);
  }
  return poll(jobId, signal);
}

export async function readEvents(response, signal, onEvent) {
  // text/event-stream framing: fields per line, events separated by a blank line
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      // \r\n and \r end lines too; a \r that ends the buffer waits for the next chunk, which may
      // begin with its \n (normalized alone, the pair would make an empty line and cut the event)
      buffer = (buffer + value).replace(/\r\n|\r(?!$)/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const event = { event: "message", data: "", id: null };
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue; // keep-alive comments
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "data") event.data += (event.data ? "\n" : "") + text;
          else if (field === "event") event.event = text;
          else if (field === "id") event.id = text;
        }
        if (event.data && (await onEvent(event))) return true;
      }
    }
  } finally {
    if (signal.aborted) reader.cancel().catch(() => {});
  }
}

async function handle(jobId, event) {
  const data = JSON.parse(event.data);
  if (event.event === "progress") {
    document.body.dataset.progressEvents = Number(document.body.dataset.progressEvents || 0) + 1;
    showProgress(data);
  }
  else if (event.event === "preview") showPreview(data);
  else if (event.event === "started") $("job-status").textContent = "running";
  else if (event.event === "queued") showJob(data);
  if (!TERMINAL.has(event.event)) return false;
  showJob(await api(`/v1/jobs/${jobId}`)); // the terminal event carries the view; fetch fresh URLs
  refreshJobs();
  return true;
}

async function poll(jobId, signal) {
  for (;;) {
    const job = await api(`/v1/jobs/${jobId}`);
    showJob(job);
    if (TERMINAL.has(job.status)) return refreshJobs();
    await sleep(1000, signal);
  }
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const abort = () => {
      clearTimeout(timer);
      reject(new DOMException("aborted", "AbortError"));
    };
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", abort);
      resolve();
    }, ms);
    signal.addEventListener("abort", abort, { once: true });
  });
}

async function cancelJob(jobId) {
  showError(null);
  try {
    const job = await api(`/v1/jobs/${jobId}/cancel`, { method: "POST" });
    if ($("job-id").textContent === jobId) showJob(job);
    refreshJobs();
  } catch (e) {
    showError(e);
  }
}

// --- the list of jobs -------------------------------------------------------------------------

async function refreshJobs() {
  if (!key()) return;
  try {
    const body = await api("/v1/jobs?limit=20");
    $("jobs").tBodies[0].replaceChildren(...body.jobs.map(jobRow));
  } catch (e) {
    showError(e);
  }
}

function jobRow(job) {
  const row = document.createElement("tr");
  row.dataset.jobId = job.id;
  const cells = [
    Object.assign(document.createElement("code"), { textContent: job.id }),
    job.status,
    `${job.progress.images_done} / ${job.progress.images_total}`,
    new Date(job.created_at * 1000).toLocaleString(),
  ];
  for (const value of cells) {
    const td = document.createElement("td");
    td.append(value);
    row.append(td);
  }
  const actions = document.createElement("td");
  const open = Object.assign(document.createElement("button"), { type: "button", textContent: "Open" });
  open.className = "small secondary";
  open.onclick = async () => {
    try {
      follow(await api(`/v1/jobs/${job.id}`));
    } catch (e) {
      showError(e);
    }
  };
  actions.append(open);
  if (!TERMINAL.has(job.status)) {
    const cancel = Object.assign(document.createElement("button"), { type: "button", textContent: "Cancel" });
    cancel.className = "small cancel-job";
    cancel.onclick = () => cancelJob(job.id);
    actions.append(" ", cancel);
  }
  row.append(actions);
  return row;
}

// --- start ------------------------------------------------------------------------------------

let connectedKey = null;

async function connect() {
  if (!key() || key() === connectedKey) return; // the change event also fires on blur
  showError(null);
  connectedKey = key();
  try {
    await loadModels();
    await refreshJobs();
  } catch (e) {
    connectedKey = null; // try again with the next change
    showError(e);
  }
}

$("job-form").addEventListener("submit", submit);
$("model").addEventListener("change", fillClasses);
$("api-key").addEventListener("change", connect);
$("refresh").addEventListener("click", refreshJobs);
const saved = localStorage.getItem(KEY_STORE);
if (saved) {
  $("api-key").value = saved;
  $("remember-key").checked = true;
  connect();
}
