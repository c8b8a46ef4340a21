// The page's only way out: this server's own API. Chat completions are read as server-sent
// events by hand (EventSource cannot POST), so a stop is an AbortController and a dropped
// connection is told apart from an answer that ended.

export class APIError extends Error {
  // status 0: no HTTP answer (the connection failed or dropped); error: the server's body
  constructor(message, status = 0, error = null) {
    super(message);
    this.status = status;
    this.error = error;
  }
}

function headers(key, json) {
  const h = {};
  if (key) h.Authorization = `Bearer ${key}`;
  if (json) h['Content-Type'] = 'application/json';
  return h;
}

async function errorOf(res) {
  const text = await res.text().catch(() => '');
  let error = null;
  try {
    error = JSON.parse(text).error || null;
  } catch {
    // not the server's JSON error: a proxy's page, or nothing
  }
  const message = error?.message || text.slice(0, 300) || res.statusText;
  return new APIError(`${res.status}: ${message}`, res.status, error);
}

export async function getJSON(url, key) {
  let res;
  try {
    res = await fetch(url, { headers: headers(key, false) });
  } catch (e) {
    throw new APIError(`cannot reach the server (${e.message})`);
  }
  if (!res.ok) throw await errorOf(res);
  return res.json();
}

function parseEvent(event) {
  const data = event
    .split('\n')
    .filter((line) => line.startsWith('data:'))
    .map((line) => line.slice(5).trimStart())
    .join('\n');
  if (!data) return null;
  if (data === '[DONE]') return 'done';
  const chunk = JSON.parse(data);
  if (chunk.error) throw new APIError(chunk.error.message, 200, chunk.error);
  return chunk;
}

const LOST = 'the connection to the server was lost before the answer ended';

// Yields each chunk of a streamed chat completion; throws APIError (refused, or the
// connection lost) or the AbortError of `signal`.
export async function* streamChat(body, key, signal) {
  let res;
  try {
    res = await fetch('/v1/chat/completions', {
      method: 'POST',
      headers: headers(key, true),
      body: JSON.stringify({ ...body, stream: true }),
      signal,
    });
  } catch (e) {
    if (signal.aborted) throw e;
    throw new APIError(`cannot reach the server (${e.message})`);
  }
  if (!res.ok) throw await errorOf(res);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    let read;
    try {
      read = await reader.read();
    } catch (e) {
      if (signal.aborted) throw e;
      throw new APIError(LOST);
    }
    if (read.done) throw new APIError(LOST);
    buffer += read.value;
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const chunk = parseEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (chunk === 'done') return;
      if (chunk) yield chunk;
    }
  }
}
