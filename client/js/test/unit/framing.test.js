// WebTransport stream framing (PROTOCOL.md §2b) and the envelope overhead table (§8).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

import { FrameSplitter, encodeFrame, encodePayload, encodeVarint, lengthPrefixed } from '../../src/codec.js';

const doc = readFileSync(fileURLToPath(new URL('../../../../docs/PROTOCOL.md', import.meta.url)), 'utf8');
const toHex = (b) => Buffer.from(b).toString('hex');

test('the examples of §2b', () => {
  assert.match(doc, /A `Ping` frame `a1 00 05` travels as\s+`03 a1 00 05`/);
  assert.match(doc, /a 300-byte frame is preceded by `41 2c`/);
  assert.equal(toHex(lengthPrefixed(Uint8Array.of(0xa1, 0x00, 0x05))), '03a10005');
  assert.equal(toHex(encodeVarint(300)), '412c');
});

test('varints have the shortest width', () => {
  for (const [n, width] of [[0, 1], [63, 1], [64, 2], [16383, 2], [16384, 4], [2 ** 30 - 1, 4], [2 ** 30, 8]]) {
    const v = encodeVarint(n);
    assert.equal(v.length, width, `width of ${n}`);
    assert.equal(v[0] >> 6, Math.log2(width), `prefix of ${n}`);
  }
  // RFC 9000 §A.1 examples.
  assert.equal(toHex(encodeVarint(494878333)), '9d7f3e7d');
  assert.equal(toHex(encodeVarint(15293)), '7bbd');
  assert.equal(toHex(encodeVarint(37)), '25');
});

test('the splitter reassembles frames cut at every byte', () => {
  const frames = [Uint8Array.of(0xa1, 0x00, 0x16), new Uint8Array(300).fill(7), new Uint8Array(0x4000).fill(9)];
  const stream = Buffer.concat(frames.map(lengthPrefixed));
  for (const step of [1, 2, 3, 64, 301, stream.length]) {
    const splitter = new FrameSplitter();
    const got = [];
    for (let i = 0; i < stream.length; i += step) got.push(...splitter.push(stream.subarray(i, i + step)));
    assert.equal(splitter.pending, 0);
    assert.deepEqual(got.map(toHex), frames.map(toHex), `chunks of ${step}`);
  }
});

test('the splitter refuses a length over its limit before the body arrives', () => {
  const splitter = new FrameSplitter(100);
  assert.throws(() => splitter.push(encodeVarint(101)), RangeError);
});

test('envelope overhead table (§8) matches encoded Event frames', () => {
  const rows = [...doc.matchAll(/^\| (\d+) \| (\d+) \| (\d+) \| \d+ bytes? /gm)].map((m) => m.slice(1).map(Number));
  assert.equal(rows.length, 5);
  const payload = encodePayload(new Uint8Array(98));
  assert.equal(payload.length, 100);
  for (const [seq, size, overhead] of rows) {
    const frame = encodeFrame({ type: 'Event', room: 'orders:1042', event: 'status', data: payload, seq });
    assert.equal(frame.length, size, `Event frame with seq ${seq}`);
    assert.equal(frame.length - 11 - 6 - 100, overhead);
  }
});
