// The chat page of `qwenvl serve`: a multi-turn conversation streamed from
// /v1/chat/completions, with what only this server tells (the `qwenvl` extension: each image's
// resized geometry and tokens, each video's sampled frame times, grounding in original pixels)
// shown where it belongs. Plain DOM, no framework, no build step.

import { APIError, getJSON, streamChat } from './api.js';
import { formatBytes, frameThumbs, kindOf, readDataURL } from './media.js';
import { groundingLayer } from './overlay.js';

const $ = (id) => document.getElementById(id);
const SETTINGS = ['temperature', 'max-tokens', 'image-max-pixels', 'video-fps', 'video-max-pixels',
  'system', 'extra'];

const page = {
  config: null, // GET /web/config.json
  turns: [], // {role: 'user', text, items, failed} | {role: 'assistant', text, status, user, ...}
  pending: [], // items for the next user turn
  controller: null, // the running request's AbortController
};

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') node.className = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function notice(message) {
  $('notice').textContent = message || '';
  $('notice').hidden = !message;
}

function apiKey() {
  return $('api-key').value.trim();
}

// --- the model picker and the key ---------------------------------------------------------
async function loadModels() {
  const select = $('model');
  if (page.config.api_key_required && !apiKey()) {
    $('key-field').hidden = false;
    notice('This server needs an API key: enter it at the top.');
    return;
  }
  try {
    const models = await getJSON('/v1/models', apiKey());
    select.replaceChildren(...models.data.map((m) => h('option', { value: m.id }, m.id)));
    notice('');
  } catch (e) {
    if (e.status === 401) $('key-field').hidden = false;
    notice(`Cannot list the models: ${e.message}`);
  }
}

async function loadConfig() {
  try {
    page.config = await getJSON('/web/config.json');
  } catch (e) {
    notice(`Cannot read the page's settings: ${e.message}`);
    return;
  }
  const c = page.config;
  $('key-field').hidden = !c.api_key_required;
  $('limits').textContent = `This server takes media up to ${formatBytes(c.max_media_bytes)} `
    + `each, ${formatBytes(c.max_body_bytes)} per request, `
    + `${(c.max_image_pixels / 1e6).toFixed(1)} Mpx per picture.`;
  await loadModels();
}

// --- settings, kept in this browser -------------------------------------------------------
// The key is kept for this tab only (sessionStorage), the settings for the browser.
function restoreSettings() {
  for (const id of [...SETTINGS, 'api-key']) {
    const store = id === 'api-key' ? sessionStorage : localStorage;
    const saved = store.getItem(`qwenvl.${id}`);
    if (saved !== null) $(id).value = saved;
    $(id).addEventListener('change', () => store.setItem(`qwenvl.${id}`, $(id).value));
  }
}

function numberSetting(id) {
  const v = $(id).value.trim();
  return v === '' ? undefined : Number(v);
}

function extraFields() {
  const text = $('extra').value.trim();
  if (!text) return {};
  let value;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new Error(`Extra request fields are not JSON: ${e.message}`);
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new Error('Extra request fields must be a JSON object');
  }
  return value;
}

// --- attachments --------------------------------------------------------------------------
function addFiles(files) {
  for (const file of files) {
    const kind = kindOf(file);
    if (!kind) {
      notice(`${file.name} is neither a picture nor a video`);
      continue;
    }
    const item = { kind, file, name: file.name, url: URL.createObjectURL(file) };
    const limit = page.config?.max_media_bytes;
    if (limit && file.size > limit) {
      notice(`${file.name} is ${formatBytes(file.size)}: this server takes media up to `
        + `${formatBytes(limit)} (qwenvl serve --max-media-bytes)`);
      continue;
    }
    page.pending.push(item);
  }
  renderPending();
}

function renderPending() {
  $('pending').replaceChildren(...page.pending.map((item, i) => h('span', { class: 'chip' },
    preview(item),
    h('button', {
      type: 'button', class: 'remove', title: `Remove ${item.name}`, 'aria-label': `Remove ${item.name}`,
      onclick: () => { page.pending.splice(i, 1); renderPending(); },
    }, '×'))));
}

function preview(item) {
  if (item.kind === 'image') return h('img', { src: item.url, alt: item.name });
  return h('video', { src: item.url, muted: '', preload: 'metadata', title: item.name });
}

// --- the conversation on screen -----------------------------------------------------------
function renderUser(turn) {
  turn.el = h('section', { class: 'turn user' },
    h('div', { class: 'items' }, ...turn.items.map(renderItem)),
    turn.text ? h('div', { class: 'text' }, turn.text) : null);
  $('empty').hidden = true;
  $('chat').append(turn.el);
}

