// roomcast wire protocol, version 1: frames, their CBOR codec, the code table and the name
// rules (docs/PROTOCOL.md §3–§7). Pure functions over bytes: no sockets, no timers.
//
// CBOR goes through cbor-x. Frames are maps with small integer keys, so the frame decoder keeps
// maps as `Map` (integer keys survive) and the frame encoder writes `Map`s in ascending key
// order with every integer in its shortest form; `data` is a byte string holding one embedded
// CBOR item (§4), encoded and decoded by a second cbor-x instance with plain objects.
//
// What this decoder cannot see through cbor-x (the broker never sends such input): a float
// whose value is an integer is taken for that integer, and a CBOR tag in front of the frame map
// is not skipped (the reference decoder skips it).

import { Decoder, Encoder } from 'cbor-x';

/** Newest protocol version this client speaks. */
export const PROTOCOL_VERSION = 1;

/** Key table (§3.1): number → [protocol name, CBOR type]. */
export const KEYS = Object.freeze({
  0: ['type', 'uint'],
  1: ['id', 'uint'],
  2: ['room', 'text'],
  3: ['event', 'text'],
  4: ['data', 'bytes'],
  5: ['seq', 'uint'],
  6: ['ack', 'bool'],
  7: ['code', 'uint'],
  8: ['message', 'text'],
  9: ['reconnect', 'bool'],
  10: ['version', 'uint'],
  11: ['session', 'text'],
  12: ['time', 'uint'],
  13: ['max_frame', 'uint'],
  14: ['ping_interval', 'uint'],
  15: ['token', 'text'],
  16: ['idle_timeout', 'uint'],
  17: ['retry_after', 'uint'],
  18: ['epoch', 'uint'],
  19: ['recovered', 'bool'],
  20: ['key', 'text'],
  21: ['conflated', 'bool'],
});

const KEY = Object.fromEntries(Object.entries(KEYS).map(([k, [name]]) => [name, Number(k)]));

/** JS property of each protocol field that is not spelled the same. */
const PROPERTY = {
  max_frame: 'maxFrame',
  ping_interval: 'pingInterval',
  idle_timeout: 'idleTimeout',
  retry_after: 'retryAfter',
};
const prop = (field) => PROPERTY[field] ?? field;

/**
 * Frame types (§3.2): number → [name, sender, required fields, optional fields with the value
 * an absent one takes (`undefined`: stays absent)].
 */
export const FRAME_TYPES = Object.freeze({
  1: ['Hello', 'client', ['version'], { token: undefined }],
  2: ['Subscribe', 'client', ['id', 'room'], { seq: undefined, epoch: undefined }],
  3: ['Unsubscribe', 'client', ['id', 'room'], {}],
  4: ['Publish', 'client', ['room', 'event', 'data'], { id: 0, ack: false, key: undefined }],
  5: ['Ping', 'client', [], { id: undefined }],
  6: ['Refresh', 'client', ['id', 'token'], {}],
  16: ['Welcome', 'broker', ['version', 'session', 'time', 'max_frame', 'ping_interval', 'idle_timeout'], {}],
  17: ['Subscribed', 'broker', ['id', 'room', 'seq', 'epoch'], { recovered: undefined }],
  18: ['Unsubscribed', 'broker', ['id', 'room'], {}],
  19: ['Event', 'broker', ['room', 'event', 'data', 'seq'], { epoch: undefined }],
  20: ['Ack', 'broker', ['id'], { seq: undefined }],
  21: ['Error', 'broker', ['code'], { id: undefined, message: '', retry_after: undefined }],
  22: ['Pong', 'broker', [], { id: undefined }],
  23: ['Close', 'broker', ['code'], { message: '', reconnect: false, retry_after: undefined }],
  24: ['Conflation', 'broker', ['room', 'conflated'], {}],
});

/**
 * Optional fields that come together or not at all (§3.2): `Subscribe`'s `seq` and `epoch` are
 * the position `since` to recover from. Decoding one without the other is MissingField naming
 * the absent one, as in the reference decoder.
 */
const PAIRED = { Subscribe: [['seq', 'epoch']] };

const TYPE_NUMBER = Object.fromEntries(Object.entries(FRAME_TYPES).map(([k, [name]]) => [name, Number(k)]));

