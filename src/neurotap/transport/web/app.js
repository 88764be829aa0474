// The neurotap inspector: a client of the server's public endpoints, like nt.connect.
// It holds no model logic: every value is computed by the server's probes (nt.Record with an index, nt.Norm),
// reduced there, and only drawn here. Every string from the server reaches the page through textContent.
'use strict';

const PROTOCOL = '1';
const MAX_UNITS = 256; // units of one heat map: what a page asks for, never a whole [seq, vocab] tensor
const MAX_POSITIONS = 256;

const state = {
  token: sessionStorage.getItem('neurotap-token'), // in this tab only; gone when it closes
  session: null,
  points: [],
  tokens: null, // {ids, tokens, pieces}
  point: null,
  selectors: {}, // dim -> index, for the dims before the last two
  unitStart: 0,
  view: 'point',
  drawing: 0, // the latest draw: an answer to an older one is dropped
  dataset: null, // {points, shapes, rows} of the server's --dataset
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  return node;
}

function setStatus(text) {
  $('status').textContent = text;
}

function showError(text) {
  $('error').textContent = text || '';
}

// -- HTTP ------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, kind, message) {
    super(message);
    this.status = status;
    this.kind = kind;
  }
}

async function request(path, { method = 'GET', body, session = false, type } = {}) {
  const headers = { 'X-Neurotap-Protocol': PROTOCOL };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  if (session) headers['X-Neurotap-Session'] = state.session;
  if (type) headers['Content-Type'] = type;
  const response = await fetch(path, { method, headers, body, credentials: 'omit', cache: 'no-store' });
  if (!response.ok) {
    let kind = 'HTTPError';
    let message = `${response.status} ${response.statusText}`;
    try {
      const error = await response.json();
      kind = error.error || kind;
      message = error.message || message;
    } catch (_) {
      // not JSON: the status line says enough
    }
    throw new ApiError(response.status, kind, message);
  }
  return response;
}

async function json(path, options) {
  return (await request(path, options)).json();
}

async function withSession(fn) {
  if (!state.session) state.session = (await json('/v1/sessions', { method: 'POST' })).session;
  try {
    return await fn();
  } catch (error) {
    if (!(error instanceof ApiError) || error.kind !== 'SessionError') throw error;
    state.session = (await json('/v1/sessions', { method: 'POST' })).session; // it expired: one more try
    return fn();
  }
}

// -- wire format (see transport/wire.py): a message is a safetensors file -------------------------------

const DTYPES = {
  F64: [8, (v, o) => v.getFloat64(o, true)],
  F32: [4, (v, o) => v.getFloat32(o, true)],
  F16: [2, (v, o) => half(v.getUint16(o, true))],
  BF16: [2, (v, o) => bfloat(v.getUint16(o, true))],
  I64: [8, (v, o) => Number(v.getBigInt64(o, true))],
  I32: [4, (v, o) => v.getInt32(o, true)],
  I16: [2, (v, o) => v.getInt16(o, true)],
  I8: [1, (v, o) => v.getInt8(o)],
  U8: [1, (v, o) => v.getUint8(o)],
  BOOL: [1, (v, o) => v.getUint8(o)],
};

function half(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024);
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
}

function bfloat(bits) {
  const view = new DataView(new ArrayBuffer(4));
  view.setUint32(0, bits << 16, true);
  return view.getFloat32(0, true);
}

class Tensor {
  constructor(dtype, shape, values) {
    this.dtype = dtype;
    this.shape = shape;
    this.values = values; // flat, row-major
  }

  // the sub-tensor at leading indices, e.g. t.at(0, 3)
  at(...indices) {
    let offset = 0;
    let stride = this.values.length;
    for (let d = 0; d < indices.length; d++) {
      stride /= this.shape[d];
      offset += indices[d] * stride;
    }
    return new Tensor(this.dtype, this.shape.slice(indices.length), this.values.slice(offset, offset + stride));
  }