function renderItem(item) {
  item.meta = h('p', { class: 'meta' }, item.kind === 'image' ? 'picture' : 'video');
  item.err = h('p', { class: 'err', role: 'alert', hidden: '' });
  item.strip = item.kind === 'video' ? h('div', { class: 'strip' }) : null;
  item.el = h('figure', { class: `item ${item.kind}` }, preview(item),
    h('figcaption', {}, item.meta, item.strip, item.err));
  if (item.kind === 'video') item.el.querySelector('video').controls = true;
  return item.el;
}

function setItemError(item, message) {
  item.error = message;
  item.err.textContent = message || '';
  item.err.hidden = !message;
  item.el.classList.toggle('refused', Boolean(message));
}

function renderAssistant(turn) {
  turn.textEl = h('div', { class: 'text' });
  turn.statusEl = h('p', { class: 'status' }, 'waiting for the server…');
  turn.figureEl = h('div', { class: 'grounding' });
  const copy = h('button', { type: 'button', class: 'copy', onclick: () => copyText(turn, copy) },
    'Copy');
  const retry = h('button', { type: 'button', class: 'retry', onclick: () => retryTurn(turn) },
    'Retry');
  turn.tools = h('div', { class: 'tools' }, copy, retry);
  turn.el = h('section', { class: 'turn assistant', 'data-status': 'streaming' },
    turn.textEl, turn.figureEl, turn.statusEl, turn.tools);
  $('chat').append(turn.el);
  turn.el.scrollIntoView({ block: 'end' });
}

function setStatus(turn, status, message) {
  turn.status = status;
  turn.el.dataset.status = status;
  turn.statusEl.textContent = message || '';
  turn.statusEl.className = `status ${status}`;
  turn.statusEl.setAttribute('role', status === 'error' ? 'alert' : 'status');
}

async function copyText(turn, button) {
  try {
    await navigator.clipboard.writeText(turn.text);
  } catch {
    const area = h('textarea', {}, turn.text);
    document.body.append(area);
    area.select();
    document.execCommand('copy');
    area.remove();
  }
  button.textContent = 'Copied';
  setTimeout(() => { button.textContent = 'Copy'; }, 1200);
}

// --- what the server saw and found --------------------------------------------------------
function showGeometry(seen, media) {
  (seen.images || []).forEach((g, i) => {
    const item = media.images[i];
    if (!item) return;
    item.meta.textContent = `${g.original_width}×${g.original_height} → `
      + `${g.resized_width}×${g.resized_height} px · ${g.tokens} tokens`;
  });
  (seen.videos || []).forEach((v, i) => {
    const item = media.videos[i];
    if (!item) return;
    item.meta.textContent = `${v.original_width}×${v.original_height} → `
      + `${v.resized_width}×${v.resized_height} px · ${v.frames} frames · ${v.tokens} tokens`;
    if (v.timestamps && item.stripFor !== v.timestamps.join()) showStrip(item, v);
  });
}

const MAX_THUMBS = 48; // a long video's strip shows this many of its frames, evenly spread

async function showStrip(item, video) {
  item.stripFor = video.timestamps.join();
  const n = video.timestamps.length;
  const picked = n <= MAX_THUMBS ? [...Array(n).keys()]
    : [...Array(MAX_THUMBS).keys()].map((k) => Math.round((k * (n - 1)) / (MAX_THUMBS - 1)));
  const times = picked.map((k) => video.timestamps[k]);
  const cells = picked.map((k) => h('figure', {
    class: 'frame', 'data-t': video.timestamps[k], 'data-index': video.frame_indices?.[k] ?? '',
  }, h('figcaption', {}, `${video.timestamps[k].toFixed(2)} s`)));
  const note = n > MAX_THUMBS ? h('p', { class: 'hint' }, `${MAX_THUMBS} of the ${n} frames`) : null;
  item.strip.replaceChildren(...cells, ...(note ? [note] : []));
  try {
    const thumbs = await frameThumbs(item.url, times, video.source_fps);
    thumbs.forEach((canvas, k) => cells[k].prepend(canvas));
  } catch (e) {
    item.strip.append(h('p', { class: 'hint' }, `No previews: ${e.message}.`));
  }
}

