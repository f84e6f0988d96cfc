// Talking to the server: the OpenAI API (streamed chat completions) and the app's JSON
// routes. Every failure becomes an ApiError whose `message` a person can read.

const KEY = "loratree-api-key";

export class ApiError extends Error {
  constructor(status, message, code = null, retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY, key); else sessionStorage.removeItem(KEY);
}

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// A readable sentence for an error answer of the server (OpenAI's error shape).
function explain(status, err, model, retryAfter) {
  const said = (err && err.message) || "";
  if (status === 401) return "This server needs an API key (missing or wrong key).";
  if (status === 404 && err && err.code === "model_not_found") {
    return `Unknown adapter: “${model}” is not in the store (any more). Pick another ` +
      "character.";
  }
  if (status === 429) {
    return `The server is busy (${said}). Try again in ${retryAfter || 1} s.`;
  }
  if (status === 503) return "The server is shutting down (draining) and takes no new requests.";
  if (status === 504) return `No answer in time: ${said}`;
  if (status === 422) return `This adapter cannot be used: ${said}`;
  return `Error ${status}: ${said || "the server could not answer"}`;
}

async function failure(res, model) {
  let body = null;
  try { body = await res.json(); } catch { body = null; }
  const err = body && body.error;
  const retryAfter = res.headers.get("Retry-After");
  return new ApiError(res.status, explain(res.status, err, model, retryAfter),
                      err ? err.code : null, retryAfter);
}

async function request(url, options, model) {
  let res;
  try {
    res = await fetch(url, options);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "Cannot reach the server. Is `loratree serve` still running?");
  }
  if (!res.ok) throw await failure(res, model);
  return res;
}

export async function getJson(path) {
  const res = await request(path, { headers: headers() });
  return res.json();
}

// Stream one chat completion. `onDelta(text)` gets each piece as it arrives. Resolves to
// {text, tokens, finish, firstTokenS, totalS}; rejects with ApiError, or AbortError when
// `signal` stops it.
export async function streamChat({ model, messages, temperature, maxTokens, signal, onDelta }) {
  const started = performance.now();
  const body = {
    model, messages, stream: true, stream_options: { include_usage: true },
    temperature, max_tokens: maxTokens,
  };
  const res = await request("/v1/chat/completions", {
    method: "POST", signal, body: JSON.stringify(body),
    headers: headers({ "Content-Type": "application/json" }),
  }, model);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  const out = { text: "", tokens: null, finish: null, firstTokenS: null, totalS: 0 };
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) take(line.slice(6), out, started, onDelta, model);
      }
    }
  }
  out.totalS = (performance.now() - started) / 1000;
  return out;
}

function take(data, out, started, onDelta, model) {
  if (data === "[DONE]") return;
  const chunk = JSON.parse(data);
  if (chunk.error) {
    throw new ApiError(500, explain(500, chunk.error, model, null), chunk.error.code);
  }
  if (chunk.usage) out.tokens = chunk.usage.completion_tokens;
  const choice = chunk.choices && chunk.choices[0];
  if (!choice) return;
  if (choice.finish_reason) out.finish = choice.finish_reason;
  const piece = choice.delta && choice.delta.content;
  if (piece) {
    if (out.firstTokenS === null) out.firstTokenS = (performance.now() - started) / 1000;
    out.text += piece;
    onDelta(piece, out.text);
  }
}
