// Test doubles for the client's unit tests: a clock whose timers run only when the test moves
// it, transports that talk to in-process fake brokers, and a fake broker that speaks the frames
// of docs/PROTOCOL.md with the single-node recovery semantics (§6.3): room epochs and history,
// Subscribe since, idempotency keys, Close with retry_after.

import { decodeClientFrame, encodeFrame, encodePayload } from '../../src/codec.js';
import { Client } from '../../src/client.js';

/** Lets every pending promise continuation (and I/O callback of the fakes) run. */
export function flush() {
  return new Promise((resolve) => setImmediate(resolve));
}

export class FakeClock {
  constructor(start = 1_700_000_000_000) {
    this.t = start;
    this.timers = new Map();
    this.nextId = 1;
    this.now = () => this.t;
    this.setTimeout = (fn, ms) => this.add(fn, ms, 0);
    this.setInterval = (fn, ms) => this.add(fn, ms, Math.max(1, ms));
    this.clearTimeout = (id) => this.timers.delete(id);
    this.clearInterval = (id) => this.timers.delete(id);
  }

  add(fn, ms, every) {
    const id = this.nextId++;
    this.timers.set(id, { at: this.t + Math.max(0, Number(ms) || 0), fn, every });
    return id;
  }

  /** Moves the clock `ms` forward, running the timers that come due (in order) on the way. */
  async advance(ms) {
    const end = this.t + ms;
    for (;;) {
      await flush();
      let next;
      for (const [id, timer] of this.timers) {
        if (timer.at <= end && (!next || timer.at < next[1].at)) next = [id, timer];
      }
      if (!next) break;
      const [id, timer] = next;
      this.t = Math.max(this.t, timer.at);
      if (timer.every) timer.at += timer.every;
      else this.timers.delete(id);
      timer.fn();
    }
    this.t = end;
    await flush();
  }

  /** Advances in steps of `step` ms until `predicate()` holds; fails after `limit` ms. */
  async until(predicate, { step = 10, limit = 120000 } = {}) {
    for (let waited = 0; !predicate(); waited += step) {
      if (waited > limit) throw new Error(`condition not reached within ${limit} ms of fake time`);
      await this.advance(step);
    }
  }
}

/** The fake network: URL → broker. A URL without a broker refuses connections. */
export class FakeNetwork {
  constructor(clock) {
    this.clock = clock;
    this.brokers = new Map(); // endpoint URL → broker
    this.attempts = []; // [kind, url] per transport created
  }

  /** The `environment` option of a client on this network. */
  environment({ random = () => 0.5, webTransport = false } = {}) {
    return {
      now: this.clock.now,
      setTimeout: this.clock.setTimeout,
      clearTimeout: this.clock.clearTimeout,
      setInterval: this.clock.setInterval,
      clearInterval: this.clock.clearInterval,
      random,
      hasWebTransport: () => webTransport,
      createTransport: (kind, url) => {
        this.attempts.push([kind, url]);
        return new FakeTransport(this, kind, url);
      },
    };
  }
}

class FakeTransport {
  constructor(network, kind, url) {
    this.network = network;
    this.kind = kind;
    this.url = url;
    this.session = null;
    this.closed = false;
  }

  open(handlers) {
    this.handlers = handlers;
    const broker = this.network.brokers.get(this.url);
    return new Promise((resolve, reject) => {
      setImmediate(() => {
        if (!broker || broker.down || (this.kind === 'webtransport' && !broker.webtransport)) {
          reject(new Error(`connection to ${this.url} refused`));
          return;
        }
        this.session = broker.accept(this);
        resolve();
      });
    });
  }

  send(bytes) {
    if (this.closed) return;
    const session = this.session;
    queueMicrotask(() => session.broker.receive(session, bytes));
  }

  sendDatagram() {
    return false;
  }

  /** Closed by the client. */
  close() {
    if (this.closed) return;
    this.closed = true;
    this.session?.ended();
  }

  /** From the broker side: a frame to the client. */
  deliver(frame) {
    if (this.closed) return;
    const bytes = encodeFrame(frame);
    setImmediate(() => {
      if (!this.closed) this.handlers.frame(bytes, this.kind === 'websocket' ? 'websocket' : 'stream');
    });
  }

  /** From the broker side: the connection is gone. */
  lose(code = 1006, reason = '') {
    if (this.closed) return;
    setImmediate(() => {
      if (this.closed) return;
      this.closed = true;
      this.handlers.closed({ code, reason });
    });
  }
}

let epochs = 0;

/**
 * A broker at `base` (http://…): WebSocket endpoint `ws://…/ws`, WebTransport `https://…/wt`
 * when `webtransport`. Rooms whose namespace is in `volatile` have epoch 0 and no history.
 */
export class FakeBroker {
  constructor(network, base, { webtransport = false, volatile = ['ticker'], history = 100, timeOffset = 0 } = {}) {
    this.network = network;
    this.base = base;
    const host = new URL(base).host;
    this.wsUrl = `ws://${host}/ws`;
    this.wtUrl = `https://${host}/wt`;
    this.webtransport = webtransport;
    this.volatile = volatile;
    this.historyCap = history;
    this.timeOffset = timeOffset;
    this.rooms = new Map();
    this.sessions = new Set();
    this.frames = []; // every client frame received: [sessionId, frame]
    this.sessionCount = 0;
    this.down = false;
    /** Test hooks: return true to take over a frame (nothing else happens). */
    this.hooks = {};
    network.brokers.set(this.wsUrl, this);
    network.brokers.set(this.wtUrl, this);
  }

