// Keeps the JS codec and docs/PROTOCOL.md in step, like protocol/tests/vectors.rs does for the
// Rust crate: every ```vector block is decoded, compared with the frame this file expects for
// its name, and re-encoded byte for byte; refused vectors must fail with the named error. The
// document must hold exactly the vectors listed here. The key, frame type, code and name tables
// of the document are checked against the codec's tables too.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

import {
  CODES,
  FRAME_TYPES,
  KEYS,
  MAX_IDEMPOTENCY_KEY_LEN,
  DecodeError,
  decodeClientFrame,
  decodeServerFrame,
  encodeFrame,
  encodePayload,
  eventNameError,
  roomNameError,
} from '../../src/codec.js';

const DOC = fileURLToPath(new URL('../../../../docs/PROTOCOL.md', import.meta.url));
const doc = readFileSync(DOC, 'utf8');

const hex = (s) => Uint8Array.from(Buffer.from(s.replace(/\s+/g, ''), 'hex'));
const toHex = (b) => Buffer.from(b).toString('hex');

/** Every ```vector block of the document as {name, dir, hex, diag, encodes-to?, error?}. */
function vectors() {
  const out = [];
  for (const m of doc.matchAll(/```vector\n([\s\S]*?)```/g)) {
    const v = {};
    for (const line of m[1].split('\n')) {
      if (line.trim() === '') continue;
      const i = line.indexOf(': ');
      assert.ok(i > 0, `vector line without "field: value": ${line}`);
      const field = line.slice(0, i);
      assert.ok(!(field in v), `field ${field} twice in a vector`);
      v[field] = line.slice(i + 2);
    }
    out.push(v);
  }
  return out;
}

const ORDERS = 'orders:1042';
const shipped = encodePayload({ state: 'shipped' });
const gps = encodePayload([5252, 1340]);

/** What each vector must decode to: a frame, or (refused input) the rendered error. */
const EXPECTED = {
  // 9.1 client frames
  hello: { type: 'Hello', version: 1 },
  'hello-token': { type: 'Hello', version: 1, token: 'secret-token' },
  'hello-v2': { type: 'Hello', version: 2 },
  subscribe: { type: 'Subscribe', id: 1, room: ORDERS },
  'subscribe-since': { type: 'Subscribe', id: 1, room: ORDERS, seq: 42, epoch: 7 },
  unsubscribe: { type: 'Unsubscribe', id: 2, room: ORDERS },
  'publish-ack': { type: 'Publish', id: 3, room: ORDERS, event: 'status', data: shipped, ack: true },
  'publish-no-ack': { type: 'Publish', id: 0, room: 'gps:7', event: 'pos', data: gps, ack: false },
  'publish-key': {
    type: 'Publish',
    id: 9,
    room: ORDERS,
    event: 'status',
    data: shipped,
    ack: true,
    key: 'f47ac10b-58cc-4372-a567-0e02b2c3d479',
  },
  ping: { type: 'Ping' },
  'ping-id': { type: 'Ping', id: 42 },
  refresh: { type: 'Refresh', id: 8, token: 'a.b.c' },
  // 9.2 broker frames
  welcome: {
    type: 'Welcome',
    version: 1,
    session: 's-8f3a',
    time: 1700000000000,
    maxFrame: 65536,
    pingInterval: 25000,
    idleTimeout: 60000,
  },
  subscribed: { type: 'Subscribed', id: 1, room: ORDERS, seq: 41, epoch: 7 },
  'subscribed-no-history': { type: 'Subscribed', id: 2, room: 'gps:7', seq: 311, epoch: 0 },
  'subscribed-recovered': { type: 'Subscribed', id: 1, room: ORDERS, seq: 42, epoch: 7, recovered: true },
  'subscribed-not-recovered': { type: 'Subscribed', id: 1, room: ORDERS, seq: 1200, epoch: 7, recovered: false },
  unsubscribed: { type: 'Unsubscribed', id: 2, room: ORDERS },
  event: { type: 'Event', room: ORDERS, event: 'status', data: shipped, seq: 42 },
  'event-epoch': { type: 'Event', room: ORDERS, event: 'status', data: shipped, seq: 1, epoch: 8 },
  ack: { type: 'Ack', id: 3, seq: 42 },
  'ack-no-seq': { type: 'Ack', id: 5 },
  error: { type: 'Error', id: 6, code: 4105, message: 'not subscribed' },
  'error-retry-after': { type: 'Error', id: 4, code: 4108, message: 'rate limited', retryAfter: 250 },
  'error-no-id': { type: 'Error', code: 4104, message: 'unknown frame type 9' },
  pong: { type: 'Pong' },
  'pong-id': { type: 'Pong', id: 42 },
  close: { type: 'Close', code: 4429, message: 'outbound queue over its byte cap', reconnect: true },
  'close-normal': { type: 'Close', code: 4000, message: 'bye', reconnect: false },
  'close-retry-after': { type: 'Close', code: 4001, message: 'draining', reconnect: true, retryAfter: 1500 },
  'conflation-active': { type: 'Conflation', room: 'prices:eurusd', conflated: true },
  'conflation-inactive': { type: 'Conflation', room: 'prices:eurusd', conflated: false },
  // 9.3 accepted non-canonical input
  'publish-minimal': { type: 'Publish', id: 0, room: 'gps:7', event: 'pos', data: gps, ack: false },
  'publish-ack-false': { type: 'Publish', id: 0, room: 'gps:7', event: 'pos', data: gps, ack: false },
  'ping-unordered': { type: 'Ping', id: 42 },
  'close-minimal': { type: 'Close', code: 4000, message: '', reconnect: false },
  'error-minimal': { type: 'Error', code: 4104, message: '' },
  // 9.4 refused input
  'bad-duplicate-key': 'DuplicateKey key=0',
  'bad-trailing-byte': 'TrailingBytes',
  'bad-text-key': 'Malformed',
  'bad-unknown-type': 'UnknownType kind=15 id=7',
  'bad-no-type': 'MissingField frame=any field=type',
  'bad-missing-room': 'MissingField frame=Subscribe field=room',
  'bad-since-no-epoch': 'MissingField frame=Subscribe field=epoch',
  'bad-id-type': 'Malformed',
  'bad-data-not-bytes': 'Malformed',
  'bad-not-a-map': 'Malformed',
  'bad-server-room': 'InvalidValue field=room',
  'bad-server-code': 'InvalidValue field=code',
  'bad-server-payload': 'InvalidValue field=data',
  'bad-server-client-type': 'UnknownType kind=5 id=none',
  'bad-server-no-epoch': 'MissingField frame=Subscribed field=epoch',
};