/**
 * Encoding rules of the reference encoder (§3.4) beyond "required keys always": optional keys
 * written even when they hold their default, and keys written only when `true`.
 */
const ALWAYS_WRITTEN = { Publish: ['id'], Error: ['message'], Close: ['message', 'reconnect'] };
const WRITTEN_WHEN_TRUE = { Publish: ['ack'] };

/** The code table (§7): number → [name, sent in, retry/reconnect]. */
export const CODES = Object.freeze({
  4101: ['invalid_room', 'Error', false],
  4102: ['invalid_event', 'Error', false],
  4103: ['invalid_payload', 'Error', false],
  4104: ['unknown_frame', 'Error', false],
  4105: ['not_subscribed', 'Error', false],
  4106: ['too_many_subscriptions', 'Error', false],
  4107: ['forbidden', 'Error', false],
  4108: ['rate_limited', 'Error', true],
  4109: ['payload_too_large', 'Error', false],
  4110: ['schema_mismatch', 'Error', false],
  4111: ['invalid_key', 'Error', false],
  4503: ['unavailable', 'Error', true],
  4000: ['normal', 'Close', false],
  4001: ['shutting_down', 'Close', true],
  4400: ['protocol_error', 'Close', false],
  4401: ['hello_required', 'Close', false],
  4403: ['unauthorized', 'Close', false],
  4408: ['timeout', 'Close', true],
  4413: ['frame_too_large', 'Close', false],
  4419: ['token_expired', 'Close', true],
  4420: ['policy_violation', 'Close', false],
  4426: ['unsupported_version', 'Close', false],
  4429: ['slow_consumer', 'Close', true],
  4500: ['internal', 'Close', true],
});

/** The name of `code` (`"invalid_room"`), or `undefined` for a code outside the table. */
export function codeName(code) {
  return CODES[code]?.[0];
}

/** Deepest payload nesting a broker accepts by default (§4). */
export const MAX_PAYLOAD_DEPTH = 32;

/** Longest idempotency key (`Publish.key`) a broker accepts, in bytes (§6.3); at least 1. */
export const MAX_IDEMPOTENCY_KEY_LEN = 64;

/**
 * Why a frame was refused: `kind` is the reference crate's `DecodeError` variant (§3.5) and
 * `details` its fields; `toString()`-like `render()` gives the vectors' `error:` line.
 */
export class DecodeError extends Error {
  constructor(kind, details = {}) {
    const rendered = renderDecodeError(kind, details);
    super(`cannot decode frame: ${rendered}`);
    this.name = 'DecodeError';
    this.kind = kind;
    this.details = details;
    this.rendered = rendered;
  }

  /** The error as written in PROTOCOL.md §9, e.g. `MissingField frame=Subscribe field=room`. */
  render() {
    return this.rendered;
  }
}

function renderDecodeError(kind, d) {
  switch (kind) {
    case 'DuplicateKey':
      return `DuplicateKey key=${d.key}`;
    case 'MissingField':
      return `MissingField frame=${d.frame} field=${d.field}`;
    case 'UnknownType':
      return `UnknownType kind=${d.kind} id=${d.id ?? 'none'}`;
    case 'InvalidValue':
      return `InvalidValue field=${d.field}`;
    default:
      return kind;
  }
}

// ---------------------------------------------------------------------------------------------
// Names (§5)

const NAMESPACE_BYTE = /^[a-z0-9_-]$/;
const VISIBLE = (c) => c >= 0x21 && c <= 0x7e;

/**
 * Checks a room name; returns `null` when valid, else the first failure in the reference
 * order as the reference crate's `NameError` variant: `Empty`, `TooLong(128)`,
 * `MissingNamespace`, `TooLong(32)`, `BadNamespace` or `BadCharacter`.
 */
export function roomNameError(name) {
  if (typeof name !== 'string' || name.length === 0) return 'Empty';
  if (utf8Length(name) > 128) return 'TooLong(128)';
  const colon = name.indexOf(':');
  if (colon <= 0 || colon === name.length - 1) return 'MissingNamespace';
  const namespace = name.slice(0, colon);
  if (utf8Length(namespace) > 32) return 'TooLong(32)';
  for (const ch of namespace) if (!NAMESPACE_BYTE.test(ch)) return 'BadNamespace';
  for (let i = colon + 1; i < name.length; i++) if (!VISIBLE(name.charCodeAt(i))) return 'BadCharacter';
  return null;
}