  rows() {
    const [n, m] = this.shape.length === 1 ? [1, this.shape[0]] : this.shape;
    return Array.from({ length: n }, (_, i) => this.values.slice(i * m, (i + 1) * m));
  }
}

const METADATA = 'neurotap';
const encoder = new TextEncoder();
const decoder = new TextDecoder();

// document: JSON with {"$tensor": name} references; tensors: {name: {dtype, shape, bytes}}
function encodeMessage(document, tensors) {
  const header = { __metadata__: { [METADATA]: JSON.stringify(document) } };
  let offset = 0;
  for (const [name, tensor] of Object.entries(tensors)) {
    header[name] = { dtype: tensor.dtype, shape: tensor.shape, data_offsets: [offset, offset + tensor.bytes.length] };
    offset += tensor.bytes.length;
  }
  let text = JSON.stringify(header);
  text += ' '.repeat((8 - ((encoder.encode(text).length + 8) % 8)) % 8); // tensor data starts 8-aligned
  const head = encoder.encode(text);
  const out = new Uint8Array(8 + head.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(head.length), true);
  out.set(head, 8);
  let at = 8 + head.length;
  for (const tensor of Object.values(tensors)) {
    out.set(tensor.bytes, at);
    at += tensor.bytes.length;
  }
  return out;
}

function decodeMessage(buffer) {
  const view = new DataView(buffer);
  const size = Number(view.getBigUint64(0, true));
  const header = JSON.parse(decoder.decode(new Uint8Array(buffer, 8, size)));
  const start = 8 + size;
  const tensors = {};
  for (const [name, info] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const [width, read] = DTYPES[info.dtype] || [];
    if (!read) throw new Error(`the server sent a tensor of dtype ${info.dtype}, which the page cannot read`);
    const [begin, end] = info.data_offsets;
    const values = new Array((end - begin) / width);
    for (let i = 0; i < values.length; i++) values[i] = read(view, start + begin + i * width);
    tensors[name] = new Tensor(info.dtype, info.shape, values);
  }
  return untag(JSON.parse(header.__metadata__[METADATA]), tensors);
}

function untag(value, tensors) {
  if (value === null || typeof value !== 'object') return value;
  if (Array.isArray(value)) return value.map((v) => untag(v, tensors));
  const [tag] = Object.keys(value);
  const body = value[tag];
  switch (tag) {
    case '$tensor':
      return tensors[body];
    case '$tuple':
      return body.map((v) => untag(v, tensors));
    case '$dict':
    case '$output':
      return Object.fromEntries(Object.entries(body).map(([k, v]) => [k, untag(v, tensors)]));
    case '$float':
      return Number(body.replace('inf', 'Infinity'));
    default:
      return value; // patches, slices and the rest stay tagged: the page only reads tensors and numbers
  }
}

function* frames(buffer) {
  const view = new DataView(buffer);
  let at = 0;
  while (at + 8 <= buffer.byteLength) {
    const size = Number(view.getBigUint64(at, true));
    if (size === 0) return;
    yield decodeMessage(buffer.slice(at + 8, at + 8 + size));
    at += 8 + size;
  }
  throw new Error('the recordings stream ended before its end marker');
}

const slice = (start, stop) => ({ $slice: [start, stop, null] });
const tuple = (...items) => ({ $tuple: items });
const patch = (name, fields) => ({ $patch: name, fields });

function idsTensor(ids) {
  const bytes = new Uint8Array(8 * ids.length);
  const view = new DataView(bytes.buffer);
  ids.forEach((id, i) => view.setBigInt64(8 * i, BigInt(id), true));
  return { dtype: 'I64', shape: [1, ids.length], bytes };
}