const CLIENT_DIR = new Set(Object.values(FRAME_TYPES).filter((t) => t[1] === 'client').map((t) => t[0]));

test('the document holds exactly the expected vectors', () => {
  const names = vectors().map((v) => v.name);
  assert.equal(new Set(names).size, names.length, 'a vector name is used twice');
  assert.deepEqual([...names].sort(), Object.keys(EXPECTED).sort());
});

for (const v of vectors()) {
  test(`vector ${v.name}`, () => {
    const want = EXPECTED[v.name];
    assert.ok(want !== undefined, `no expectation for vector ${v.name}`);
    assert.ok(v.dir === 'client' || v.dir === 'server', `bad dir ${v.dir}`);
    assert.ok(typeof v.diag === 'string' && v.diag.length > 0, 'vector without diag');
    const decode = v.dir === 'client' ? decodeClientFrame : decodeServerFrame;
    const input = hex(v.hex);
    if (typeof want === 'string') {
      assert.equal(v.error, want, 'error line');
      assert.equal(v['encodes-to'], undefined);
      assert.throws(
        () => decode(input),
        (e) => e instanceof DecodeError && e.render() === want,
        `${v.name} must be refused with ${want}`,
      );
      return;
    }
    assert.equal(v.error, undefined, 'a valid vector has no error line');
    if (v.dir === 'client') assert.ok(CLIENT_DIR.has(want.type), 'client vector of a broker frame');
    else assert.ok(!CLIENT_DIR.has(want.type), 'server vector of a client frame');
    const frame = decode(input);
    // cbor-x caches a DataView on buffers it reads, so byte strings are compared as hex.
    const plain = (f) => (f.data ? { ...f, data: toHex(f.data) } : { ...f });
    assert.deepEqual(plain(frame), plain(want));
    if (frame.type === 'Event') assert.deepEqual(frame.value, { state: 'shipped' });
    const canonical = v['encodes-to'] ? hex(v['encodes-to']) : input;
    if (v['encodes-to']) assert.notEqual(toHex(canonical), toHex(input), 'encodes-to equals hex');
    // The decoded frame and the expected frame both encode to the canonical bytes.
    assert.equal(toHex(encodeFrame(frame)), toHex(canonical));
    assert.equal(toHex(encodeFrame(want)), toHex(canonical));
  });
}

