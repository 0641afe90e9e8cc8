// The browser client in a real browser against a real broker: Debian's Chromium, headless,
// driven by playwright-core; brokers and the Rust client (`roomcast-cli`) run as processes on
// 127.0.0.1 with ports chosen by the kernel. One browser launch, one page per case.
//
// Needs the debug binaries (`cargo build -p roomcast-broker --bin roomcast` and
// `cargo build -p roomcast-client --bin roomcast-cli`) and /usr/bin/chromium; a missing one is
// a failure with a hint, never a skip.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';

import { join } from 'node:path';

import {
  REPO_DIR,
  cliPublish,
  cliSubscribe,
  launchChromium,
  requireChromium,
  startBroker,
  startPackageServer,
  startTcpProxy,
  stopAll,
} from './harness.js';

let browser;
let broker; // WebTransport on, rooms ticker:* volatile
let brokerNoWt; // --no-webtransport
let site; // the package server
let demo; // --dev-ui examples/browser

before(async () => {
  requireChromium();
  [broker, brokerNoWt, site, demo] = await Promise.all([
    startBroker(['--volatile-namespaces', 'ticker,gps']),
    startBroker(['--no-webtransport']),
    startPackageServer(),
    startBroker(['--dev-ui', join(REPO_DIR, 'examples', 'browser'), '--volatile-namespaces', 'ticker']),
  ]);
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  await stopAll();
});

/**
 * A fresh page with the package loaded as `window.roomcast`; page errors fail the case. With
 * `expectFailedConnections`, the console errors Chromium logs for refused connections (a
 * reconnect attempt to a broker that is gone) are not problems.
 */
async function openPage(t, { expectFailedConnections = false } = {}) {
  const context = await browser.newContext();
  const page = await context.newPage();
  const problems = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    if (expectFailedConnections && /WebSocket connection to .* failed|ERR_CONNECTION_REFUSED|WebTransport/.test(m.text())) return;
    problems.push(`console error: ${m.text()}`);
  });
  await page.goto(`${site}/`);
  await page.waitForFunction(() => document.title === 'ready');
  t.after(async () => {
    await context.close();
  });
  return { page, problems };
}

/**
 * In the page: connect with `options`, subscribe to `room` collecting events in
 * `window.events`; returns what the client reports about its transport.
 */
function connectAndSubscribe(page, url, options, room, subscribeOptions = {}) {
  return page.evaluate(
    async ({ url, options, room, subscribeOptions }) => {
      const states = [];
      window.events = [];
      const client = await window.roomcast.connect(url, { ...options, onState: (s) => states.push(s.state) });
      window.client = client;
      const sub = await client.subscribe(room, (e) => window.events.push(e), subscribeOptions);
      return { transport: client.transport, fallbacks: client.fallbacks, startSeq: sub.startSeq, states };
    },
    { url, options, room, subscribeOptions },
  );
}

/** Waits until the page holds `n` events, then returns them (without the raw bytes). */
async function eventsInPage(page, n) {
  await page.waitForFunction((n) => window.events.length >= n, n);
  return page.evaluate(() => window.events.map(({ room, event, data, seq, via }) => ({ room, event, data, seq, via })));
}

/** A generous failure bound for waits that span a reconnect (never a timing assertion). */
const RECONNECT_BOUND = { timeout: 30000 };