/** Checks an event name: `null` when valid, else `Empty`, `TooLong(64)` or `BadCharacter`. */
export function eventNameError(name) {
  if (typeof name !== 'string' || name.length === 0) return 'Empty';
  if (utf8Length(name) > 64) return 'TooLong(64)';
  for (let i = 0; i < name.length; i++) if (!VISIBLE(name.charCodeAt(i))) return 'BadCharacter';
  return null;
}

const textEncoder = new TextEncoder();
function utf8Length(s) {
  return textEncoder.encode(s).length;
}

// ---------------------------------------------------------------------------------------------
// Payload (§4)

const payloadEncoder = new Encoder({ useRecords: false, tagUint8Array: false, variableMapSize: true });
const payloadDecoder = new Decoder({ useRecords: false, mapsAsObjects: true });

/** Encodes a JS value as one CBOR item: the content of `data`. */
export function encodePayload(value) {
  return toUint8Array(payloadEncoder.encode(value));
}

/**
 * Decodes the content of `data`: exactly one CBOR item (objects for maps). Throws when the
 * bytes are not one complete item.
 */
export function decodePayload(bytes) {
  if (bytes.length === 0) throw new Error('empty payload');
  return payloadDecoder.decode(bytes);
}

/** Nesting depth of a decoded payload value (the top-level item is depth 1). */
function depth(value, limit) {
  // Iterative, so a hostile value cannot exhaust the stack; stops once over `limit`.
  let deepest = 0;
  const stack = [[value, 1]];
  while (stack.length > 0) {
    const [v, d] = stack.pop();
    deepest = Math.max(deepest, d);
    if (deepest > limit) return deepest;
    if (v === null || typeof v !== 'object' || ArrayBuffer.isView(v) || v instanceof Date) continue;
    if (Array.isArray(v) || v instanceof Set) for (const x of v) stack.push([x, d + 1]);
    else if (v instanceof Map) for (const [k, x] of v) stack.push([k, d + 1], [x, d + 1]);
    else if ('tag' in v && 'value' in v) stack.push([v.value, d + 1]);
    else for (const k of Object.keys(v)) stack.push([v[k], d + 1]);
  }
  return deepest;
}

// ---------------------------------------------------------------------------------------------
// Frames (§3)

const frameEncoder = new Encoder({
  useRecords: false,
  mapsAsObjects: false,
  tagUint8Array: false,
  variableMapSize: true,
});
const frameDecoder = new Decoder({ useRecords: false, mapsAsObjects: false });

function toUint8Array(b) {
  // cbor-x returns a Buffer under Node.js; hand out plain Uint8Arrays everywhere.
  return b.constructor === Uint8Array ? b : new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
}

/** A uint value for the wire: cbor-x writes integers above 2^32 − 1 as floats unless BigInt. */
function wireUint(v) {
  return typeof v === 'number' && v > 0xffffffff ? BigInt(v) : v;
}

/**
 * Encodes a frame object (`{type: 'Publish', room, event, data, id, ack}` …) canonically:
 * ascending keys, shortest integers, the optional keys as the reference encoder writes them.
 */
export function encodeFrame(frame) {
  const number = TYPE_NUMBER[frame.type];
  if (number === undefined) throw new TypeError(`unknown frame type ${frame.type}`);
  const [, , required, optional] = FRAME_TYPES[number];
  const always = ALWAYS_WRITTEN[frame.type] ?? [];
  const whenTrue = WRITTEN_WHEN_TRUE[frame.type] ?? [];
  const fields = [];
  for (const field of required) {
    const value = frame[prop(field)];
    if (value === undefined) throw new TypeError(`${frame.type} needs ${field}`);
    fields.push([KEY[field], value]);
  }
  for (const [field, fallback] of Object.entries(optional)) {
    let value = frame[prop(field)];
    if (value === undefined) {
      if (!always.includes(field)) continue;
      value = fallback;
    }
    if (whenTrue.includes(field) && value !== true) continue;
    fields.push([KEY[field], value]);
  }
  for (const pair of PAIRED[frame.type] ?? []) {
    const given = pair.filter((field) => frame[prop(field)] !== undefined);
    if (given.length === 1) throw new TypeError(`${frame.type} needs ${pair.join(' and ')} together`);
  }
  fields.sort((a, b) => a[0] - b[0]);
  const map = new Map([[0, number]]);
  for (const [key, value] of fields) map.set(key, wireUint(value));
  return toUint8Array(frameEncoder.encode(map));
}