// one forward of the prompt with these probes ({point, fn}); returns {point: {key: value}} of what they recorded
let queue = Promise.resolve();
function probe(probes) {
  const job = queue.then(() =>
    withSession(async () => {
      await request('/v1/recordings', { method: 'DELETE', session: true });
      const document = {
        op: 'forward',
        args: [{ $tensor: 't0' }],
        kwargs: { $dict: {} },
        probes: probes.map((p) => ({ point: p.point, grad: false, fn: p.fn })),
        outputs: [], // the logits stay on the server
        loss: null,
      };
      const body = encodeMessage(document, { t0: idsTensor(state.tokens.ids) });
      await request('/v1/run', { method: 'POST', body, session: true, type: 'application/vnd.neurotap+safetensors' });
      const wanted = [...new Set(probes.map((p) => p.point))];
      const query = wanted.map((p) => `point=${encodeURIComponent(p)}`).join('&');
      const buffer = await (await request(`/v1/recordings?${query}`, { session: true })).arrayBuffer();
      const out = {};
      for (const item of frames(buffer)) out[item.point] = item.data;
      return out;
    }),
  );
  queue = job.catch(() => {});
  return job;
}

// -- heat maps -------------------------------------------------------------------------------------

function color(value, scale, signed) {
  if (!Number.isFinite(value)) return '#888';
  const t = Math.max(-1, Math.min(1, scale ? value / scale : 0));
  if (!signed) {
    const k = Math.round(255 - 175 * Math.max(t, 0)); // light enough at 1 for a label on top to stay readable
    return `rgb(${k},${Math.round(140 + 0.45 * k)},255)`;
  }
  const k = Math.round(255 * (1 - Math.abs(t)));
  return t >= 0 ? `rgb(255,${k},${k})` : `rgb(${k},${k},255)`;
}

function shortLabel(text) {
  const shown = JSON.stringify(text).slice(1, -1);
  return shown.length > 14 ? `${shown.slice(0, 13)}…` : shown;
}

// draw rows x cols values; rowLabels/colLabels: strings; extra: {label, values} drawn as one more column
function heatmap(target, rows, { rowLabels, colLabels, colStart = 0, signed = true, extra, attrs = {} }) {
  target.replaceChildren();
  for (const [key, value] of Object.entries(attrs)) target.dataset[key] = value;
  const n = rows.length;
  const m = n ? rows[0].length : 0;
  const height = 18;
  const left = 110;
  const top = 44;
  const extraWidth = extra ? 40 : 0;
  const room = Math.max(320, (target.clientWidth || 900) - left - extraWidth - 16);
  const cell = Math.max(2, Math.min(26, Math.floor(room / Math.max(m, 1))));
  const width = left + m * cell + extraWidth + 10;
  const image = svg('svg', { width, height: top + n * height + 4, class: 'map' });
  let scale = 0;
  for (const row of rows) for (const v of row) if (Number.isFinite(v)) scale = Math.max(scale, Math.abs(v));
  const every = Math.max(1, Math.ceil(14 / cell)); // labels are turned 45°: 14 px apart is enough
  for (let j = 0; j < m; j++) {
    if (j % every) continue;
    const label = svg('text', { x: left + j * cell + cell / 2, y: top - 6, class: 'col-label' });
    label.setAttribute('transform', `rotate(-45 ${left + j * cell + cell / 2} ${top - 6})`);
    label.textContent = colLabels ? colLabels[j] : String(colStart + j);
    image.append(label);
  }
  rows.forEach((row, i) => {
    const label = svg('text', { x: left - 6, y: top + i * height + 13, class: 'row-label' });
    label.textContent = rowLabels[i] ?? String(i);
    image.append(label);
    row.forEach((value, j) => {
      const rect = svg('rect', {
        x: left + j * cell,
        y: top + i * height,
        width: cell,
        height,
        fill: color(value, scale, signed),
        class: 'cell',
      });
      rect.dataset.row = String(i);
      rect.dataset.col = String(colStart + j);
      rect.dataset.value = String(value);
      image.append(rect);
    });
  });
  if (extra) {
    let top2 = 0;
    for (const v of extra.values) if (Number.isFinite(v)) top2 = Math.max(top2, Math.abs(v));
    const x = left + m * cell + 10;
    const title = svg('text', { x: x + 14, y: top - 6, class: 'col-label extra' });
    title.textContent = extra.label;
    image.append(title);
    extra.values.forEach((value, i) => {
      const rect = svg('rect', { x, y: top + i * height, width: 28, height, fill: color(value, top2, false) });
      rect.setAttribute('class', 'extra-cell');
      rect.dataset.row = String(i);
      rect.dataset.value = String(value);
      image.append(rect);
    });
  }
  image.addEventListener('mouseover', (event) => {
    const data = event.target.dataset || {};
    if (data.value === undefined) return;
    const row = rowLabels[Number(data.row)] ?? data.row;
    const where = data.col === undefined ? extra.label : colLabels ? colLabels[data.col] : `unit ${data.col}`;
    $('hover').textContent = `${JSON.stringify(row)} · ${where}: ${Number(data.value).toPrecision(6)}`;
  });
  target.append(image);
  target.dataset.state = 'ready';
}

