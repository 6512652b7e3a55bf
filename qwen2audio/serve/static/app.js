// The page: a conversation with the model that `qwen2audio serve` serves, one turn after another.
// Read top to bottom: the state; drawing the conversation; settings; the message being written (text, files,
// the microphone); sending a turn and streaming its reply; Stop, Regenerate, Clear; errors; the event wiring.

import { APIError, servedModel, streamChat } from "./api.js";
import { Recorder, base64Of, formatOf, makeClip } from "./audio.js";

// ---- state -------------------------------------------------------------------------------------------------
const turns = []; // the conversation: {role: "user", clips, text, node} and {role: "assistant", text, node}
let pending = []; // the clips of the message being written
let model = null; // the name the server serves its model under (GET /v1/models)
let controller = null; // aborts the reply being streamed; null when none is
let recorder = null; // the microphone, while recording
let recordings = 0; // to name recordings "recording 1", "recording 2", ...

const $ = (id) => document.getElementById(id);
const conversation = $("conversation");
const input = $("text");

// An element with properties and children: el("p", {className: "x"}, "text", otherNode).
function el(tag, properties = {}, ...children) {
  const node = Object.assign(document.createElement(tag), properties);
  node.append(...children);
  return node;
}

// ---- drawing the conversation --------------------------------------------------------------------------------
function clipView(clip, onRemove = null) {
  const view = el("figure", { className: "clip" },
    el("audio", { controls: true, src: clip.url, preload: "metadata" }),
    el("figcaption", {}, clip.name));
  if (onRemove) {
    view.append(el("button", { type: "button", className: "remove", textContent: "×", title: `Remove ${clip.name}`,
      ariaLabel: `Remove ${clip.name}`, onclick: onRemove }));
  }
  return view;
}

function addTurn(turn) {
  turn.node = el("article", { className: `turn ${turn.role}` });
  if (turn.role === "user") {
    turn.node.append(...turn.clips.map((clip) => clipView(clip)));
    if (turn.text) turn.node.append(el("p", { className: "text", textContent: turn.text }));
  } else {
    turn.node.append(el("p", { className: "text" }), el("span", { className: "status" }));
  }
  turns.push(turn);
  conversation.append(turn.node);
  followConversation(true);
  refresh();
  return turn;
}

function removeTurn(turn) {
  const index = turns.indexOf(turn);
  if (index < 0) return; // already gone (Clear)
  turns.splice(index, 1);
  turn.node.remove();
  refresh();
}

const lastTurn = () => turns[turns.length - 1];

// Keeps the newest text in view while a reply grows, unless the reader scrolled up to read something older.
function followConversation(always = false) {
  const nearBottom = conversation.scrollHeight - conversation.scrollTop - conversation.clientHeight < 80;
  if (always || nearBottom) conversation.scrollTop = conversation.scrollHeight;
}

// Buttons are enabled by what the state allows; the hint shows while the conversation is empty.
function refresh() {
  const busy = controller !== null;
  $("send").disabled = busy || (!input.value.trim() && pending.length === 0);
  $("stop").hidden = !busy;
  $("send").hidden = busy;
  $("regenerate").disabled = busy || turns.length === 0;
  $("clear").disabled = turns.length === 0 && !busy;
  $("empty").hidden = turns.length > 0;
}

// The clips waiting in the message being written, each with a player and a remove button.
function setPending(clips) {
  pending = clips;
  $("attachments").replaceChildren(...pending.map((clip) => clipView(clip, () => removePending(clip))));
  refresh();
}

// ---- settings ------------------------------------------------------------------------------------------------
// Kept in the browser: the prompt and numbers for good (localStorage), the API key for this tab only.
const SETTINGS = ["system", "temperature", "max-tokens"];

function loadSettings() {
  for (const id of SETTINGS) $(id).value = localStorage.getItem(`qwen2audio.${id}`) || "";
  $("api-key").value = sessionStorage.getItem("qwen2audio.api-key") || "";
}

function saveSettings() {
  for (const id of SETTINGS) localStorage.setItem(`qwen2audio.${id}`, $(id).value);
  sessionStorage.setItem("qwen2audio.api-key", $("api-key").value);
}

// The request's sampling fields; an empty box leaves the server's default.
function generationOptions() {
  const options = {};
  const temperature = $("temperature").value.trim();
  const maxTokens = $("max-tokens").value.trim();
  if (temperature !== "") options.temperature = Number(temperature); // 0: greedy
  if (maxTokens !== "") options.max_tokens = Number(maxTokens);
  return options;
}

// Learns the model's name from the server; returns the error that prevented it, else null.
async function connect() {
  $("model").textContent = "connecting…";
  try {
    model = await servedModel($("api-key").value.trim());
    $("model").textContent = model;
    hideError();
    return null;
  } catch (error) {
    model = null;
    $("model").textContent = "not connected";
    showError(error.message);
    return error;
  }
}

// ---- the message being written ---------------------------------------------------------------------------------
function addFiles(files) {
  setPending([...pending, ...[...files].map((file) => makeClip(file, file.name, formatOf(file)))]);
}

function removePending(clip) {
  URL.revokeObjectURL(clip.url);
  setPending(pending.filter((c) => c !== clip));
}

// Record starts the microphone; pressed again, it stops, and the recording joins the message being written.
async function toggleRecording() {
  const button = $("record");
  button.disabled = true; // until the microphone has started or stopped
  try {
    if (recorder === null) {
      const starting = new Recorder(showLevel);
      await starting.start();
      recorder = starting;
    } else {
      const active = recorder;
      recorder = null;
      setPending([...pending, makeClip(await active.stop(), `recording ${++recordings}.wav`, "wav")]);
    }
  } catch (error) {
    showError(error.message);
  } finally {
    button.disabled = false;
    button.textContent = recorder === null ? "Record" : "Stop recording";
    button.ariaPressed = String(recorder !== null);
    $("recording").hidden = recorder === null;
  }
}

