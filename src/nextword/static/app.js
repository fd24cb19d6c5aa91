// The nextword page: suggestions on every keystroke, Tab or click to accept, Enter to send,
// and a live panel fed by the events this page posts to the server's log.
"use strict";

const MAX_HISTORY = 200; // the server's cap on earlier messages per request
const K = 3;

const $ = (id) => document.getElementById(id);
const ui = {
  history: $("history"), empty: $("empty"), form: $("composer"), speaker: $("speaker"),
  alternate: $("alternate"), strategy: $("strategy"), complete: $("complete"), chips: $("chips"),
  text: $("text"), error: $("error"), acceptance: $("acceptance"), counts: $("counts"),
  latency: $("latency"), server: $("server"), last: $("last"),
};

const conversation = []; // earlier messages: {speaker, text}
let latest = 0;          // id of the newest suggest request; older answers are dropped
let shown = [];          // the words on the chips now
let previousText = "";  // the text before the cursor at the last input
let asked = null;        // the value and cursor the strip was last asked for
let word = freshWord(0); // the word being typed: where it starts, whether suggestions were shown for it
let pending = [];        // events not yet posted
let flushTimer = null;

function freshWord(start) {
  return { start, offered: false, seen: new Set() };
}

// The same rule as the server's split_typed: the word being typed is the run of letters, digits and
// apostrophes at the end of the text (leading apostrophes excluded). Counted in code points, as Python does.
function partialStart(chars) {
  let start = chars.length;
  while (start > 0 && /[\p{L}\p{N}']/u.test(chars[start - 1])) start--;
  while (start < chars.length && chars[start] === "'") start++;
  return start;
}

// The message split at the cursor: before it (what is being typed) and after it (the right context).
function atCursor() {
  const value = ui.text.value;
  const end = ui.text.selectionEnd ?? value.length;
  return { before: value.slice(0, ui.text.selectionStart ?? value.length), right: value.slice(end) };
}

// Letters right after the cursor inside a word belong to the word being typed (the server's rule too).
function wordRest(right) {
  const match = /^[\p{L}\p{N}']*/u.exec(right);
  return match[0].length;
}

function partialOf(text) {
  const chars = Array.from(text);
  return chars.slice(partialStart(chars)).join("").toLowerCase();
}

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

function typing() {
  return { history: conversation.slice(-MAX_HISTORY), speaker: ui.speaker.value, text: atCursor().before };
}

function showError(message) {
  ui.error.textContent = message || "";
}

// ---------------------------------------------------------------- suggestions

// New suggestions for the text as it is now; measured when a keystroke (or click) asked for them.
async function refresh(measured = true) {
  const id = ++latest;
  const started = performance.now();
  asked = `${ui.text.selectionStart}:${ui.text.selectionEnd}:${ui.text.value}`;
  try {
    // With the cursor inside the message, the text after it makes the suggestions fit both sides.
    const data = await api("/api/suggest", { ...typing(), right: atCursor().right, k: K, typing: true });
    if (id !== latest) return;
    render(data.suggestions);
    const latency = performance.now() - started;
    ui.last.textContent = `${latency.toFixed(1)} ms (server ${data.latency_ms.toFixed(2)} ms, ${data.steps} LSTM steps)`;
    if (measured) record({ type: "keystroke", latency_ms: latency, server_ms: data.latency_ms });
    showError("");
  } catch (err) {
    if (id === latest) showError(err.message);
  }
}

function render(suggestions) {
  shown = suggestions.map((s) => s.word);
  if (shown.length) word.offered = true;
  shown.forEach((w) => word.seen.add(w));
  ui.chips.replaceChildren(...suggestions.map((s, i) => {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "chip";
    chip.dataset.testid = "suggestion";
    chip.dataset.word = s.word;
    chip.dataset.rank = String(i + 1);
    chip.title = i === 0 ? "Tab or click to accept" : "click to accept";
    const label = document.createElement("span");
    label.className = "word";
    label.textContent = s.word;
    const probability = document.createElement("span");
    probability.className = "probability";
    // The probability of the word given the letters typed; below half a percent a number says nothing.
    probability.textContent = s.probability >= 0.005 ? `${Math.round(100 * s.probability)}%` : "";
    chip.append(label, probability);
    if (i === 0) {
      const key = document.createElement("kbd");
      key.textContent = "Tab";
      chip.append(key);
    }
    return chip;
  }));
}

function accept(rank, via) {
  const chosen = shown[rank - 1];
  if (!chosen) return;
  const { before, right } = atCursor();
  const chars = Array.from(before);
  const start = partialStart(chars);
  // The suggestion replaces the word at the cursor, the letters after the cursor included.
  const after = start < chars.length ? right.slice(wordRest(right)) : right;
  const text = chars.slice(0, start).join("") + chosen + (/^\s/.test(after) ? after.slice(0, 1) : " ");
  ui.text.value = text + after.replace(/^\s/, "");
  ui.text.focus();
  ui.text.setSelectionRange(text.length, text.length);
  record({ type: "accepted", word: chosen, rank, via, typed: chars.length - start }, true);
  previousText = text;
  word = freshWord(Array.from(text).length);
  refresh();
}

// A word finished by typing (not by accepting) while suggestions were shown for it counts as ignored.
function finishWord(typed) {
  if (typed && word.offered) {
    record({ type: "ignored", word: typed.slice(0, 100), suggested: word.seen.has(typed) }, true);
  }
}

function onInput() {
  const text = atCursor().before;
  const chars = Array.from(text);
  const start = partialStart(chars);
  if (start !== word.start) {
    if (text.startsWith(previousText)) finishWord(partialOf(previousText));
    word = freshWord(start);
  }
  previousText = text;
  refresh();
}

function send(event) {
  event.preventDefault();
  const text = ui.text.value.trim();
  if (!text) return;
  finishWord(partialOf(ui.text.value));
  conversation.push({ speaker: ui.speaker.value, text });
  const item = document.createElement("li");
  item.className = `message ${ui.speaker.value}`;
  item.dataset.testid = "message";
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = ui.speaker.value;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  item.append(who, body);
  ui.history.append(item);
  ui.empty.hidden = true;
  item.scrollIntoView({ block: "nearest" });
  if (ui.alternate.checked) ui.speaker.value = ui.speaker.value === "user" ? "agent" : "user";
  ui.text.value = "";
  previousText = "";
  word = freshWord(0);
  refresh();
}

async function completeLine() {
  try {
    const { right } = atCursor();
    const data = await api("/api/complete", { ...typing(), strategy: ui.strategy.value, max_words: 20 });
    ui.text.value = data.line + right;
    previousText = data.line;
    word = freshWord(partialStart(Array.from(data.line)));
    ui.text.focus();
    ui.text.setSelectionRange(data.line.length, data.line.length);
    refresh();
  } catch (err) {
    showError(err.message);
  }
}

// ---------------------------------------------------------------- events and the live panel

function record(event, now = false) {
  pending.push(event);
  clearTimeout(flushTimer);
  flushTimer = setTimeout(flush, now ? 0 : 400);
}

async function flush() {
  if (!pending.length) return;
  const events = pending;
  pending = [];
  try {
    showStats(await api("/api/events", { events }));
  } catch (err) {
    showError(`could not log events: ${err.message}`);
  }
}

function ms(value) {
  return value === null ? "–" : `${value.toFixed(1)} ms`;
}

function showStats(stats) {
  ui.acceptance.textContent = stats.acceptance_rate === null ? "–" : `${(100 * stats.acceptance_rate).toFixed(1)}%`;
  ui.counts.textContent = `${stats.accepted} / ${stats.ignored}`;
  ui.latency.textContent = `${ms(stats.latency_ms.p50)} / ${ms(stats.latency_ms.p99)}`;
  ui.server.textContent = `${ms(stats.server_ms.p50)} / ${ms(stats.server_ms.p99)}`;
}

// ---------------------------------------------------------------- wiring

ui.text.addEventListener("input", onInput);
// The cursor moved without typing (arrows, a click): the strip is asked again for the new place.
document.addEventListener("selectionchange", () => {
  if (document.activeElement !== ui.text) return;
  if (asked !== `${ui.text.selectionStart}:${ui.text.selectionEnd}:${ui.text.value}`) {
    previousText = atCursor().before;
    word = freshWord(partialStart(Array.from(previousText)));
    refresh(false);
  }
});
ui.text.addEventListener("keydown", (event) => {
  if (event.key === "Tab" && !event.shiftKey && !event.altKey && !event.ctrlKey && shown.length) {
    event.preventDefault();
    accept(1, "tab");
  }
});
ui.chips.addEventListener("mousedown", (event) => event.preventDefault()); // keep focus in the text box
ui.chips.addEventListener("click", (event) => {
  const chip = event.target.closest("[data-rank]");
  if (chip) accept(Number(chip.dataset.rank), "click");
});
ui.form.addEventListener("submit", send);
ui.speaker.addEventListener("change", () => { ui.text.focus(); refresh(); });
ui.complete.addEventListener("click", completeLine);
window.addEventListener("pagehide", flush);

api("/api/stats").then(showStats).catch((err) => showError(err.message));
refresh(false);