describe('browser client', () => {
  test('WebTransport: the page receives events published by the Rust client', async (t) => {
    const { page, problems } = await openPage(t);
    const info = await connectAndSubscribe(page, broker.http, { certHash: broker.certHash }, 'orders:wt-in');
    assert.equal(info.transport, 'webtransport', `fell back: ${JSON.stringify(info.fallbacks)}`);
    assert.deepEqual(info.fallbacks, []);
    assert.deepEqual(info.states, ['connecting', 'connected']);
    assert.equal(info.startSeq, 0);
    for (let i = 1; i <= 3; i++) await cliPublish(broker.ws, 'orders:wt-in', 'status', { state: 'shipped', n: i });
    const events = await eventsInPage(page, 3);
    assert.deepEqual(
      events,
      [1, 2, 3].map((n) => ({ room: 'orders:wt-in', event: 'status', data: { state: 'shipped', n }, seq: n, via: 'stream' })),
    );
    const stats = await page.evaluate(() => window.client.stats);
    assert.equal(stats.received.websocket, 0);
    assert.ok(stats.received.stream >= 5, `Welcome, Subscribed and 3 Events on streams: ${JSON.stringify(stats)}`);
    assert.deepEqual(problems, []);
  });

  test('WebTransport: events published by the page reach the Rust client', async (t) => {
    const { page, problems } = await openPage(t);
    const sub = cliSubscribe(broker.wt, 'orders:wt-out', 2, ['--cert-hash', broker.certHash]);
    await sub.ready;
    const acks = await page.evaluate(
      async ({ url, certHash }) => {
        const client = await window.roomcast.connect(url, { certHash });
        const acks = [];
        acks.push(await client.publish('orders:wt-out', 'status', { state: 'packed' }));
        acks.push(await client.publish('orders:wt-out', 'price', [5252, 1340, 'EUR']));
        return { transport: client.transport, acks };
      },
      { url: broker.http, certHash: broker.certHash },
    );
    assert.equal(acks.transport, 'webtransport');
    assert.deepEqual(acks.acks, [{ seq: 1 }, { seq: 2 }]);
    const out = await sub.done;
    assert.equal(out.code, 0, out.stderr);
    assert.deepEqual(
      out.stdout.trim().split('\n').map((l) => JSON.parse(l)),
      [
        { room: 'orders:wt-out', event: 'status', data: { state: 'packed' }, seq: 1 },
        { room: 'orders:wt-out', event: 'price', data: [5252, 1340, 'EUR'], seq: 2 },
      ],
    );
    assert.deepEqual(problems, []);
  });

  test('WebTransport datagrams: a volatile room\'s events arrive as datagrams', async (t) => {
    const { page, problems } = await openPage(t);
    const info = await connectAndSubscribe(page, broker.http, { certHash: broker.certHash }, 'ticker:btc', { latestOnly: true });
    assert.equal(info.transport, 'webtransport');
    // Datagrams may be lost (not on loopback in practice): publish until three have arrived.
    let published = 0;
    for (; published < 30; published++) {
      if ((await page.evaluate(() => window.events.length)) >= 3) break;
      await cliPublish(broker.ws, 'ticker:btc', 'price', { bid: 64000 + published, ask: 64001 + published });
    }
    const events = await eventsInPage(page, 3);
    for (const e of events) {
      assert.equal(e.via, 'datagram', `event ${e.seq} came on a stream`);
      assert.equal(e.data.ask - e.data.bid, 1);
    }
    const seqs = events.map((e) => e.seq);
    assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b), 'latestOnly delivers increasing seqs');
    const stats = await page.evaluate(() => window.client.stats);
    assert.equal(stats.received.datagram, events.length + stats.staleDropped);
    // The page publishes into the volatile room as a datagram; the Ack comes on the control
    // stream. A lost datagram would leave the Ack missing, so it tries a few times.
    const sent = await page.evaluate(async () => {
      const client = window.client;
      for (let i = 0; i < 5; i++) {
        const ack = client.publish('ticker:btc', 'price', { bid: 1, ask: 2 }, { datagram: true });
        const winner = await Promise.race([ack, new Promise((r) => setTimeout(() => r('lost'), 2000))]);
        if (winner !== 'lost') return { ack: winner, sentDatagrams: client.stats.sent.datagram };
      }
      return { ack: null, sentDatagrams: client.stats.sent.datagram };
    });
    assert.ok(sent.ack && typeof sent.ack.seq === 'number', 'the datagram publish was acknowledged with a seq');
    assert.ok(sent.sentDatagrams >= 1);
    await page.waitForFunction((seq) => window.events.some((e) => e.seq === seq), sent.ack.seq);
    assert.deepEqual(problems, []);
  });

  test('fallback: a browser without WebTransport uses WebSocket', async (t) => {
    const { page, problems } = await openPage(t);
    await page.evaluate(() => {
      delete window.WebTransport;
    });
    const info = await connectAndSubscribe(page, broker.http, { certHash: broker.certHash }, 'orders:no-wt-api');
    assert.equal(info.transport, 'websocket');
    assert.deepEqual(info.fallbacks, [
      { url: broker.http, transport: 'webtransport', error: 'this browser has no WebTransport' },
    ]);
    await cliPublish(broker.wt, 'orders:no-wt-api', 'status', 'delivered', ['--cert-hash', broker.certHash]);
    assert.deepEqual(await eventsInPage(page, 1), [
      { room: 'orders:no-wt-api', event: 'status', data: 'delivered', seq: 1, via: 'websocket' },
    ]);
    assert.deepEqual(problems, []);
  });

  test('fallback: a broker without WebTransport (nothing on UDP) is reached over WebSocket', async (t) => {
    const { page } = await openPage(t);
    // The hash of the other broker's certificate: what a stale page would hold.
    const info = await connectAndSubscribe(page, brokerNoWt.http, { certHash: broker.certHash }, 'orders:no-wt');
    assert.equal(info.transport, 'websocket');
    assert.equal(info.fallbacks.length, 1);
    assert.equal(info.fallbacks[0].transport, 'webtransport');
    assert.deepEqual(info.states, ['connecting', 'connecting', 'connected']);
    await cliPublish(brokerNoWt.ws, 'orders:no-wt', 'status', { state: 'shipped' });
    assert.deepEqual(await eventsInPage(page, 1), [
      { room: 'orders:no-wt', event: 'status', data: { state: 'shipped' }, seq: 1, via: 'websocket' },
    ]);
    const published = await page.evaluate(() => window.client.publish('orders:no-wt', 'status', 'ok'));
    assert.deepEqual(published, { seq: 2 });
  });

  for (const transport of ['webtransport', 'websocket']) {
    test(`errors over ${transport}: bad names reject with the broker's code`, async (t) => {
      const { page, problems } = await openPage(t);
      const result = await page.evaluate(
        async ({ url, certHash, transport }) => {
          const client = await window.roomcast.connect(url, { certHash, transports: [transport] });
          const outcome = async (promise) => {
            try {
              return { ok: await promise };
            } catch (e) {
              return { error: { name: e.name, code: e.code, codeName: e.codeName, isError: e instanceof Error } };
            }
          };
          return {
            transport: client.transport,
            subscribe: await outcome(client.subscribe('Orders:1', () => {})),
            publishRoom: await outcome(client.publish('orders', 'status', 1)),
            publishEvent: await outcome(client.publish('orders:1', 'bad event', 1)),
            // The session goes on after request errors.
            after: await outcome(client.publish('orders:1', 'status', 1)),
            state: client.state,
          };
        },
        { url: broker.http, certHash: broker.certHash, transport },
      );
      const refused = (code, codeName) => ({ error: { name: 'RoomcastError', code, codeName, isError: true } });
      assert.equal(result.transport, transport);
      assert.deepEqual(result.subscribe, refused(4101, 'invalid_room'));
      assert.deepEqual(result.publishRoom, refused(4101, 'invalid_room'));
      assert.deepEqual(result.publishEvent, refused(4102, 'invalid_event'));
      assert.deepEqual(result.after, { ok: {} });
      assert.equal(result.state, 'connected');
      assert.deepEqual(problems, []);
    });
  }

  test('state events: the broker ending the session is reported with its code (reconnect: false)', async (t) => {
    const { page } = await openPage(t);
    // A short drain window: the session is closed within 300 ms, told to wait 0–300 ms.
    const own = await startBroker(['--drain-window', '300ms']);
    t.after(() => own.stop());
    const pending = page.evaluate(
      async ({ url, certHash }) => {
        const states = [];
        const client = await window.roomcast.connect(url, { certHash, reconnect: false, onState: (s) => states.push(s) });
        window.ready = true;
        const closed = await client.closed;
        return { states, closed };
      },
      { url: own.http, certHash: own.certHash },
    );
    await page.waitForFunction(() => window.ready === true);
    const stopped = own.stop(); // SIGTERM: the broker drains, sending Close shutting_down
    const { states, closed } = await pending;
    await stopped;
    assert.equal(closed.code, 4001, JSON.stringify(closed)); // shutting_down
    assert.equal(closed.reconnect, true);
    assert.match(closed.reason, /shutting down/);
    assert.ok(Number.isInteger(closed.retryAfter) && closed.retryAfter >= 0 && closed.retryAfter <= 300, JSON.stringify(closed));
    assert.deepEqual(states.map((s) => s.state), ['connecting', 'connected', 'disconnected', 'closed']);
  });

  test('WebTransport close: the broker\'s code and name resolve WebTransport.closed (CLOSE_WEBTRANSPORT_SESSION)', async (t) => {
    const { page, problems } = await openPage(t);
    const own = await startBroker(['--hello-timeout', '500ms']);
    t.after(() => own.stop());
    const result = await page.evaluate(
      async ({ url, certHash }) => {
        const hash = new Uint8Array(certHash.match(/../g).map((h) => parseInt(h, 16)));
        const options = { serverCertificateHashes: [{ algorithm: 'sha-256', value: hash }] };
        // Chromium now and then rejects `closed` with "Connection lost." right as the capsule
        // arrives (seen in about one session in ten, whatever the broker's timing): a case
        // counts once one of three sessions resolves. Without the capsule none ever does.
        const attempt = async (drive) => {
          const seen = [];
          for (let i = 0; i < 3; i++) {
            const session = new WebTransport(url, options);
            await session.ready;
            await drive(session);
            const outcome = await session.closed.then(
              (info) => ({ resolved: { closeCode: info.closeCode, reason: info.reason } }),
              (e) => ({ rejected: String(e?.message ?? e) }),
            );
            seen.push(outcome);
            if (outcome.resolved) break;
          }
          return seen;
        };
        // No control stream within the hello timeout.
        const timeout = await attempt(async () => {});
        // A garbage frame on the control stream; the page neither reads the Close frame nor
        // closes, so the session ends only by the broker's capsule.
        const protocolError = await attempt(async (session) => {
          const control = await session.createBidirectionalStream();
          control.writable.getWriter().write(new Uint8Array([2, 0xff, 0x00])).catch(() => {});
        });
        return { timeout, protocolError };
      },
      { url: own.wt, certHash: own.certHash },
    );
    const last = (seen) => seen.at(-1);
    const flakes = (seen) => seen.slice(0, -1).every((o) => o.rejected === 'Connection lost.');
    assert.deepEqual(last(result.timeout), { resolved: { closeCode: 4408, reason: 'timeout' } }, JSON.stringify(result));
    assert.ok(flakes(result.timeout), JSON.stringify(result));
    assert.deepEqual(last(result.protocolError), { resolved: { closeCode: 4400, reason: 'protocol_error' } }, JSON.stringify(result));
    assert.ok(flakes(result.protocolError), JSON.stringify(result));
    assert.deepEqual(problems, []);
  });

  test('failover: broker A is killed (SIGKILL); the page reconnects to B and is told its room was reset', async (t) => {
    const { page, problems } = await openPage(t, { expectFailedConnections: true });
    const [a, b] = await Promise.all([startBroker([]), startBroker([])]);
    t.after(() => Promise.all([a.stop(), b.stop()]));
    const room = 'orders:failover';
    const first = await page.evaluate(
      async ({ urls, certHash, room }) => {
        window.events = [];
        window.recoveries = [];
        window.states = [];
        const client = await window.roomcast.connect(urls, {
          // WebSocket: the killed process's TCP connections reset at once. (A QUIC connection
          // to a process that is gone is noticed only when the browser next sends on it.)
          transports: ['websocket'],
          backoffCap: 1000,
          onState: (s) => window.states.push(s),
          onRecovery: (r) => window.recoveries.push(r),
        });
        window.client = client;
        await client.subscribe(room, (e) => window.events.push(e));
        return { url: client.url, transport: client.transport };
      },
      { urls: [a.http, b.http], room },
    );
    assert.deepEqual(first, { url: a.http, transport: 'websocket' });
    for (let n = 1; n <= 2; n++) await cliPublish(a.ws, room, 'status', { n });
    await eventsInPage(page, 2);
    const before = await page.evaluate((room) => window.client.position(room), room);
    assert.equal(before.seq, 2);
    assert.notEqual(before.epoch, 0, 'orders:* keeps history');

    await a.kill();
    await page.waitForFunction(() => window.recoveries.length >= 1, null, RECONNECT_BOUND);
    const after = await page.evaluate(
      (room) => ({
        url: window.client.url,
        state: window.client.state,
        recoveries: window.recoveries,
        position: window.client.position(room),
      }),
      room,
    );
    assert.equal(after.url, b.http, 'the next URL of the rotation');
    assert.equal(after.state, 'connected');
    assert.equal(after.recoveries.length, 1);
    const [recovery] = after.recoveries;
    const { epoch: _, ...rest } = recovery;
    assert.deepEqual(
      rest,
      { room, status: 'reset', recovered: false, cause: 'reconnect', previous: before, seq: 0 },
      'single-node history does not move to another broker: the app must resync',
    );
    assert.notEqual(recovery.epoch, before.epoch);
    assert.deepEqual(after.position, { epoch: recovery.epoch, seq: 0 });

    await cliPublish(b.ws, room, 'status', { n: 3 });
    const events = await eventsInPage(page, 3);
    assert.deepEqual(events.map((e) => [e.data.n, e.seq]), [[1, 1], [2, 2], [3, 1]]);
    const states = await page.evaluate(() => window.states.map((s) => s.state));
    const lost = states.indexOf('disconnected');
    assert.ok(lost > 0, JSON.stringify(states));
    assert.equal(states[lost + 1], 'reconnecting');
    assert.equal(states.at(-1), 'connected');
    assert.deepEqual(problems, []);
  });

  test('drain over WebTransport: Close shutting_down with retry_after; the page moves to the next broker', async (t) => {
    const { page, problems } = await openPage(t, { expectFailedConnections: true });
    const [a, b] = await Promise.all([
      startBroker(['--drain-window', '300ms', '--volatile-namespaces', 'ticker']),
      startBroker(['--volatile-namespaces', 'ticker']),
    ]);
    t.after(() => Promise.all([a.stop(), b.stop()]));
    const room = 'ticker:drain';
    const first = await page.evaluate(
      async ({ urls, certHash, room }) => {
        window.events = [];
        window.recoveries = [];
        window.states = [];
        const client = await window.roomcast.connect(urls, {
          certHash, // one hash per broker: each has its own development certificate
          onState: (s) => window.states.push(s),
          onRecovery: (r) => window.recoveries.push(r),
        });
        window.client = client;
        await client.subscribe(room, (e) => window.events.push(e));
        return { url: client.url, transport: client.transport, position: client.position(room) };
      },
      { urls: [a.http, b.http], certHash: [a.certHash, b.certHash], room },
    );
    assert.deepEqual(first, { url: a.http, transport: 'webtransport', position: { epoch: 0, seq: 0 } });
    await a.stop(); // SIGTERM: the broker drains
    await page.waitForFunction(() => window.recoveries.length >= 1, null, RECONNECT_BOUND);
    const after = await page.evaluate(() => ({
      url: window.client.url,
      transport: window.client.transport,
      states: window.states,
      recoveries: window.recoveries,
    }));
    assert.equal(after.url, b.http);
    assert.equal(after.transport, 'webtransport');
    const disconnected = after.states.find((s) => s.state === 'disconnected');
    assert.equal(disconnected.code, 4001);
    assert.equal(disconnected.reconnect, true);
    assert.ok(Number.isInteger(disconnected.retryAfter), JSON.stringify(disconnected));
    const reconnecting = after.states.find((s) => s.state === 'reconnecting');
    assert.equal(reconnecting.attempt, 0);
    assert.equal(reconnecting.url, b.http);
    assert.ok(reconnecting.delay >= disconnected.retryAfter, 'never sooner than retry_after');
    // A volatile room (epoch 0) is simply subscribed again: "fresh", nothing to recover.
    assert.deepEqual(after.recoveries.map((r) => [r.room, r.status, r.recovered]), [[room, 'fresh', undefined]]);
    for (let i = 0; i < 30; i++) {
      if ((await page.evaluate(() => window.events.length)) >= 1) break;
      await cliPublish(b.ws, room, 'price', { i });
    }
    const [event] = await eventsInPage(page, 1);
    assert.equal(event.via, 'datagram');
    assert.deepEqual(problems, []);
  });

  test('recovery: the WebSocket is cut under the page while events flow; each arrives once, in order', async (t) => {
    const { page, problems } = await openPage(t, { expectFailedConnections: true });
    const proxy = await startTcpProxy(brokerNoWt.port);
    t.after(() => proxy.close());
    const room = 'orders:recover';
    await page.evaluate(
      async ({ url, room }) => {
        window.events = [];
        window.recoveries = [];
        window.states = [];
        const client = await window.roomcast.connect(url, {
          transports: ['websocket'],
          backoffCap: 500,
          onState: (s) => window.states.push(s),
        });
        window.client = client;
        await client.subscribe(room, (e) => window.events.push(e), { onRecovery: (r) => window.recoveries.push(r) });
      },
      { url: proxy.http, room },
    );
    for (let n = 1; n <= 3; n++) await cliPublish(brokerNoWt.ws, room, 'status', { n });
    await eventsInPage(page, 3);

    // 1. The connection is lost (no Close) and stays down while events are published.
    proxy.refuse(true);
    proxy.cut();
    await page.waitForFunction(() => window.states.some((s) => s.state === 'reconnecting'), null, RECONNECT_BOUND);
    for (let n = 4; n <= 6; n++) await cliPublish(brokerNoWt.ws, room, 'status', { n });
    proxy.refuse(false);
    await page.waitForFunction(() => window.recoveries.length >= 1 && window.events.length >= 6, null, RECONNECT_BOUND);

    // 2. A keyed publish reaches the broker but its Ack (and its event) never reach the page;
    //    then the connection goes. The next session replays the event and the re-sent publish
    //    is recognised by its key: one event, acknowledged with its seq.
    const watcher = cliSubscribe(brokerNoWt.ws, room, 1);
    await watcher.ready;
    proxy.blackhole(true);
    await page.evaluate((room) => {
      window.client
        .publish(room, 'status', { n: 7 }, { key: 'order-7' })
        .then((ack) => (window.keyed = ack), (e) => (window.keyed = { error: e.message }));
    }, room);
    const seen = await watcher.done; // the broker has stored it
    assert.equal(seen.code, 0, seen.stderr);
    assert.equal(JSON.parse(seen.stdout.trim()).seq, 7);
    proxy.cut();
    proxy.blackhole(false);
    await page.waitForFunction(() => window.keyed !== undefined, null, RECONNECT_BOUND);
    assert.deepEqual(await page.evaluate(() => window.keyed), { seq: 7, key: 'order-7' });

    const { stderr } = await cliPublish(brokerNoWt.ws, room, 'status', { n: 8 });
    assert.match(stderr, /ack seq=8\b/, 'the re-sent publish made no second event');
    const events = await eventsInPage(page, 8);
    assert.deepEqual(
      events.map((e) => [e.seq, e.data.n]),
      [1, 2, 3, 4, 5, 6, 7, 8].map((n) => [n, n]),
      'every event exactly once, in order (none doubled by the re-sent publish)',
    );
    const recoveries = await page.evaluate(() => window.recoveries.map((r) => [r.status, r.recovered, r.previous.seq]));
    assert.deepEqual(recoveries, [
      ['recovered', true, 3],
      ['recovered', true, 6],
    ]);
    assert.ok(proxy.connections() >= 3);
    assert.deepEqual(problems, []);
  });

  test('demo page (--dev-ui examples/browser) updates live', async (t) => {
    const context = await browser.newContext();
    t.after(() => context.close());
    const page = await context.newPage();
    const problems = [];
    page.on('pageerror', (e) => problems.push(e.message));
    await page.goto(`${demo.http}/`);
    await page.waitForSelector('body[data-ready="true"]');
    // /dev-ui.js gave the page the certificate hash, so it is on WebTransport.
    assert.equal(await page.getAttribute('#connection', 'data-transport'), 'webtransport');
    await cliPublish(demo.ws, 'orders:board', 'new', { id: 'T-1', symbol: 'ETH-EUR', side: 'buy', qty: 1.5, price: 3100 });
    await cliPublish(demo.ws, 'orders:board', 'status', { id: 'T-1', status: 'filled' });
    await page.waitForSelector('#order-T-1 .status.filled');
    for (let i = 0; i < 30; i++) {
      await cliPublish(demo.ws, 'ticker:BTC-EUR', 'price', { last: 64000 + i, bid: 63999 + i, ask: 64001 + i });
      if (await page.$('#ticker-BTC-EUR[data-via="datagram"]')) break;
    }
    await page.waitForSelector('#ticker-BTC-EUR[data-via="datagram"]');
    assert.match(await page.textContent('#ticker-BTC-EUR .price'), /^64,0\d\d\.00$/);
    await page.click('#order-form button[type="submit"]');
    await page.waitForSelector('#order-result:has-text("ack seq")');
    assert.deepEqual(problems, []);
  });
});