/** Decodes a broker frame as a client does (§3.5 with the value checks). */
export function decodeServerFrame(bytes) {
  return decodeFrame(bytes, 'broker');
}

/** Decodes a client frame as the broker does (§3.5, no value checks: names stay raw). */
export function decodeClientFrame(bytes) {
  return decodeFrame(bytes, 'client');
}

function decodeFrame(bytes, sender) {
  let map;
  try {
    map = frameDecoder.decode(bytes);
  } catch (e) {
    // cbor-x reads one item and then insists on the end of the input.
    if (/end of buffer not reached/.test(String(e?.message))) throw new DecodeError('TrailingBytes');
    throw new DecodeError('Malformed', { reason: String(e?.message ?? e) });
  }
  if (!(map instanceof Map)) throw new DecodeError('Malformed', { reason: 'not a map' });
  for (const [key, value] of map) {
    if (!isUint(key)) throw new DecodeError('Malformed', { reason: 'key is not a uint' });
    const known = KEYS[key];
    if (known && !hasType(value, known[1])) {
      throw new DecodeError('Malformed', { reason: `${known[0]} is not ${known[1]}` });
    }
  }
  const declared = mapHeadCount(bytes);
  if (declared !== undefined && declared !== map.size) {
    throw new DecodeError('DuplicateKey', { key: duplicateKey(bytes) });
  }
  if (!map.has(0)) throw new DecodeError('MissingField', { frame: 'any', field: 'type' });
  const number = toNumber(map.get(0));
  const spec = FRAME_TYPES[number];
  if (!spec || spec[1] !== sender) {
    const id = map.get(1);
    throw new DecodeError('UnknownType', { kind: number, id: isUint(id) ? toNumber(id) : undefined });
  }
  const [name, , required, optional] = spec;
  const frame = { type: name };
  for (const field of required) {
    if (!map.has(KEY[field])) throw new DecodeError('MissingField', { frame: name, field });
    frame[prop(field)] = fieldValue(map.get(KEY[field]));
  }
  for (const [field, fallback] of Object.entries(optional)) {
    const value = map.has(KEY[field]) ? fieldValue(map.get(KEY[field])) : fallback;
    if (value !== undefined) frame[prop(field)] = value;
  }
  for (const pair of PAIRED[name] ?? []) {
    const absent = pair.filter((field) => frame[prop(field)] === undefined);
    if (absent.length === 1) throw new DecodeError('MissingField', { frame: name, field: absent[0] });
  }
  if (sender === 'broker') checkValues(frame);
  return frame;
}

/** Client-side value checks of broker frames (§3.5, InvalidValue). */
function checkValues(frame) {
  if (frame.room !== undefined && roomNameError(frame.room) !== null) {
    throw new DecodeError('InvalidValue', { field: 'room' });
  }
  if (frame.event !== undefined && eventNameError(frame.event) !== null) {
    throw new DecodeError('InvalidValue', { field: 'event' });
  }
  if (frame.data !== undefined) {
    let value;
    try {
      value = decodePayload(frame.data);
    } catch {
      throw new DecodeError('InvalidValue', { field: 'data' });
    }
    if (depth(value, MAX_PAYLOAD_DEPTH) > MAX_PAYLOAD_DEPTH) {
      throw new DecodeError('InvalidValue', { field: 'data' });
    }
    // Keep the decoded payload: the caller needs it and should not decode twice.
    Object.defineProperty(frame, 'value', { value, enumerable: false, writable: true });
  }
  if (frame.code !== undefined && CODES[frame.code] === undefined) {
    throw new DecodeError('InvalidValue', { field: 'code' });
  }
}

function isUint(v) {
  return (typeof v === 'number' && Number.isInteger(v) && v >= 0) || (typeof v === 'bigint' && v >= 0n);
}

