// Talking to the server that serves this page: OpenAI's chat completions API, the reply streamed as server-sent
// events (`data: {json}` blocks separated by a blank line, then `data: [DONE]`). Every failure becomes an
// APIError whose message can be shown to a person as it is.

export class APIError extends Error {
  constructor(message, param = null) {
    super(message);
    this.param = param; // where in the request the server found the problem, e.g. "messages[1].content[0]"
  }
}

function headers(apiKey) {
  const sent = { "Content-Type": "application/json" };
  if (apiKey) sent.Authorization = `Bearer ${apiKey}`;
  return sent;
}

// Paths are relative ("v1/models", not "/v1/models") so that the page also works behind a proxy's path prefix.
async function call(path, options) {
  try {
    return await fetch(path, options);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new APIError("The server cannot be reached: is `qwen2audio serve` still running?");
  }
}

// The error a failed response carries, in plain words. The server answers in OpenAI's shape,
// {"error": {"message", "type", "param", "code"}}; anything else (a proxy's page) is described by its status.
async function errorOf(response) {
  let message = `The server answered ${response.status} ${response.statusText}.`;
  let param = null;
  try {
    const body = await response.json();
    if (body.error && body.error.message) ({ message, param } = body.error);
  } catch {
    // not JSON: keep the status line
  }
  if (response.status === 401) {
    message = `This server needs its API key: open Settings and enter the key it was started with. (${message})`;
  } else if (response.status === 429) {
    message = `The server is busy; try again in a moment. (${message})`;
  }
  return new APIError(message, param);
}

// The name the server serves its model under: every request must name it.
export async function servedModel(apiKey) {
  const response = await call("v1/models", { headers: headers(apiKey) });
  if (!response.ok) throw await errorOf(response);
  const body = await response.json();
  return body.data[0].id;
}

// Sends the request with stream: true and calls onText(piece) for each piece of the reply as it arrives.
// Resolves with the finish_reason ("stop" or "length"); rejects with an APIError, or with the AbortError of
// `signal` when the caller stops it (the connection closes, which is how the server learns to free the slot).
export async function streamChat(request, apiKey, signal, onText) {
  const response = await call("v1/chat/completions", {
    method: "POST",
    headers: headers(apiKey),
    body: JSON.stringify({ ...request, stream: true }),
    signal,
  });
  if (!response.ok) throw await errorOf(response);
  let finish = null;
  for await (const data of serverSentEvents(response.body)) {
    if (data === "[DONE]") return finish;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new APIError(chunk.error.message, chunk.error.param); // an error after the stream began
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) continue; // the usage chunk has no choices
    if (choice.delta && choice.delta.content) onText(choice.delta.content);
    if (choice.finish_reason) finish = choice.finish_reason;
  }
  throw new APIError("The reply was cut off: the connection closed before the server finished.");
}

// The data of each server-sent event in a response body, as the events arrive. An event is one or more lines
// ending in a blank line; its data is the text after "data:" on each of its data lines.
async function* serverSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + value).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
    }
  }
}