function showLevel(level, seconds) {
  $("level").style.width = `${Math.round(100 * level)}%`;
  const whole = Math.floor(seconds);
  $("timer").textContent = `${Math.floor(whole / 60)}:${String(whole % 60).padStart(2, "0")}`;
}

// ---- sending a turn and streaming its reply ----------------------------------------------------------------------
function send() {
  const text = input.value.trim();
  if (controller !== null || (!text && pending.length === 0)) return;
  addTurn({ role: "user", clips: pending, text });
  input.value = "";
  setPending([]);
  reply();
}

// The request: the system prompt, then every turn so far, audio included (the server keeps no conversation).
// `names` maps each clip's place in the request ("messages[1].content[0]") to its name, for error messages.
async function chatRequest() {
  const messages = [];
  const names = {};
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const turn of turns) {
    if (turn.role === "assistant") {
      messages.push({ role: "assistant", content: turn.text });
      continue;
    }
    const content = [];
    for (const clip of turn.clips) {
      names[`messages[${messages.length}].content[${content.length}]`] = clip.name;
      content.push({ type: "input_audio", input_audio: { data: await base64Of(clip), format: clip.format } });
    }
    if (turn.text) content.push({ type: "text", text: turn.text });
    messages.push({ role: "user", content });
  }
  return { request: { model, messages, ...generationOptions() }, names };
}

// Asks for the reply to the conversation (which ends with a user turn) and writes it into a new turn as it comes.
async function reply() {
  hideError();
  const problem = model === null ? await connect() : null;
  if (problem) return fail(problem, {});
  let chat;
  try {
    chat = await chatRequest();
  } catch (error) {
    return fail(error, {});
  }
  const answer = addTurn({ role: "assistant", text: "" });
  controller = new AbortController();
  answer.node.classList.add("streaming");
  refresh();
  try {
    const finish = await streamChat(chat.request, $("api-key").value.trim(), controller.signal, (piece) => {
      answer.text += piece;
      answer.node.querySelector(".text").textContent = answer.text;
      followConversation();
    });
    if (finish === "length") {
      answer.node.querySelector(".status").textContent = "cut off at the token limit (Settings: max new tokens)";
    }
  } catch (error) {
    if (error.name !== "AbortError") {
      removeTurn(answer);
      fail(error, chat.names);
    } else if (answer.text) {
      answer.node.querySelector(".status").textContent = "stopped";
    } else {
      removeTurn(answer); // stopped before any text: as if never asked
    }
  } finally {
    controller = null;
    answer.node.classList.remove("streaming");
    refresh();
  }
}

// ---- Stop, Regenerate, Clear -------------------------------------------------------------------------------------
function stop() {
  if (controller !== null) controller.abort(); // closes the connection: the server frees the request's slot
}

// Replaces the last reply with a new one (or answers the last message, if it has no reply).
function regenerate() {
  if (controller !== null || turns.length === 0) return;
  if (lastTurn().role === "assistant") removeTurn(lastTurn());
  reply();
}

function clear() {
  stop();
  turns.filter((turn) => turn.role === "user").forEach((turn) => turn.clips.forEach((c) => URL.revokeObjectURL(c.url)));
  while (turns.length > 0) removeTurn(lastTurn());
  hideError();
}

// ---- errors --------------------------------------------------------------------------------------------------
// A failed request: the error is shown and the user's message put back into the box, to be changed (a clip the
// server could not use can be removed there) and sent again. The server's `param` names the clip at fault.
function fail(error, names) {
  let message = error instanceof APIError ? error.message : `Something went wrong: ${error.message}`;
  const place = Object.keys(names).find((p) => error.param === p || (error.param || "").startsWith(`${p}.`));
  if (place) message = `The server could not use “${names[place]}”: ${message}`;
  showError(message);
  const last = lastTurn();
  if (!last || last.role !== "user") return;
  removeTurn(last);
  input.value = [last.text, input.value].filter(Boolean).join("\n");
  setPending([...last.clips, ...pending]);
}

function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
}

// ---- wiring ------------------------------------------------------------------------------------------------
$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { // Shift+Enter: a new line
    event.preventDefault();
    send();
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") stop();
});
input.addEventListener("input", refresh);
$("stop").addEventListener("click", stop);
$("regenerate").addEventListener("click", regenerate);
$("clear").addEventListener("click", clear);
$("record").addEventListener("click", toggleRecording);
$("add-file").addEventListener("click", () => $("file").click());
$("file").addEventListener("change", (event) => {
  addFiles(event.target.files);
  event.target.value = ""; // the same file may be added again
});
$("dismiss").addEventListener("click", hideError);
$("settings").addEventListener("input", saveSettings);
$("api-key").addEventListener("change", connect);

// Files dropped anywhere on the page join the message being written (dragged text still drops into the box).
const carriesFiles = (event) => event.dataTransfer.types.includes("Files");
document.addEventListener("dragover", (event) => {
  if (!carriesFiles(event)) return;
  event.preventDefault();
  document.body.classList.add("dropping");
});
document.addEventListener("dragleave", (event) => {
  if (event.relatedTarget === null) document.body.classList.remove("dropping");
});
document.addEventListener("drop", (event) => {
  if (!carriesFiles(event)) return;
  event.preventDefault();
  document.body.classList.remove("dropping");
  addFiles(event.dataTransfer.files);
});

loadSettings();
refresh();
connect();