// -- the points tree -------------------------------------------------------------------------------

function pointRow(point, label) {
  const row = el('div', { class: 'point', role: 'button', tabindex: '0' });
  row.dataset.name = point.name;
  row.append(
    el('span', { class: 'name', title: point.name }, label),
    el('span', { class: 'kind' }, point.kind),
    el('span', { class: 'shape' }, point.shape ? `[${point.shape.join(', ')}]` : point.type),
    el('span', { class: 'dtype' }, point.dtype || ''),
    el('span', { class: 'source', title: point.source }, point.source),
  );
  const open = () => selectPoint(point);
  row.addEventListener('click', open);
  row.addEventListener('keydown', (event) => event.key === 'Enter' && open());
  return row;
}

function buildTree(points) {
  const root = { groups: new Map(), points: [], count: 0 };
  for (const point of points) {
    const parts = point.name.split('.');
    let node = root;
    node.count++;
    for (const part of parts.slice(0, -1)) {
      if (!node.groups.has(part)) node.groups.set(part, { groups: new Map(), points: [], count: 0 });
      node = node.groups.get(part);
      node.count++;
    }
    node.points.push([parts[parts.length - 1], point]);
  }
  return root;
}

function renderGroup(container, node, depth) {
  for (const [label, point] of node.points) container.append(pointRow(point, label));
  for (const [name, child] of node.groups) {
    const details = el('details');
    const summary = el('summary', {}, name);
    summary.append(el('span', { class: 'count' }, ` ${child.count}`));
    details.append(summary);
    const body = el('div', { class: 'group' });
    details.append(body);
    let drawn = false;
    details.addEventListener('toggle', () => {
      if (details.open && !drawn) {
        drawn = true;
        renderGroup(body, child, depth + 1);
      }
    });
    container.append(details);
    if (depth < 1) details.open = true;
  }
}

function renderTree() {
  const tree = $('tree');
  tree.replaceChildren();
  const query = $('search').value.trim().toLowerCase();
  if (!query) {
    renderGroup(tree, buildTree(state.points), 0);
    return;
  }
  const found = state.points.filter((p) => p.name.toLowerCase().includes(query));
  for (const point of found.slice(0, 300)) tree.append(pointRow(point, point.name));
  if (found.length > 300) tree.append(el('p', { class: 'note' }, `${found.length - 300} more: narrow the search`));
  if (!found.length) tree.append(el('p', { class: 'note' }, 'no point matches'));
}

// -- views -----------------------------------------------------------------------------------------

const isFloat = (dtype) => typeof dtype === 'string' && /float/.test(dtype);

