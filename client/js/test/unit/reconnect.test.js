// The client's reconnect, recovery, idempotent publishes and token refresh (docs/PROTOCOL.md
// §6.3, §6.6) against fake brokers on a fake network with a fake clock (test/unit/fake.js):
// no real timer, socket or randomness is involved.

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';

import { backoffDelay, jwtClaims, tokenRefreshDelay } from '../../src/client.js';
import { FakeBroker, FakeClock, FakeNetwork, flush, jwt, makeClient } from './fake.js';

function setup(n = 1, brokerOptions = {}) {
  const clock = new FakeClock();
  const network = new FakeNetwork(clock);
  const brokers = [];
  for (let i = 0; i < n; i++) brokers.push(new FakeBroker(network, `http://b${i}.test:80${i}0`, brokerOptions));
  return { clock, network, brokers, urls: brokers.map((b) => b.base) };
}

/** Connects `client`, moving the fake clock until connect() settled. */
async function start(clock, client) {
  let outcome;
  client.start().then(
    () => (outcome = { ok: true }),
    (error) => (outcome = { error }),
  );
  await clock.until(() => outcome !== undefined);
  if (outcome.error) throw outcome.error;
}

/** Settles a promise under the fake clock. */
async function settle(clock, promise, limit) {
  let outcome;
  promise.then(
    (value) => (outcome = { value }),
    (error) => (outcome = { error }),
  );
  await clock.until(() => outcome !== undefined, { limit });
  return outcome;
}

const stateNames = (states) => states.map((s) => s.state);