function showGrounding(turn, objects, item) {
  if (!objects.length || !item?.geometry) return;
  const { original_width: w, original_height: hgt } = item.geometry;
  const img = h('img', { src: item.url, alt: `${item.name} with what the model found` });
  const layer = groundingLayer(objects, w, hgt);
  const toggle = h('input', { type: 'checkbox', checked: '' });
  toggle.addEventListener('change', () => layer.toggleAttribute('hidden', !toggle.checked));
  turn.figureEl.replaceChildren(
    h('figure', { class: 'found' }, h('div', { class: 'canvas' }, img, layer),
      h('figcaption', {}, h('label', {}, toggle,
        ` show ${objects.length} ${objects.length === 1 ? 'box' : 'boxes'} `
        + `(${w}×${hgt} px, original)`))));
}

// --- requests -----------------------------------------------------------------------------
function history(current) {
  const done = new Set(page.turns.filter((t) => t.role === 'assistant' && t.text
    && (t.status === 'done' || t.status === 'stopped')).map((t) => t.user));
  const out = [];
  for (const t of page.turns) {
    if (t.role === 'user' && (done.has(t) || t === current)) out.push(t);
    if (t.role === 'assistant' && done.has(t.user) && t.status !== 'streaming') out.push(t);
    if (t === current) break;
  }
  return out;
}

function itemPart(item, url) {
  const opts = {};
  if (item.kind === 'image') {
    if (numberSetting('image-max-pixels')) opts.max_pixels = numberSetting('image-max-pixels');
    return { type: 'image_url', image_url: { url, ...opts } };
  }
  if (numberSetting('video-fps')) opts.fps = numberSetting('video-fps');
  if (numberSetting('video-max-pixels')) opts.max_pixels = numberSetting('video-max-pixels');
  return { type: 'video_url', video_url: { url, ...opts } };
}

// The request body, and where each item went: the server names refused parts
// "messages[i].content[j]", and lists the images and videos it saw in prompt order.
async function buildRequest(current) {
  const messages = [];
  const media = { images: [], videos: [], at: new Map() };
  const system = $('system').value.trim();
  if (system) messages.push({ role: 'system', content: system });
  for (const t of history(current)) {
    if (t.role === 'assistant') {
      messages.push({ role: 'assistant', content: t.text });
      continue;
    }
    const content = [];
    for (const item of t.items) {
      item.dataURL ||= await readDataURL(item.file);
      media.at.set(`${messages.length},${content.length}`, item);
      (item.kind === 'image' ? media.images : media.videos).push(item);
      content.push(itemPart(item, item.dataURL));
    }
    if (t.text) content.push({ type: 'text', text: t.text });
    messages.push({ role: 'user', content });
  }
  const body = { model: $('model').value, messages, ...samplingFields() };
  if (media.images.length) {
    body.qwenvl = { grounding: true, grounding_image: media.images.length - 1 };
  }
  return { body, media };
}

function samplingFields() {
  const fields = {};
  if (numberSetting('temperature') !== undefined) fields.temperature = numberSetting('temperature');
  if (numberSetting('max-tokens') !== undefined) fields.max_tokens = numberSetting('max-tokens');
  return { ...fields, ...extraFields() };
}

function checkBodySize(body) {
  const size = JSON.stringify(body).length;
  const limit = page.config?.max_body_bytes;
  if (limit && size > limit) {
    throw new Error(`this request is ${formatBytes(size)}, over the server's limit of `
      + `${formatBytes(limit)} per request (qwenvl serve --max-body-bytes); start a new chat `
      + 'or send fewer or smaller files');
  }
}

function applyChunk(turn, chunk, media) {
  if (chunk.qwenvl?.images || chunk.qwenvl?.videos) {
    showGeometry(chunk.qwenvl, media);
    (chunk.qwenvl.images || []).forEach((g, i) => { if (media.images[i]) media.images[i].geometry = g; });
    setStatus(turn, 'streaming', 'answering…');
  }
  const choice = chunk.choices?.[0];
  if (choice?.delta?.content) {
    turn.text += choice.delta.content;
    turn.textEl.textContent = turn.text;
  }
  const found = chunk.qwenvl?.grounding?.[0]?.objects;
  if (found) showGrounding(turn, found, media.images[media.images.length - 1]);
  if (choice?.finish_reason) turn.finish = choice.finish_reason;
}

// "messages[1].content[0]: ..." in a refusal names the item it is about
function refusedItem(error, media) {
  const where = /messages\[(\d+)\]\.content\[(\d+)\]|messages\.(\d+)\.content\.(\d+)/
    .exec(`${error?.param || ''} ${error?.message || ''}`);
  if (!where) return null;
  return media.at.get(`${where[1] ?? where[3]},${where[2] ?? where[4]}`) || null;
}