function selectPoint(point) {
  state.point = point;
  state.selectors = {};
  state.unitStart = 0;
  setView('point');
  for (const row of document.querySelectorAll('.point.selected')) row.classList.remove('selected');
  for (const row of document.querySelectorAll('.point')) {
    if (row.dataset.name === point.name) row.classList.add('selected');
  }
  drawPoint();
}

function pointControls(point) {
  const controls = $('point-controls');
  controls.replaceChildren();
  const shape = point.shape;
  for (let d = 0; d < shape.length - 2; d++) {
    if (shape[d] === 1) continue;
    const input = el('input', { type: 'number', min: '0', max: String(shape[d] - 1), value: String(state.selectors[d] || 0) });
    input.dataset.dim = String(d);
    input.addEventListener('change', () => {
      state.selectors[d] = Math.max(0, Math.min(shape[d] - 1, Number(input.value) || 0));
      drawPoint();
    });
    const label = el('label', {}, `dim ${d} `);
    label.append(input);
    controls.append(label);
  }
  const units = shape[shape.length - 1];
  if (shape.length >= 1 && units > MAX_UNITS) {
    const previous = el('button', { type: 'button', id: 'units-previous' }, '◀ units');
    const next = el('button', { type: 'button', id: 'units-next' }, 'units ▶');
    previous.disabled = state.unitStart === 0;
    previous.addEventListener('click', () => {
      state.unitStart = Math.max(0, state.unitStart - MAX_UNITS);
      drawPoint();
    });
    next.addEventListener('click', () => {
      state.unitStart += MAX_UNITS;
      drawPoint();
    });
    controls.append(previous, el('span', {}, ` units ${state.unitStart}–${state.unitStart + MAX_UNITS - 1} `), next);
  }
}

async function drawPoint() {
  const point = state.point;
  const map = $('point-map');
  if (!point || !state.tokens) return;
  const ticket = ++state.drawing;
  map.dataset.state = 'loading';
  $('point-title').textContent = point.name;
  $('point-facts').textContent = `${point.kind} · ${point.shape ? `[${point.shape.join(', ')}] at the example input` : point.type} · ${point.dtype || ''} · ${point.source}`;
  $('point-controls').replaceChildren();
  if (!point.shape || !isFloat(point.dtype)) {
    map.replaceChildren(el('p', { class: 'note' }, `this point holds a ${point.type}, not a float tensor: nothing to draw`));
    map.dataset.state = 'empty';
    return;
  }
  pointControls(point);
  const ndim = point.shape.length;
  const lead = [];
  for (let d = 0; d < ndim - 2; d++) lead.push(state.selectors[d] || 0);
  const start = state.unitStart;
  let index = null;
  if (ndim === 1) index = tuple(slice(start, start + MAX_UNITS));
  else if (ndim >= 2) index = tuple(...lead, slice(0, MAX_POSITIONS), slice(start, start + MAX_UNITS));
  const probes = [{ point: point.name, fn: patch('Record', { index, key: 'record' }) }];
  if (ndim >= 2) probes.push({ point: point.name, fn: patch('Norm', { dims: -1, p: 2 }) });
  setStatus('running…');
  try {
    const recorded = (await probe(probes))[point.name];
    if (ticket !== state.drawing) return;
    const value = recorded.record[0];
    const rows = ndim === 0 ? [[value.values[0]]] : value.rows();
    let extra;
    if (recorded.norm) {
      const norms = recorded.norm[0].at(...lead).values.slice(0, rows.length);
      extra = { label: '‖·‖', values: norms };
    }
    const labels = rows.length === state.tokens.ids.length ? state.tokens.pieces.map(shortLabel) : rows.map((_, i) => String(i));
    heatmap(map, rows, {
      rowLabels: labels,
      colStart: start,
      signed: true,
      extra,
      attrs: { point: point.name, lead: JSON.stringify(lead), unitStart: String(start) },
    });
    setStatus(`${rows.length} × ${rows[0].length} values of ${point.name}`);
    showError('');
  } catch (error) {
    fail(error, map);
  }
}