describe('backoff', () => {
  test('full jitter: the delay of attempt n lies in [0, min(cap, 200 · 2^n)]', () => {
    for (let n = 0; n < 20; n++) {
      const ceiling = Math.min(10000, 200 * 2 ** n);
      assert.equal(backoffDelay(n, { random: () => 0 }), 0);
      assert.equal(backoffDelay(n, { random: () => 0.9999999 }), ceiling);
      for (let i = 0; i < 50; i++) {
        const d = backoffDelay(n);
        assert.ok(d >= 0 && d <= ceiling && Number.isInteger(d), `attempt ${n}: ${d}`);
      }
    }
    assert.equal(backoffDelay(2, { random: () => 0.5 }), 400);
    assert.equal(backoffDelay(1000, { random: () => 0.9999999 }), 10000, 'large attempts stay at the cap');
    assert.equal(backoffDelay(3, { base: 50, cap: 300, random: () => 0.9999999 }), 300);
  });

  test('attempts rotate over the URLs, delays grow per attempt and reset after a Welcome', async () => {
    const { clock, network, brokers, urls } = setup(3);
    const { client, states } = makeClient(network, urls, {}, { random: () => 0.9999999 });
    await start(clock, client);
    assert.equal(client.url, urls[0]);
    assert.deepEqual(stateNames(states), ['connecting', 'connected']);

    brokers[0].crash();
    brokers[1].down = true;
    brokers[2].down = true;
    network.attempts.length = 0;
    const t0 = clock.now();
    await clock.until(() => network.attempts.length >= 5);
    const reconnecting = states.filter((s) => s.state === 'reconnecting').slice(0, 5);
    assert.deepEqual(
      reconnecting.map((s) => [s.attempt, s.delay, s.url]),
      [
        [0, 200, urls[1]],
        [1, 400, urls[2]],
        [2, 800, urls[0]],
        [3, 1600, urls[1]],
        [4, 3200, urls[2]],
      ],
    );
    assert.deepEqual(
      network.attempts.map(([, url]) => url),
      [brokers[1].wsUrl, brokers[2].wsUrl, brokers[0].wsUrl, brokers[1].wsUrl, brokers[2].wsUrl],
    );
    assert.ok(clock.now() - t0 >= 200 + 400 + 800 + 1600 + 3200);

    // Broker 0 comes back: the next attempt that reaches it (attempt 5, then 6 …) connects.
    brokers[0].restart();
    await clock.until(() => client.state === 'connected');
    assert.equal(client.url, urls[0]);
    assert.deepEqual(
      states.filter((s) => s.state === 'reconnecting').slice(5).map((s) => s.attempt),
      [5],
    );
    assert.equal(states.at(-1).reconnected, true);

    // Reset: the next loss starts from attempt 0 again (and from the next URL).
    brokers[1].down = false;
    const before = states.length;
    brokers[0].dropAll();
    await clock.until(() => client.state === 'connected' && states.length > before);
    const after = states.slice(before);
    assert.deepEqual(stateNames(after), ['disconnected', 'reconnecting', 'connecting', 'connected']);
    assert.deepEqual([after[1].attempt, after[1].delay], [0, 200]);
    assert.equal(client.url, urls[1]);
    await client.close();
  });

  test("a Close's retry_after is a floor for the delay", async () => {
    const { clock, network, brokers, urls } = setup(1);
    const { client, states } = makeClient(network, urls, {}, { random: () => 0.9999999 });
    const at = {};
    client.on('state', (s) => (at[s.state] = clock.now()));
    await start(clock, client);
    network.attempts.length = 0;
    brokers[0].closeAll({ code: 4001, message: 'draining', reconnect: true, retryAfter: 5000 });
    await clock.until(() => client.state === 'reconnecting');
    assert.equal(at.disconnected, at.reconnecting);
    const reconnecting = states.find((s) => s.state === 'reconnecting');
    assert.equal(reconnecting.delay, 5000, 'max(backoff 200, retry_after 5000)');
    const disconnected = states.find((s) => s.state === 'disconnected');
    assert.deepEqual(
      { code: disconnected.code, reconnect: disconnected.reconnect, retryAfter: disconnected.retryAfter },
      { code: 4001, reconnect: true, retryAfter: 5000 },
    );
    await clock.until(() => client.state === 'connected');
    assert.equal(network.attempts.length, 1);
    assert.equal(at.connecting - at.disconnected, 5000, 'the attempt comes 5000 ms after the Close');
    await client.close();
  });

  test('a backoff below retry_after is lifted, one above it is kept', async () => {
    const { clock, network, brokers, urls } = setup(1);
    const { client, states } = makeClient(network, urls, {}, { random: () => 0.9999999 });
    await start(clock, client);
    brokers[0].closeAll({ retryAfter: 50 });
    await clock.until(() => client.state === 'reconnecting');
    assert.equal(states.find((s) => s.state === 'reconnecting').delay, 200);
    await client.close();
  });

  test('WebTransport → WebSocket fallback at every URL of the rotation', async () => {
    const { clock, network, brokers, urls } = setup(2);
    brokers[1].webtransport = true;
    const { client } = makeClient(network, urls, { transports: ['webtransport', 'websocket'] }, { webTransport: true });
    await start(clock, client);
    assert.equal(client.transport, 'websocket');
    assert.deepEqual(client.fallbacks.map((f) => [f.url, f.transport]), [[urls[0], 'webtransport']]);
    brokers[0].dropAll();
    await clock.until(() => client.state === 'connected' && client.url === urls[1]);
    assert.equal(client.transport, 'webtransport');
    assert.deepEqual(network.attempts, [
      ['webtransport', brokers[0].wtUrl],
      ['websocket', brokers[0].wsUrl],
      ['webtransport', brokers[1].wtUrl],
    ]);
    await client.close();
  });

  test('the initial connect tries every URL once, then rejects with the failures', async () => {
    const { clock, network, brokers, urls } = setup(2);
    brokers[0].down = true;
    const one = makeClient(network, urls);
    await start(clock, one.client);
    assert.equal(one.client.url, urls[1]);
    assert.equal(one.client.fallbacks.length, 1);
    await one.client.close();

    brokers[1].down = true;
    const two = makeClient(network, urls);
    await assert.rejects(start(clock, two.client), (e) => {
      assert.deepEqual(e.fallbacks.map((f) => f.url), urls);
      assert.match(e.message, /could not connect/);
      return true;
    });
    assert.equal(two.client.state, 'closed');
    assert.equal(stateNames(two.states).at(-1), 'closed');
  });
});