function hasType(value, type) {
  switch (type) {
    case 'uint':
      return isUint(value);
    case 'text':
      return typeof value === 'string';
    case 'bytes':
      return value instanceof Uint8Array;
    case 'bool':
      return typeof value === 'boolean';
    default:
      return false;
  }
}

/** A uint as a Number when it is exact, else the BigInt. */
function toNumber(v) {
  return typeof v === 'bigint' && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
}

function fieldValue(v) {
  if (typeof v === 'bigint') return toNumber(v);
  if (v instanceof Uint8Array) return toUint8Array(v);
  return v;
}

/**
 * The size of the definite-length map head at the start of `bytes` and the item count it
 * declares, or `undefined` when the frame does not start with such a head. cbor-x keeps the
 * last of repeated keys, so a decoded map smaller than declared means a repeated key.
 */
function mapHead(bytes) {
  const first = bytes[0];
  if (first >> 5 !== 5) return undefined;
  const info = first & 0x1f;
  if (info < 24) return { size: 1, count: info };
  const width = { 24: 1, 25: 2, 26: 4, 27: 8 }[info];
  if (width === undefined || bytes.length < 1 + width) return undefined;
  let count = 0;
  for (let i = 1; i <= width; i++) count = count * 256 + bytes[i];
  return { size: 1 + width, count };
}

function mapHeadCount(bytes) {
  return mapHead(bytes)?.count;
}

/** The first repeated key: the map's body decoded as a CBOR sequence of keys and values. */
function duplicateKey(bytes) {
  const head = mapHead(bytes);
  const items = frameDecoder.decodeMultiple(bytes.subarray(head.size));
  const seen = new Set();
  for (let i = 0; i < items.length; i += 2) {
    const key = toNumber(items[i]);
    if (seen.has(key)) return key;
    seen.add(key);
  }
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// WebTransport stream framing (§2b): each frame preceded by its length as a QUIC varint.

/** Writes `n` as a QUIC variable-length integer (RFC 9000 §16), shortest form. */
export function encodeVarint(n) {
  if (n < 0x40) return Uint8Array.of(n);
  if (n < 0x4000) return Uint8Array.of(0x40 | (n >> 8), n & 0xff);
  if (n < 0x40000000) {
    return Uint8Array.of(0x80 | (n >>> 24), (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff);
  }
  if (n > Number.MAX_SAFE_INTEGER) throw new RangeError('varint too large');
  const out = new Uint8Array(8);
  let v = BigInt(n);
  for (let i = 7; i >= 0; i--) {
    out[i] = Number(v & 0xffn);
    v >>= 8n;
  }
  out[0] |= 0xc0;
  return out;
}

/** `frame` with its varint length in front: what one frame looks like on a stream. */
export function lengthPrefixed(frame) {
  const head = encodeVarint(frame.length);
  const out = new Uint8Array(head.length + frame.length);
  out.set(head);
  out.set(frame, head.length);
  return out;
}

/**
 * Splits a byte stream into length-prefixed frames. `push(chunk)` returns the complete frames
 * the chunk finished; a length above `maxFrame` throws before its body is buffered.
 */
export class FrameSplitter {
  constructor(maxFrame = 16 * 1024 * 1024) {
    this.maxFrame = maxFrame;
    this.buffer = new Uint8Array(0);
  }

  push(chunk) {
    let buf = this.buffer.length === 0 ? chunk : concat(this.buffer, chunk);
    const frames = [];
    for (;;) {
      if (buf.length === 0) break;
      const width = 1 << (buf[0] >> 6);
      if (buf.length < width) break;
      let length = buf[0] & 0x3f;
      for (let i = 1; i < width; i++) length = length * 256 + buf[i];
      if (length > this.maxFrame) throw new RangeError(`frame of ${length} bytes is over the limit`);
      if (buf.length < width + length) break;
      frames.push(buf.slice(width, width + length));
      buf = buf.subarray(width + length);
    }
    this.buffer = buf.length === 0 ? new Uint8Array(0) : buf.slice();
    return frames;
  }

  /** Bytes of an incomplete frame still held (non-zero at a stream's end means truncation). */
  get pending() {
    return this.buffer.length;
  }
}

function concat(a, b) {
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}