function attentionPoints() {
  return state.points.filter((p) => /attention_interface\.softmax$/.test(p.name) && p.shape && p.shape.length === 4);
}

function attentionControls() {
  const layers = $('layer');
  if (layers.options.length) return;
  for (const point of attentionPoints()) {
    const match = point.name.match(/layers\.(\d+)\./);
    layers.append(el('option', { value: point.name }, match ? match[1] : point.name));
  }
  heads();
}

function heads() {
  const point = state.points.find((p) => p.name === $('layer').value);
  const select = $('head');
  const keep = select.value;
  select.replaceChildren();
  if (!point) return;
  for (let h = 0; h < point.shape[1]; h++) select.append(el('option', { value: String(h) }, String(h)));
  if (keep && Number(keep) < point.shape[1]) select.value = keep;
}

async function drawAttention() {
  const map = $('attention-map');
  attentionControls();
  const name = $('layer').value;
  if (!name) {
    $('attention-facts').textContent =
      'no attention-probabilities point (…attention_interface.softmax): the model runs another attention implementation; load it with attn_implementation="eager"';
    return;
  }
  if (!state.tokens) return;
  const head = Number($('head').value || 0);
  const ticket = ++state.drawing;
  map.dataset.state = 'loading';
  $('attention-facts').textContent = `${name}, head ${head}: rows attend to columns`;
  setStatus('running…');
  try {
    const index = tuple(0, head, slice(0, MAX_POSITIONS), slice(0, MAX_POSITIONS));
    const recorded = (await probe([{ point: name, fn: patch('Record', { index, key: 'record' }) }]))[name];
    if (ticket !== state.drawing) return;
    const rows = recorded.record[0].rows();
    const labels = state.tokens.pieces.map(shortLabel);
    heatmap(map, rows, { rowLabels: labels, colLabels: labels, signed: false, attrs: { point: name, head: String(head) } });
    setStatus(`attention of layer ${$('layer').selectedOptions[0].textContent}, head ${head}`);
    showError('');
  } catch (error) {
    fail(error, map);
  }
}

// rows: [{layer, ids: [[id] per position], probs, pieces}]; the server computed all of it
function lensGrid(target, rows, labels) {
  target.replaceChildren();
  const width = 64;
  const height = 18;
  const left = 70;
  const top = 44;
  const positions = labels.length;
  const image = svg('svg', { width: left + positions * width + 8, height: top + rows.length * height + 4, class: 'map' });
  labels.forEach((label, j) => {
    const text = svg('text', { x: left + j * width + 4, y: top - 6, class: 'col-label' });
    text.setAttribute('transform', `rotate(-30 ${left + j * width + 4} ${top - 6})`);
    text.textContent = label;
    image.append(text);
  });
  [...rows].reverse().forEach((row, i) => { // the last layer on top, where the prediction ends up
    const name = svg('text', { x: left - 6, y: top + i * height + 13, class: 'row-label' });
    name.textContent = `layer ${row.layer}`;
    image.append(name);
    row.ids.forEach((ids, j) => {
      const prob = row.probs[j][0];
      const rect = svg('rect', { x: left + j * width, y: top + i * height, width, height, fill: color(prob, 1, false) });
      rect.setAttribute('class', 'lens-cell');
      Object.assign(rect.dataset, { layer: String(row.layer), pos: String(j), id: String(ids[0]), prob: String(prob) });
      rect.dataset.piece = row.pieces[j][0];
      const text = svg('text', { x: left + j * width + 3, y: top + i * height + 13, class: 'lens-text' });
      text.textContent = shortLabel(row.pieces[j][0]).slice(0, 9);
      image.append(rect, text);
    });
  });
  image.addEventListener('mouseover', (event) => {
    const data = event.target.dataset || {};
    if (data.prob === undefined) return;
    $('hover').textContent = `layer ${data.layer}, after ${JSON.stringify(labels[Number(data.pos)])}: ${JSON.stringify(data.piece)} p=${Number(data.prob).toFixed(4)}`;
  });
  target.append(image);
}