describe('stopping', () => {
  test('a Close with reconnect false ends the client for good', async () => {
    const { clock, network, brokers, urls } = setup(2);
    const { client, states } = makeClient(network, urls);
    await start(clock, client);
    brokers[0].hooks.Publish = () => true; // never answered: the Close comes first
    const pending = settle(clock, client.publish('orders:1', 'x', 1));
    network.attempts.length = 0;
    brokers[0].closeAll({ code: 4420, message: 'policy violation', reconnect: false });
    const info = await settle(clock, client.closed);
    assert.deepEqual(info.value, { code: 4420, reason: 'policy violation', reconnect: false });
    assert.deepEqual(stateNames(states), ['connecting', 'connected', 'disconnected', 'closed']);
    assert.equal(states.at(-1).code, 4420);
    const rejected = await pending;
    assert.equal(rejected.error.codeName, 'disconnected');
    await clock.advance(60000);
    assert.equal(network.attempts.length, 0, 'no reconnect');
    await assert.rejects(client.subscribe('orders:1', () => {}), /disconnected/);
  });

  test('close() stops a reconnect in progress', async () => {
    const { clock, network, brokers, urls } = setup(1);
    const { client, states } = makeClient(network, urls);
    await start(clock, client);
    brokers[0].crash();
    await clock.until(() => client.state === 'reconnecting');
    network.attempts.length = 0;
    const info = await settle(clock, client.close());
    assert.equal(info.value.code, 4000);
    await clock.advance(60000);
    assert.equal(network.attempts.length, 0);
    assert.equal(states.at(-1).state, 'closed');
  });

  test('reconnect: false restores the one-session behaviour', async () => {
    const { clock, network, brokers, urls } = setup(1);
    const { client, states } = makeClient(network, urls, { reconnect: false });
    await start(clock, client);
    brokers[0].closeAll({ code: 4001, reconnect: true });
    const info = await settle(clock, client.closed);
    assert.deepEqual(info.value, { code: 4001, reason: 'shutting down', reconnect: true });
    assert.deepEqual(stateNames(states), ['connecting', 'connected', 'disconnected', 'closed']);
  });

  test('token_expired without a token provider is final; with one, the client reconnects', async () => {
    const { clock, network, brokers, urls } = setup(1);
    const fixed = makeClient(network, urls, { token: 'static' });
    await start(clock, fixed.client);
    brokers[0].closeAll({ code: 4419, message: 'token expired', reconnect: true });
    assert.equal((await settle(clock, fixed.client.closed)).value.code, 4419);

    let n = 0;
    const fresh = makeClient(network, urls, { getToken: async () => `token-${++n}` });
    await start(clock, fresh.client);
    brokers[0].closeAll({ code: 4419, message: 'token expired', reconnect: true });
    await clock.until(() => fresh.client.state === 'connected' && fresh.client.stats.sessions === 2);
    assert.deepEqual(
      brokers[0].received('Hello').slice(-2).map((h) => h.token),
      ['token-1', 'token-2'],
    );
    await fresh.client.close();
  });

  test('a connection whose Ping stays unanswered for idle_timeout is dropped and replaced', async () => {
    const { clock, network, brokers, urls } = setup(1);
    const { client, states } = makeClient(network, urls);
    await start(clock, client);
    for (const session of brokers[0].sessions) session.silent = true;
    await clock.until(() => states.some((s) => s.state === 'disconnected'), { step: 1000 });
    const disconnected = states.find((s) => s.state === 'disconnected');
    assert.match(disconnected.reason, /within 60000 ms of a Ping/);
    await clock.until(() => client.state === 'connected', { step: 100 });
    assert.equal(client.stats.sessions, 2);
    await client.close();
  });
});

