// Calls to the pocketdiffusion server: JSON in and out, the API key when one is set, and the
// job event stream read through fetch (EventSource cannot send the key header).

const KEY_STORE = "pocketdiffusion.apiKey";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function apiKey() {
  return localStorage.getItem(KEY_STORE) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORE, key);
  else localStorage.removeItem(KEY_STORE);
}

async function call(path, { method = "GET", json, signal } = {}) {
  const headers = new Headers();
  if (apiKey()) headers.set("X-API-Key", apiKey());
  let body;
  if (json !== undefined) {
    headers.set("Content-Type", "application/json");
    body = JSON.stringify(json);
  }
  const response = await fetch(path, { method, headers, body, signal });
  if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
  return response;
}

// The server's errors are {"detail": "..."}; FastAPI's 422s list the fields.
async function errorMessage(response) {
  try {
    const { detail } = await response.json();
    if (Array.isArray(detail)) return detail.map((d) => `${d.loc.slice(1).join(".")}: ${d.msg}`).join("; ");
    return String(detail);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

export const getJson = async (path) => (await call(path)).json();
export const postJson = async (path, json) => (await call(path, { method: "POST", json })).json();
export const getBlob = async (path) => (await call(path)).blob();

// Server-sent events of a job: yields {event, data} until the server ends the stream.
export async function* jobEvents(jobId, signal) {
  const response = await call(`/api/v1/jobs/${jobId}/events`, { signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = parseEvent(block);
      if (event) yield event;
    }
  }
}

function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trim());
  }
  return data.length ? { event, data: JSON.parse(data.join("\n")) } : null; // comments are keep-alives
}