async function drawLens() {
  const map = $('lens-map');
  if (!state.tokens) return;
  const ticket = ++state.drawing;
  map.dataset.state = 'loading';
  setStatus('running…');
  try {
    const body = JSON.stringify({ text: state.text, top: 1 });
    const lens = await json('/v1/logit_lens', { method: 'POST', body, type: 'application/json' });
    if (ticket !== state.drawing) return;
    lensGrid(map, lens.layers, lens.pieces.map(shortLabel));
    map.dataset.state = 'ready';
    setStatus(`logit lens over ${lens.layers.length} layers`);
    showError('');
  } catch (error) {
    fail(error, map);
  }
}

// -- top-activating examples (a server started with --dataset) ---------------------------------------

async function loadDataset() {
  let dataset;
  try {
    dataset = await json('/v1/dataset');
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) return; // no dataset: no tab
    throw error;
  }
  state.dataset = dataset;
  const select = $('examples-point');
  select.replaceChildren(...dataset.points.map((point) => el('option', { value: point }, point)));
  document.querySelector('#tabs button[data-view="examples"]').hidden = false;
}

async function drawExamples() {
  const list = $('examples-list');
  const ticket = ++state.drawing;
  const point = $('examples-point').value;
  const unit = Number($('examples-unit').value);
  list.dataset.state = 'loading';
  setStatus('searching the dataset…');
  try {
    const body = JSON.stringify({ point, unit, k: Number($('examples-k').value) });
    const found = await json('/v1/top_examples', { method: 'POST', body, type: 'application/json' });
    if (ticket !== state.drawing) return;
    const top = Math.max(...found.examples.map((example) => Math.abs(example.value)), 1e-12);
    list.replaceChildren();
    found.examples.forEach((example, i) => {
      const line = el('div', { class: 'example' });
      line.dataset.row = String(example.row);
      line.dataset.value = String(example.value);
      line.append(el('span', { class: 'example-value' }, example.value.toPrecision(4)));
      const text = el('span', { class: 'example-text' });
      example.pieces.forEach((piece, j) => {
        const token = el('span', { class: j === example.at ? 'example-token peak' : 'example-token' }, piece);
        const value = example.values[j];
        token.dataset.value = String(value);
        token.dataset.position = String(j);
        token.style.backgroundColor = `rgba(214, 96, 30, ${Math.max(0, Math.min(1, value / top)).toFixed(3)})`;
        token.title = `row ${example.row - example.at + j}: ${value.toPrecision(5)}`;
        text.append(token);
      });
      line.append(text);
      list.append(line);
    });
    list.dataset.state = 'ready';
    list.dataset.point = point;
    list.dataset.unit = String(unit);
    setStatus(`${found.examples.length} examples of ${point} unit ${unit}`);
    showError('');
  } catch (error) {
    fail(error, list);
  }
}

// -- activation patching: nt.experiments.activation_patching on the server -------------------------------

async function drawPatching() {
  const map = $('patching-map');
  if (!state.tokens) return;
  const ticket = ++state.drawing;
  map.dataset.state = 'loading';
  setStatus('patching… (one forward per 64 cells)');
  try {
    const body = JSON.stringify({ clean: state.text, corrupt: $('corrupt').value, target: $('target').value });
    const result = await json('/v1/patching', { method: 'POST', body, type: 'application/json' });
    if (ticket !== state.drawing) return;
    const labels = result.tokens.map(shortLabel);
    heatmap(map, result.values, {
      rowLabels: result.points.map((point) => point.replace(/\.resid_post$/, '')), // blocks.N: the row is layer N's output
      colLabels: labels,
      signed: false,
      attrs: { target: String(result.target) },
    });
    $('patching-facts').textContent =
      `${result.metric} at the last position: clean ${result.clean.toPrecision(4)}, corrupted ${result.corrupt.toPrecision(4)}; ` +
      'each cell: the corrupted run with that layer\'s residual at that position restored from the clean one';
    setStatus(`patched ${result.points.length} × ${result.positions.length} cells`);
    showError('');
  } catch (error) {
    fail(error, map);
  }
}