describe('recovery', () => {
  test('after a lost connection every room is resubscribed, with since where the epoch is not 0', async () => {
    const { clock, network, brokers, urls } = setup(1);
    const [broker] = brokers;
    const { client, recoveries } = makeClient(network, urls);
    await start(clock, client);
    const orders = [];
    const ticks = [];
    const perRoom = [];
    const sub = await settle(clock, client.subscribe('orders:1', (e) => orders.push(e), { onRecovery: (r) => perRoom.push(r) }));
    await settle(clock, client.subscribe('ticker:x', (e) => ticks.push(e)));
    const epoch = broker.rooms.get('orders:1').epoch;
    assert.deepEqual(sub.value.position, { epoch, seq: 0 });
    for (let i = 1; i <= 3; i++) broker.publish('orders:1', 'status', i);
    broker.publish('ticker:x', 'price', 1);
    await clock.until(() => orders.length === 3 && ticks.length === 1);
    assert.deepEqual(client.position('orders:1'), { epoch, seq: 3 });
    assert.deepEqual(client.position('ticker:x'), { epoch: 0, seq: 1 });

    broker.down = true;
    broker.dropAll();
    await clock.until(() => client.state === 'reconnecting');
    for (let i = 4; i <= 6; i++) broker.publish('orders:1', 'status', i);
    broker.publish('ticker:x', 'price', 2); // lost: volatile
    broker.down = false;
    await clock.until(() => orders.length === 6 && recoveries.length === 2);

    const subscribes = broker.received('Subscribe').slice(-2);
    const since = Object.fromEntries(subscribes.map((f) => [f.room, [f.epoch, f.seq]]));
    assert.deepEqual(since, { 'orders:1': [epoch, 3], 'ticker:x': [undefined, undefined] });
    assert.deepEqual(orders.map((e) => e.data), [1, 2, 3, 4, 5, 6], 'every event once, in order');
    assert.deepEqual(orders.map((e) => e.seq), [1, 2, 3, 4, 5, 6]);
    assert.ok(orders.every((e) => e.epoch === epoch));
    const byRoom = Object.fromEntries(recoveries.map((r) => [r.room, r]));
    assert.deepEqual(byRoom['orders:1'], {
      room: 'orders:1',
      status: 'recovered',
      recovered: true,
      cause: 'reconnect',
      previous: { epoch, seq: 3 },
      epoch,
      seq: 3,
    });
    assert.equal(byRoom['ticker:x'].status, 'fresh');
    assert.equal(byRoom['ticker:x'].recovered, undefined);
    assert.deepEqual(perRoom.map((r) => r.status), ['recovered'], "the subscription's own onRecovery");
    broker.publish('ticker:x', 'price', 3);
    await clock.until(() => ticks.length === 2);
    assert.equal(ticks[1].data, 3);
    await client.close();
  });

  test('a broker that lost the history answers recovered: false; the position is replaced', async () => {
    const { clock, network, brokers, urls } = setup(1);
    const [broker] = brokers;
    const { client, recoveries } = makeClient(network, urls);
    await start(clock, client);
    const orders = [];
    await settle(clock, client.subscribe('orders:1', (e) => orders.push(e)));
    broker.publish('orders:1', 'status', 'a');
    broker.publish('orders:1', 'status', 'b');
    await clock.until(() => orders.length === 2);
    const oldEpoch = client.position('orders:1').epoch;

    broker.crash();
    await clock.until(() => client.state === 'reconnecting');
    broker.restart(); // new epoch, history gone
    broker.publish('orders:1', 'status', 'lost');
    await clock.until(() => recoveries.length === 1);
    const newEpoch = broker.rooms.get('orders:1').epoch;
    assert.notEqual(newEpoch, oldEpoch);
    assert.deepEqual(recoveries[0], {
      room: 'orders:1',
      status: 'reset',
      recovered: false,
      cause: 'reconnect',
      previous: { epoch: oldEpoch, seq: 2 },
      epoch: newEpoch,
      seq: 1,
    });
    assert.deepEqual(client.position('orders:1'), { epoch: newEpoch, seq: 1 });
    broker.publish('orders:1', 'status', 'c');
    await clock.until(() => orders.length === 3);
    assert.deepEqual(orders.map((e) => [e.data, e.seq, e.epoch]), [
      ['a', 1, oldEpoch],
      ['b', 2, oldEpoch],
      ['c', 2, newEpoch],
    ]);
    await client.close();
  });

  test('duplicate guard: an event not above the held seq of the same epoch is dropped', async () => {
    const { clock, network, brokers, urls } = setup(1);
    const [broker] = brokers;
    const { client } = makeClient(network, urls);
    await start(clock, client);
    const got = [];
    await settle(clock, client.subscribe('orders:1', (e) => got.push(e.seq)));
    const [session] = broker.sessions;
    const event = (seq, extra = {}) => ({
      type: 'Event',
      room: 'orders:1',
      event: 'e',
      data: new Uint8Array([seq]),
      seq,
      ...extra,
    });
    for (const seq of [1, 2, 2, 1, 3, 3, 5, 4]) session.send(event(seq));
    await clock.until(() => got.includes(5));
    await clock.advance(100);
    assert.deepEqual(got, [1, 2, 3, 5], 'seq may have gaps (cluster mode); repeats and late ones are dropped');
    assert.equal(client.stats.staleDropped, 4);
    await client.close();
  });

  test('Event.epoch different from the held one resets the room', async () => {
    const { clock, network, brokers, urls } = setup(1);
    const [broker] = brokers;
    const { client, recoveries } = makeClient(network, urls);
    await start(clock, client);
    const got = [];
    await settle(clock, client.subscribe('orders:1', (e) => got.push([e.seq, e.epoch])));
    const epoch = client.position('orders:1').epoch;
    const [session] = broker.sessions;
    const event = (seq, extra = {}) => ({
      type: 'Event',
      room: 'orders:1',
      event: 'e',
      data: new Uint8Array([1]),
      seq,
      ...extra,
    });
    session.send(event(40));
    session.send(event(41, { epoch })); // the held epoch: an ordinary event
    session.send(event(3, { epoch: 77 })); // numbering restarted
    session.send(event(4));
    session.send(event(3)); // duplicate in the new epoch
    await clock.until(() => got.length === 4);
    await clock.advance(100);
    assert.deepEqual(got, [
      [40, epoch],
      [41, epoch],
      [3, 77],
      [4, 77],
    ]);
    assert.equal(recoveries.length, 1);
    assert.deepEqual(recoveries[0], {
      room: 'orders:1',
      status: 'reset',
      recovered: false,
      cause: 'epoch',
      previous: { epoch, seq: 41 },
      epoch: 77,
      seq: 3,
    });
    assert.deepEqual(client.position('orders:1'), { epoch: 77, seq: 4 });
    await client.close();
  });

  test('events that overtake their Subscribed (WebTransport streams) wait for it', async () => {
    const { clock, network, brokers, urls } = setup(1);
    const [broker] = brokers;
    const { client } = makeClient(network, urls);
    await start(clock, client);
    broker.publish('orders:1', 'e', 'old'); // seq 1, before the subscription
    broker.hooks.Subscribe = (session, frame) => {
      const room = broker.room(frame.room);
      session.rooms.add(frame.room);
      const seq = room.seq;
      broker.publish(frame.room, 'e', 'first'); // reaches the client before the Subscribed
      session.send({ type: 'Event', room: frame.room, event: 'e', data: room.history[0].data, seq: 1 }); // stale
      session.send({ type: 'Subscribed', id: frame.id, room: frame.room, seq, epoch: room.epoch });
      return true;
    };
    const got = [];
    const sub = await settle(clock, client.subscribe('orders:1', (e) => got.push([e.data, e.seq])));
    assert.equal(sub.value.startSeq, 1);
    await clock.advance(100);
    assert.deepEqual(got, [['first', 2]]);
    await client.close();
  });

  test('a resubscription the broker refuses is reported and the room dropped', async () => {
    const { clock, network, brokers, urls } = setup(1);
    const [broker] = brokers;
    const { client, errors, recoveries } = makeClient(network, urls);
    await start(clock, client);
    const sub = await settle(clock, client.subscribe('orders:1', () => {}));
    broker.hooks.Subscribe = (session, frame) => {
      session.send({ type: 'Error', id: frame.id, code: 4107, message: 'forbidden' });
      return true;
    };
    broker.dropAll();
    await clock.until(() => recoveries.length === 1);
    assert.equal(recoveries[0].status, 'failed');
    assert.equal(recoveries[0].error.codeName, 'forbidden');
    assert.equal(errors[0].room, 'orders:1');
    assert.equal(sub.value.active, false);
    assert.equal(client.position('orders:1'), undefined);
    await client.close();
  });

  test('subscribe() while reconnecting resolves once the next session subscribed', async () => {
    const { clock, network, brokers, urls } = setup(1);
    const [broker] = brokers;
    const { client, recoveries } = makeClient(network, urls);
    await start(clock, client);
    broker.crash();
    await clock.until(() => client.state === 'reconnecting');
    const got = [];
    const pending = client.subscribe('orders:2', (e) => got.push(e.data));
    broker.restart();
    const sub = await settle(clock, pending);
    assert.equal(sub.value.startSeq, 0);
    assert.deepEqual(recoveries, [], 'a first subscription is no recovery');
    broker.publish('orders:2', 'e', 'x');
    await clock.until(() => got.length === 1);
    await client.close();
  });

  test('unsubscribing leaves the room out of the next resubscription', async () => {
    const { clock, network, brokers, urls } = setup(1);
    const [broker] = brokers;
    const { client } = makeClient(network, urls);
    await start(clock, client);
    const a = await settle(clock, client.subscribe('orders:a', () => {}));
    await settle(clock, client.subscribe('orders:b', () => {}));
    await settle(clock, a.value.unsubscribe());
    broker.dropAll();
    await clock.until(() => client.state === 'connected' && client.stats.sessions === 2);
    await clock.advance(100);
    const second = broker.frames.filter(([s, f]) => s === 's2' && f.type === 'Subscribe').map(([, f]) => f.room);
    assert.deepEqual(second, ['orders:b']);
    await client.close();
  });
});