/** The rows of the first markdown table whose header line starts with `header`. */
function table(header) {
  const lines = doc.split('\n');
  const start = lines.findIndex((l) => l.startsWith(header));
  assert.ok(start >= 0, `table "${header}" not found in PROTOCOL.md`);
  const rows = [];
  for (let i = start + 2; i < lines.length && lines[i].startsWith('|'); i++) {
    rows.push(lines[i].split('|').slice(1, -1).map((c) => c.trim()));
  }
  return rows;
}

test('key table (§3.1) matches the codec', () => {
  const rows = table('| key | name | type | meaning |');
  const doc = Object.fromEntries(rows.map(([k, name, type]) => [k, [name, type]]));
  assert.deepEqual(doc, Object.fromEntries(Object.entries(KEYS).map(([k, v]) => [k, [...v]])));
});

test('frame type table (§3.2) matches the codec', () => {
  const rows = table('| type | frame | sent by | required keys |');
  const list = (s) => (s === '–' || s === '-' ? [] : s.split(',').map((x) => x.trim()));
  const doc = {};
  for (const [type, name, sender, required, optional] of rows) {
    const opts = {};
    for (const o of list(optional)) {
      const m = /^(\w+) \((.*)\)$/.exec(o);
      assert.ok(m, `optional key "${o}"`);
      opts[m[1]] = { none: undefined, 0: 0, false: false, '""': '' }[m[2]];
      assert.ok(m[2] in { none: 1, 0: 1, false: 1, '""': 1 }, `default ${m[2]}`);
    }
    doc[type] = [name, sender, list(required), opts];
  }
  const code = Object.fromEntries(
    Object.entries(FRAME_TYPES).map(([k, [name, sender, req, opt]]) => [k, [name, sender, [...req], { ...opt }]]),
  );
  assert.deepEqual(doc, code);
});

test('code table (§7) matches the codec', () => {
  const rows = table('| code | name | sent in | retry / reconnect |');
  const doc = Object.fromEntries(rows.map(([code, name, sentIn, retry]) => [code, [name, sentIn, retry === 'yes']]));
  assert.deepEqual(doc, Object.fromEntries(Object.entries(CODES).map(([k, v]) => [k, [...v]])));
});

test('name table (§5) matches the name checks', () => {
  const rows = table('| name | as | result |');
  assert.ok(rows.length >= 15);
  for (const [cell, as, result] of rows) {
    const name = cell === '(empty)' ? '' : cell.replace(/^`|`$/g, '');
    const got = (as === 'room' ? roomNameError : eventNameError)(name);
    assert.equal(got ?? 'valid', result, `${as} ${JSON.stringify(name)}`);
  }
  // The length limits the table states in words.
  assert.equal(roomNameError(`a:${'b'.repeat(126)}`), null);
  assert.equal(roomNameError(`a:${'b'.repeat(127)}`), 'TooLong(128)');
  assert.equal(eventNameError('e'.repeat(64)), null);
  assert.equal(eventNameError('e'.repeat(65)), 'TooLong(64)');
});

test('limits table (§6.4): the idempotency key length', () => {
  const row = table('| setting | value | unit |').find(([setting]) => setting === 'max_key');
  assert.ok(row, 'no max_key row');
  assert.equal(Number(row[1]), MAX_IDEMPOTENCY_KEY_LEN);
});

test('Subscribe carries seq and epoch together or not at all (§3.2)', () => {
  // Encoding refuses half a position; decoding refuses it as MissingField of the absent half.
  assert.throws(() => encodeFrame({ type: 'Subscribe', id: 1, room: ORDERS, seq: 42 }), TypeError);
  assert.throws(() => encodeFrame({ type: 'Subscribe', id: 1, room: ORDERS, epoch: 7 }), TypeError);
  const half = (key, value) => {
    const map = new Map([[0, 2], [1, 1], [2, ORDERS], [key, value]]);
    return encodePayload(map);
  };
  assert.throws(
    () => decodeClientFrame(half(18, 7)),
    (e) => e instanceof DecodeError && e.render() === 'MissingField frame=Subscribe field=seq',
  );
  assert.throws(
    () => decodeClientFrame(half(5, 42)),
    (e) => e instanceof DecodeError && e.render() === 'MissingField frame=Subscribe field=epoch',
  );
  // Position 0/0 is a position, not an absent one.
  const zero = encodeFrame({ type: 'Subscribe', id: 1, room: ORDERS, seq: 0, epoch: 0 });
  assert.deepEqual(decodeClientFrame(zero), { type: 'Subscribe', id: 1, room: ORDERS, seq: 0, epoch: 0 });
});