function setView(view) {
  state.view = view;
  for (const button of document.querySelectorAll('#tabs button')) button.classList.toggle('active', button.dataset.view === view);
  $('point-view').hidden = view !== 'point';
  $('attention-view').hidden = view !== 'attention';
  $('lens-view').hidden = view !== 'lens';
  $('examples-view').hidden = view !== 'examples';
  $('patching-view').hidden = view !== 'patching';
  $('tree-pane').hidden = view === 'examples';
  $('hover').textContent = '';
}

function redraw() {
  if (state.view === 'attention') drawAttention();
  else if (state.view === 'lens') drawLens();
  else if (state.view === 'examples') drawExamples();
  else if (state.view === 'patching') drawPatching();
  else drawPoint();
}

function fail(error, map) {
  if (map) map.dataset.state = 'error';
  setStatus('');
  if (error instanceof ApiError && error.status === 401) {
    showLogin('the server refused the token');
    return;
  }
  showError(error.message);
}

// -- start -----------------------------------------------------------------------------------------

function renderTokens() {
  const box = $('tokens');
  box.replaceChildren();
  state.tokens.pieces.forEach((piece, i) => {
    const token = el('span', { class: 'token', title: `${i}: id ${state.tokens.ids[i]} ${state.tokens.tokens[i]}` }, piece);
    token.dataset.id = String(state.tokens.ids[i]);
    box.append(token);
  });
}

async function tokenize() {
  const text = $('prompt').value;
  const body = JSON.stringify({ text });
  state.tokens = await json('/v1/tokenize', { method: 'POST', body, type: 'application/json' });
  state.text = text;
  renderTokens();
}

function showLogin(message) {
  state.token = null;
  sessionStorage.removeItem('neurotap-token');
  $('main').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = message || '';
  $('token').focus();
}

async function start() {
  $('login').hidden = true;
  setStatus('loading points…');
  try {
    const [info, points] = await Promise.all([json('/v1/info'), json('/v1/points')]);
    $('model').textContent = `${info.model} · ${info.module} · ${(info.parameters / 1e6).toFixed(1)}M parameters`;
    state.points = points;
    $('main').hidden = false;
    renderTree();
    await loadDataset();
    await tokenize();
    setStatus(`${points.length} points`);
  } catch (error) {
    fail(error);
  }
}

async function boot() {
  $('login-form').addEventListener('submit', (event) => {
    event.preventDefault();
    state.token = $('token').value.trim();
    $('token').value = '';
    sessionStorage.setItem('neurotap-token', state.token);
    start();
  });
  $('prompt-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    try {
      await tokenize();
      redraw();
    } catch (error) {
      fail(error);
    }
  });
  $('search').addEventListener('input', renderTree);
  for (const button of document.querySelectorAll('#tabs button')) {
    button.addEventListener('click', () => {
      setView(button.dataset.view);
      redraw();
    });
  }
  $('layer').addEventListener('change', () => {
    heads();
    drawAttention();
  });
  $('head').addEventListener('change', drawAttention);
  $('patching-form').addEventListener('submit', (event) => {
    event.preventDefault();
    drawPatching();
  });
  $('examples-form').addEventListener('submit', (event) => {
    event.preventDefault();
    drawExamples();
  });
  const health = await (await fetch('/health', { cache: 'no-store' })).json();
  if (health.auth && !state.token) showLogin();
  else start();
}

boot();