describe('idempotent publishes', () => {
  test('a keyed publish whose Ack was lost is sent again with the same key and delivered once', async () => {
    const { clock, network, brokers, urls } = setup(1);
    const [broker] = brokers;
    const { client } = makeClient(network, urls);
    await start(clock, client);
    const got = [];
    await settle(clock, client.subscribe('orders:1', (e) => got.push([e.data, e.seq])));
    // The broker stores and delivers the first one, then the connection breaks before its Ack.
    let cut = true;
    broker.hooks.afterPublish = (session) => {
      if (!cut) return false;
      cut = false;
      session.silent = true;
      broker.dropAll();
      return true;
    };
    const keyed = client.publish('orders:1', 'status', 'shipped', { key: 'order-1-shipped' });
    const unkeyed = settle(clock, client.publish('orders:1', 'status', 'unkeyed')); // pending when the link drops
    const outcome = await settle(clock, keyed);
    assert.deepEqual(outcome.value, { seq: 1, key: 'order-1-shipped' }, 'the Ack of the repeat carries the first seq');
    const publishes = broker.received('Publish').filter((f) => f.key === 'order-1-shipped');
    assert.equal(publishes.length, 2, 'sent twice');
    assert.ok(publishes.every((f) => f.ack && f.event === 'status'));
    assert.deepEqual(publishes[0].data, publishes[1].data);
    const lost = await unkeyed;
    assert.equal(lost.error?.codeName, 'disconnected', 'an unkeyed pending publish fails, never acked');
    await clock.advance(100);
    assert.deepEqual(got.filter(([d]) => d === 'shipped'), [['shipped', 1]], 'delivered once');
    await client.close();
  });

  test('idempotent: true makes a random key; keyed publishes wait while reconnecting, unkeyed ones fail', async () => {
    const { clock, network, brokers, urls } = setup(1);
    const [broker] = brokers;
    const { client } = makeClient(network, urls);
    await start(clock, client);
    broker.crash();
    await clock.until(() => client.state === 'reconnecting');
    const unkeyed = await settle(clock, client.publish('orders:1', 'e', 1));
    assert.equal(unkeyed.error.codeName, 'disconnected');
    const keyed = client.publish('orders:1', 'e', 2, { idempotent: true });
    broker.restart();
    const outcome = await settle(clock, keyed);
    assert.match(outcome.value.key, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    assert.equal(outcome.value.seq, 1);
    assert.deepEqual(broker.received('Publish').map((f) => f.key), [outcome.value.key]);
    await client.close();
  });

  test('a keyed publish not acknowledged within the idempotency window fails instead of being re-sent', async () => {
    const { clock, network, brokers, urls } = setup(1);
    const [broker] = brokers;
    const { client } = makeClient(network, urls, { idempotencyWindow: 5000 });
    await start(clock, client);
    broker.hooks.Publish = () => true; // never answered
    const keyed = client.publish('orders:1', 'e', 1, { key: 'k' });
    await clock.advance(100);
    broker.crash();
    await clock.advance(6000);
    broker.restart();
    const outcome = await settle(clock, keyed);
    assert.equal(outcome.error.codeName, 'disconnected');
    assert.match(outcome.error.message, /not sent again/);
    assert.equal(broker.received('Publish').length, 1);
    await client.close();
  });

  test('keys are checked before sending: 1–64 bytes', async () => {
    const { clock, network, urls } = setup(1);
    const { client } = makeClient(network, urls);
    await start(clock, client);
    for (const key of ['', 'é'.repeat(33)]) {
      const outcome = await settle(clock, client.publish('orders:1', 'e', 1, { key }));
      assert.equal(outcome.error.code, 4111);
      assert.equal(outcome.error.codeName, 'invalid_key');
    }
    const ok = await settle(clock, client.publish('orders:1', 'e', 1, { key: 'k'.repeat(64) }));
    assert.equal(ok.value.key.length, 64);
    await client.close();
  });
});

describe('token refresh', () => {
  const T0 = 1_700_000_000; // seconds: the fake clock's start

  test('the refresh delay: 80 % of the lifetime or 30 s before exp, whichever is earlier', () => {
    const now = T0 * 1000;
    const at = (iat, exp, extra = {}) => tokenRefreshDelay(jwt({ sub: 'u', iat, exp }), { now, ...extra });
    assert.equal(at(T0, T0 + 600), 480000, '10 min token: at 8 min');
    assert.equal(at(T0, T0 + 3600), 2880000);
    assert.equal(at(T0, T0 + 100), 70000, '100 s token: 30 s before exp');
    assert.equal(at(T0, T0 + 40), 20000, 'never before half the lifetime');
    assert.equal(at(T0 - 500, T0 + 100), 0, 'late already: at once');
    assert.equal(at(T0, T0 + 600, { skew: 60000 }), 420000, 'exp read in the broker clock (60 s ahead)');
    // Without iat the lifetime starts when the token was obtained.
    assert.equal(tokenRefreshDelay(jwt({ exp: T0 + 600 }), { now, obtainedAt: now }), 480000);
    assert.equal(tokenRefreshDelay(jwt({ sub: 'no exp' }), { now }), undefined);
    assert.equal(tokenRefreshDelay('opaque-token', { now }), undefined);
    assert.deepEqual(jwtClaims(jwt({ sub: 'ü', exp: 5 })), { sub: 'ü', exp: 5 });
  });

  test('a Refresh goes out before exp with a token from getToken, and again for the next one', async () => {
    const { clock, network, brokers, urls } = setup(1);
    const [broker] = brokers;
    const issued = [];
    const getToken = async () => {
      const iat = Math.floor(clock.now() / 1000);
      const token = jwt({ sub: 'u', iat, exp: iat + 600 });
      issued.push(token);
      return token;
    };
    const { client, errors } = makeClient(network, urls, { getToken });
    await start(clock, client);
    assert.equal(broker.received('Hello')[0].token, issued[0]);
    await clock.advance(479000);
    assert.equal(broker.received('Refresh').length, 0, 'not before 80 %');
    await clock.advance(1500);
    assert.deepEqual(broker.received('Refresh').map((f) => f.token), [issued[1]]);
    await clock.until(() => client.stats.refreshes === 1);
    await clock.advance(479000);
    assert.equal(broker.received('Refresh').length, 1);
    await clock.advance(2000);
    assert.deepEqual(broker.received('Refresh').map((f) => f.token), [issued[1], issued[2]]);
    // A reconnect asks the provider again.
    broker.dropAll();
    await clock.until(() => client.stats.sessions === 2);
    assert.equal(broker.received('Hello').at(-1).token, issued.at(-1));
    assert.equal(issued.length, 4);
    assert.deepEqual(errors, []);
    await client.close();
  });

  test('a failing provider is reported and retried while the token holds', async () => {
    const { clock, network, brokers, urls } = setup(1);
    const [broker] = brokers;
    let fail = false;
    const getToken = async () => {
      if (fail) throw new Error('auth server down');
      const iat = Math.floor(clock.now() / 1000);
      return jwt({ sub: 'u', iat, exp: iat + 100 });
    };
    const { client, errors } = makeClient(network, urls, { getToken });
    await start(clock, client);
    fail = true;
    await clock.advance(70500);
    assert.equal(errors.length, 1);
    assert.equal(errors[0].codeName, 'refresh_failed');
    assert.match(errors[0].message, /auth server down/);
    fail = false;
    await clock.until(() => client.stats.refreshes === 1, { step: 500 });
    assert.equal(broker.received('Refresh').length, 1);
    assert.ok(clock.now() < T0 * 1000 + 100000, 'retried before exp');
    await client.close();
  });

  test('a Refresh the broker refuses is reported with the close', async () => {
    const { clock, network, brokers, urls } = setup(1);
    const [broker] = brokers;
    const getToken = async () => {
      const iat = Math.floor(clock.now() / 1000);
      return jwt({ sub: 'u', iat, exp: iat + 600 });
    };
    const { client, errors } = makeClient(network, urls, { getToken });
    await start(clock, client);
    broker.hooks.Refresh = () => {
      broker.closeAll({ code: 4403, message: 'token names another user', reconnect: false });
      return true;
    };
    const closed = await settle(clock, client.closed, 600000);
    assert.equal(closed.value.code, 4403);
    assert.equal(errors.length, 1);
    assert.equal(errors[0].codeName, 'refresh_failed');
    assert.equal(errors[0].code, 4403);
  });

  test('the broker clock (Welcome.time) decides when exp comes', async () => {
    const clock = new FakeClock();
    const network = new FakeNetwork(clock);
    const broker = new FakeBroker(network, 'http://b.test:1', { timeOffset: 60000 }); // broker 60 s ahead
    const getToken = async () => {
      const iat = Math.floor((clock.now() + 60000) / 1000); // issued in the broker's (true) time
      return jwt({ sub: 'u', iat, exp: iat + 600 });
    };
    const { client } = makeClient(network, [broker.base], { getToken });
    await start(clock, client);
    await clock.advance(479000);
    assert.equal(broker.received('Refresh').length, 0);
    await clock.advance(1500);
    assert.equal(broker.received('Refresh').length, 1);
    await client.close();
  });
});

describe('compatibility', () => {
  test('connect(url) with one URL and the old options still works', async () => {
    const { clock, network, urls } = setup(1);
    const { client, states } = makeClient(network, urls[0], { token: 't' });
    await start(clock, client);
    assert.deepEqual(client.brokerList, [urls[0]]);
    assert.deepEqual(client.urls, { webtransport: 'https://b0.test:8000/wt', websocket: 'ws://b0.test:8000/ws' });
    assert.deepEqual(states[0], { state: 'connecting', transport: 'websocket', url: 'ws://b0.test:8000/ws', attempt: 0 });
    const pong = await settle(clock, client.ping());
    assert.equal(typeof pong.value, 'number');
    await client.close();
    await flush();
  });
});