function finish(turn, error, media) {
  if (!error) {
    const why = turn.finish === 'length' ? ' (cut at the token limit)' : '';
    setStatus(turn, 'done', turn.text ? `done${why}` : `the model gave an empty answer${why}`);
    return;
  }
  if (error.name === 'AbortError') {
    setStatus(turn, 'stopped', 'Stopped: the request was aborted.');
    return;
  }
  const item = media && refusedItem(error.error, media);
  if (item) setItemError(item, error.message);
  if (!(error instanceof APIError)) setStatus(turn, 'error', `Error: ${error.message}`);
  else if (error.status === 0) setStatus(turn, 'error', `Connection lost: ${error.message}.`);
  else if (error.status === 200) setStatus(turn, 'error', `The server failed: ${error.message}`);
  else setStatus(turn, 'error', `Refused (${error.message})`);
}

async function run(user) {
  const turn = { role: 'assistant', text: '', status: 'streaming', user };
  page.turns.push(turn);
  renderAssistant(turn);
  page.controller = new AbortController();
  setBusy(true);
  let media = null;
  try {
    const req = await buildRequest(user);
    media = req.media;
    checkBodySize(req.body);
    for await (const chunk of streamChat(req.body, apiKey(), page.controller.signal)) {
      applyChunk(turn, chunk, media);
    }
    finish(turn, null, media);
  } catch (e) {
    finish(turn, e, media);
  } finally {
    page.controller = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  $('send').hidden = busy;
  $('stop').hidden = !busy;
  $('find').disabled = busy;
  document.body.classList.toggle('busy', busy);
}

function send(text) {
  if (page.controller) return;
  if (!text.trim() && !page.pending.length) return;
  notice('');
  const user = { role: 'user', text: text.trim(), items: page.pending.splice(0) };
  renderPending();
  $('input').value = '';
  grow();
  page.turns.push(user);
  renderUser(user);
  run(user);
}

function find() {
  const phrase = $('input').value.trim();
  const hasImage = page.pending.some((i) => i.kind === 'image')
    || page.turns.some((t) => t.role === 'user' && t.items.some((i) => i.kind === 'image'));
  if (!phrase) return notice('Type what to find (e.g. "the red car"), then press Find.');
  if (!hasImage) return notice('Find needs a picture: attach one first.');
  send(page.config.find_prompt.replace('{phrase}', phrase));
}

function retryTurn(turn) {
  if (page.controller) return;
  const at = page.turns.indexOf(turn);
  for (const t of page.turns.splice(at)) t.el.remove();
  for (const item of turn.user.items) setItemError(item, '');
  run(turn.user);
}

function newChat() {
  if (page.controller) page.controller.abort();
  for (const t of page.turns) t.el.remove();
  page.turns = [];
  $('empty').hidden = false;
  notice('');
}

// --- input --------------------------------------------------------------------------------
function grow() {
  const input = $('input');
  input.style.height = 'auto';
  input.style.height = `${Math.min(input.scrollHeight, 200)}px`;
}

function wireInput() {
  const input = $('input');
  input.addEventListener('input', grow);
  input.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send(input.value);
    }
  });
  $('composer').addEventListener('submit', (e) => { e.preventDefault(); send(input.value); });
  $('stop').addEventListener('click', () => page.controller?.abort());
  $('find').addEventListener('click', find);
  $('new-chat').addEventListener('click', newChat);
  $('files').addEventListener('change', (e) => { addFiles(e.target.files); e.target.value = ''; });
  $('api-key').addEventListener('change', loadModels);
  document.addEventListener('paste', (e) => {
    const files = [...(e.clipboardData?.files || [])];
    if (files.length) { e.preventDefault(); addFiles(files); }
  });
  wireDrop();
}

function wireDrop() {
  let depth = 0;
  const show = (on) => { $('drop').hidden = !on; };
  document.addEventListener('dragenter', (e) => { e.preventDefault(); depth += 1; show(true); });
  document.addEventListener('dragleave', () => { depth = Math.max(0, depth - 1); show(depth > 0); });
  document.addEventListener('dragover', (e) => e.preventDefault());
  document.addEventListener('drop', (e) => {
    e.preventDefault();
    depth = 0;
    show(false);
    addFiles([...(e.dataTransfer?.files || [])]);
  });
}

restoreSettings();
wireInput();
loadConfig();