  accept(transport) {
    const session = {
      broker: this,
      transport,
      id: `s${++this.sessionCount}`,
      rooms: new Set(),
      welcomed: false,
      silent: false, // swallow every frame (a dead connection)
      ended: () => this.sessions.delete(session),
      send: (frame) => {
        if (!session.silent) transport.deliver(frame);
      },
    };
    this.sessions.add(session);
    return session;
  }

  room(name) {
    let room = this.rooms.get(name);
    if (!room) {
      const volatile = this.volatile.includes(name.split(':')[0]);
      room = { name, epoch: volatile ? 0 : 1000 + ++epochs, seq: 0, history: [], keys: new Map() };
      this.rooms.set(name, room);
    }
    return room;
  }

  receive(session, bytes) {
    if (!this.sessions.has(session) || session.silent) return;
    const frame = decodeClientFrame(bytes);
    this.frames.push([session.id, frame]);
    if (this.hooks[frame.type]?.(session, frame)) return;
    switch (frame.type) {
      case 'Hello':
        session.token = frame.token;
        session.welcomed = true;
        session.send({
          type: 'Welcome',
          version: 1,
          session: session.id,
          time: this.network.clock.now() + this.timeOffset,
          maxFrame: 65536,
          pingInterval: 25000,
          idleTimeout: 60000,
        });
        break;
      case 'Subscribe': {
        const room = this.room(frame.room);
        session.rooms.add(room.name);
        if (frame.seq === undefined) {
          session.send({ type: 'Subscribed', id: frame.id, room: room.name, seq: room.seq, epoch: room.epoch });
          break;
        }
        const oldest = room.history.length ? room.history[0].seq : room.seq + 1;
        const recovered = room.epoch !== 0 && frame.epoch === room.epoch && frame.seq <= room.seq && frame.seq + 1 >= oldest;
        if (!recovered) {
          session.send({ type: 'Subscribed', id: frame.id, room: room.name, seq: room.seq, epoch: room.epoch, recovered: false });
          break;
        }
        session.send({ type: 'Subscribed', id: frame.id, room: room.name, seq: frame.seq, epoch: room.epoch, recovered: true });
        for (const event of room.history) if (event.seq > frame.seq) session.send(event);
        break;
      }
      case 'Unsubscribe':
        session.rooms.delete(frame.room);
        session.send({ type: 'Unsubscribed', id: frame.id, room: frame.room });
        break;
      case 'Publish': {
        const room = this.room(frame.room);
        if (frame.key !== undefined && room.keys.has(frame.key)) {
          if (frame.ack) session.send({ type: 'Ack', id: frame.id, seq: room.keys.get(frame.key) });
          break;
        }
        const seq = this.publish(frame.room, frame.event, frame.data, { encoded: true });
        if (frame.key !== undefined) room.keys.set(frame.key, seq);
        if (this.hooks.afterPublish?.(session, frame, seq)) break;
        if (frame.ack) session.send({ type: 'Ack', id: frame.id, seq });
        break;
      }
      case 'Ping':
        session.send(frame.id === undefined ? { type: 'Pong' } : { type: 'Pong', id: frame.id });
        break;
      case 'Refresh':
        session.token = frame.token;
        session.send({ type: 'Ack', id: frame.id });
        break;
      default:
        break;
    }
  }

  /** Publishes from the backend: the event's seq. */
  publish(name, event, value, { encoded = false } = {}) {
    const room = this.room(name);
    const seq = ++room.seq;
    const frame = { type: 'Event', room: name, event, data: encoded ? value : encodePayload(value), seq };
    if (room.epoch !== 0) {
      room.history.push(frame);
      if (room.history.length > this.historyCap) room.history.shift();
    }
    for (const session of this.sessions) if (session.rooms.has(name)) session.send(frame);
    return seq;
  }

  /** Frames of one type the broker received. */
  received(type) {
    return this.frames.filter(([, f]) => f.type === type).map(([, f]) => f);
  }

  /** Loses every session's connection (no Close), like a network cut. */
  dropAll(code = 1006) {
    for (const session of [...this.sessions]) {
      this.sessions.delete(session);
      session.transport.lose(code);
    }
  }

  /** Ends every session with `Close`. */
  closeAll({ code = 4001, message = 'shutting down', reconnect = true, retryAfter } = {}) {
    for (const session of [...this.sessions]) {
      const close = { type: 'Close', code, message, reconnect };
      if (retryAfter !== undefined) close.retryAfter = retryAfter;
      session.send(close);
      this.sessions.delete(session);
      session.transport.lose(code === 4000 ? 1000 : code);
    }
  }

  /** The broker process dies: connections lost, state gone; `restart()` brings it back empty. */
  crash() {
    this.dropAll();
    this.down = true;
  }

  restart() {
    this.rooms = new Map();
    this.down = false;
  }
}

/** A client of `urls` on `network` (not connected yet: `await client.start()`). */
export function makeClient(network, urls, options = {}, environment = {}) {
  const states = [];
  const errors = [];
  const recoveries = [];
  const client = new Client(urls, {
    transports: ['websocket'],
    ...options,
    environment: network.environment(environment),
  });
  client.on('state', (s) => states.push(s));
  client.on('error', (e) => errors.push(e));
  client.on('recovery', (r) => recoveries.push(r));
  return { client, states, errors, recoveries };
}

/** An unsigned JWT (`alg: none`) with these claims. */
export function jwt(claims) {
  const b64 = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  return `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}.c2ln`;
}
