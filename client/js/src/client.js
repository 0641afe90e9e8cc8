// The roomcast browser client: one session to a broker, over WebTransport when it can and
// WebSocket otherwise, with the same model as the Rust client (`client/src`): subscribe to
// rooms, publish events, get replies matched to requests by id.
//
// What it does not do (yet): reconnect, resubscribe or recover missed events after the
// session ends (listen for the `disconnected` state and connect again).

import {
  PROTOCOL_VERSION,
  DecodeError,
  codeName,
  decodeServerFrame,
  encodeFrame,
  encodePayload,
} from './codec.js';
import { WebSocketTransport, WebTransportTransport } from './transport.js';

/** How long a WebTransport attempt may take (session, control stream, Welcome) by default. */
export const DEFAULT_WEBTRANSPORT_TIMEOUT_MS = 3000;
/** How long a WebSocket attempt may take by default. */
export const DEFAULT_WEBSOCKET_TIMEOUT_MS = 10000;

/**
 * A request the broker refused (`Error` frame), or a session that ended while the request was
 * waiting (`Close`, transport loss). `code` is the protocol code (4101 …), `codeName` its name
 * (`invalid_room` …).
 */
export class RoomcastError extends Error {
  constructor(code, message, name = codeName(code)) {
    super(`${name ?? 'error'} (${code})${message ? `: ${message}` : ''}`);
    this.name = 'RoomcastError';
    this.code = code;
    this.codeName = name ?? 'unknown';
    this.detail = message ?? '';
  }
}

/**
 * The endpoints a broker URL stands for. `http://h:p` (or `ws://`) → WebTransport
 * `https://h:p/wt` and WebSocket `ws://h:p/ws`; `https://h:p` (or `wss://`) → `https://h:p/wt`
 * and `wss://h:p/ws`. A path ending in `/wt` or `/ws` is replaced by the other transport's.
 */
export function brokerUrls(url) {
  const base = new URL(url, typeof location === 'undefined' ? undefined : location.href);
  const secure = base.protocol === 'https:' || base.protocol === 'wss:';
  if (!['http:', 'https:', 'ws:', 'wss:'].includes(base.protocol)) {
    throw new TypeError(`unsupported broker URL scheme ${base.protocol}`);
  }
  let path = base.pathname.replace(/\/+$/, '');
  if (path.endsWith('/wt') || path.endsWith('/ws')) path = path.slice(0, -3);
  return {
    webtransport: `https://${base.host}${path}/wt`,
    websocket: `${secure ? 'wss' : 'ws'}://${base.host}${path}/ws`,
  };
}

/** A certificate hash as bytes: 64 hex digits (colons allowed) or the bytes themselves. */
function certHashBytes(hash) {
  if (hash === undefined || hash === null || hash === '') return undefined;
  if (hash instanceof Uint8Array) return hash;
  if (hash instanceof ArrayBuffer) return new Uint8Array(hash);
  const hex = String(hash).replace(/:/g, '').toLowerCase();
  if (!/^[0-9a-f]{64}$/.test(hex)) throw new TypeError('certHash must be 64 hex digits (SHA-256)');
  return Uint8Array.from(hex.match(/../g), (b) => parseInt(b, 16));
}

/**
 * Connects to a broker and resolves with a {@link Client} once the broker's `Welcome` arrived.
 * Transports are tried in `options.transports` order (default WebTransport, then WebSocket);
 * WebTransport is skipped when the browser lacks it and abandoned when it fails or takes longer
 * than `webTransportTimeout` ms. Rejects when every transport failed.
 */
export async function connect(url, options = {}) {
  const client = new Client(url, options);
  await client.start();
  return client;
}

/** One session to a broker; made by {@link connect}. */
export class Client {
  constructor(url, options) {
    const urls = brokerUrls(url);
    this.urls = {
      webtransport: options.webTransportUrl ?? urls.webtransport,
      websocket: options.webSocketUrl ?? urls.websocket,
    };
    this.options = options;
    this.certHash = certHashBytes(options.certHash);
    /** `connecting`, `connected` or `disconnected`. */
    this.state = 'connecting';
    /** `webtransport` or `websocket` once connected. */
    this.transport = null;
    /** The `Welcome` frame: session id, limits. */
    this.welcome = null;
    /** Transports tried before the one in use, with why they failed. */
    this.fallbacks = [];
    /** How the session ended (`{code, reason, reconnect}`), once it has. */
    this.closeInfo = null;
    /** Frames received and sent, by channel (`websocket`, `stream`, `datagram`). */
    this.stats = {
      received: { websocket: 0, stream: 0, datagram: 0 },
      sent: { websocket: 0, stream: 0, datagram: 0 },
      staleDropped: 0,
    };
    this.listeners = { state: new Set(), error: new Set() };
    if (options.onState) this.listeners.state.add(options.onState);
    if (options.onError) this.listeners.error.add(options.onError);
    this.link = null;
    this.nextId = 1;
    this.pending = new Map(); // request id → {resolve, reject, kind, room}
    this.rooms = new Map(); // room → Set of subscription records
    this.closeFrame = null;
    this.lastSent = 0;
    this.pingTimer = null;
    this.closedPromise = new Promise((resolve) => {
      this.resolveClosed = resolve;
    });
  }

  /** Registers `fn` for `state` changes or asynchronous `error`s; returns a function to remove it. */
  on(kind, fn) {
    const set = this.listeners[kind];
    if (!set) throw new TypeError(`no such client event: ${kind}`);
    set.add(fn);
    return () => set.delete(fn);
  }

  emit(kind, value) {
    for (const fn of this.listeners[kind]) {
      try {
        fn(value);
      } catch (e) {
        // A listener's bug must not break the client.
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  setState(state, detail = {}) {
    this.state = state;
    this.emit('state', { state, ...detail });
  }

  /** Resolves with `{code, reason, reconnect}` once the session has ended. */
  get closed() {
    return this.closedPromise;
  }

  /** The session id the broker assigned. */
  get sessionId() {
    return this.welcome?.session;
  }

  async start() {
    const wanted = this.options.transports ?? ['webtransport', 'websocket'];
    for (const kind of wanted) {
      if (kind !== 'webtransport' && kind !== 'websocket') throw new TypeError(`unknown transport ${kind}`);
      if (kind === 'webtransport' && typeof WebTransport === 'undefined') {
        this.fallbacks.push({ transport: kind, error: 'this browser has no WebTransport' });
        continue;
      }
      this.setState('connecting', { transport: kind, url: this.urls[kind] });
      try {
        await this.attempt(kind);
        this.transport = kind;
        this.startKeepalive();
        this.setState('connected', { transport: kind, session: this.welcome.session });
        return;
      } catch (e) {
        this.fallbacks.push({ transport: kind, error: String(e?.message ?? e) });
      }
    }
    const why = this.fallbacks.map((f) => `${f.transport}: ${f.error}`).join('; ');
    const info = { code: this.closeFrame?.code ?? 0, reason: `could not connect (${why})`, reconnect: true };
    this.closeInfo = info;
    this.setState('disconnected', info);
    this.resolveClosed(info);
    throw Object.assign(new Error(info.reason), { fallbacks: this.fallbacks });
  }

  /** One transport: open it, send Hello, wait for Welcome, all within the timeout. */
  attempt(kind) {
    const link =
      kind === 'webtransport'
        ? new WebTransportTransport(this.urls.webtransport, this.certHash)
        : new WebSocketTransport(this.urls.websocket);
    const timeoutMs =
      kind === 'webtransport'
        ? (this.options.webTransportTimeout ?? DEFAULT_WEBTRANSPORT_TIMEOUT_MS)
        : (this.options.webSocketTimeout ?? DEFAULT_WEBSOCKET_TIMEOUT_MS);
    return new Promise((resolve, reject) => {
      let settled = false;
      const fail = (e) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        link.close();
        reject(e);
      };
      const timer = setTimeout(() => fail(new Error(`no session within ${timeoutMs} ms`)), timeoutMs);
      this.onWelcome = (welcome) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        this.welcome = welcome;
        resolve();
      };
      this.onEarlyClose = (info) => fail(new Error(`closed before Welcome: ${info.code} ${info.reason}`));
      this.link = link;
      link
        .open({
          frame: (bytes, via) => {
            if (this.link === link) this.receive(bytes, via);
          },
          closed: (info) => {
            if (this.link === link) this.transportClosed(info);
          },
          error: (e) => this.emit('error', e),
        })
        .then(() => {
          if (settled) return;
          const hello = { type: 'Hello', version: PROTOCOL_VERSION };
          if (this.options.token !== undefined) hello.token = this.options.token;
          this.send(encodeFrame(hello));
        }, fail);
    });
  }

  send(frame, datagram = false) {
    const link = this.link;
    if (datagram && link.sendDatagram(frame)) {
      this.stats.sent.datagram++;
    } else {
      link.send(frame);
      this.stats.sent[link.kind === 'websocket' ? 'websocket' : 'stream']++;
    }
    this.lastSent = Date.now();
  }

  startKeepalive() {
    const interval = this.welcome.pingInterval;
    if (!interval) return;
    this.lastSent = Date.now();
    // Check a few times per interval; a Ping goes out only after `interval` of own silence.
    this.pingTimer = setInterval(() => {
      if (this.state === 'connected' && Date.now() - this.lastSent >= interval) {
        this.send(encodeFrame({ type: 'Ping' }));
      }
    }, Math.max(250, Math.floor(interval / 4)));
  }

  /** One frame from the broker, from any channel. */
  receive(bytes, via) {
    let frame;
    try {
      frame = decodeServerFrame(bytes);
    } catch (e) {
      // A broker frame of a type this client does not know is ignored (§6.5); anything else
      // is reported and dropped.
      if (!(e instanceof DecodeError && e.kind === 'UnknownType')) this.emit('error', e);
      return;
    }
    this.stats.received[via]++;
    switch (frame.type) {
      case 'Welcome':
        this.onWelcome?.(frame);
        break;
      case 'Event':
        this.dispatch(frame, via);
        break;
      case 'Subscribed':
      case 'Unsubscribed':
      case 'Ack':
      case 'Pong':
        this.settle(frame.id, (p) => p.resolve(frame));
        break;
      case 'Error': {
        const error = new RoomcastError(frame.code, frame.message);
        if (frame.id === undefined || !this.settle(frame.id, (p) => p.reject(error))) this.emit('error', error);
        break;
      }
      case 'Close':
        // The session is over: the broker closes the transport next (WebSocket) or after
        // the client did (WebTransport, §2b), so close it now.
        this.closeFrame = frame;
        if (this.state === 'connected') {
          this.link.close(this.link.kind === 'websocket' ? 1000 : 0);
          this.transportClosed({ code: frame.code, reason: frame.message });
        }
        break;
      default:
        break;
    }
  }

  /** Runs `fn` on the pending request `id` and forgets it; false when none was waiting. */
  settle(id, fn) {
    const p = this.pending.get(id);
    if (!p) return false;
    this.pending.delete(id);
    fn(p);
    return true;
  }

  dispatch(frame, via) {
    const records = this.rooms.get(frame.room);
    if (!records) return;
    const event = {
      room: frame.room,
      event: frame.event,
      data: frame.value,
      bytes: frame.data,
      seq: frame.seq,
      via,
    };
    for (const record of records) {
      if (record.latestOnly) {
        if (record.lastSeq !== undefined && frame.seq <= record.lastSeq) {
          this.stats.staleDropped++;
          continue;
        }
        record.lastSeq = frame.seq;
      }
      try {
        record.onEvent(event);
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  transportClosed(info) {
    if (this.state === 'connecting') {
      this.onEarlyClose?.(this.closeFrame ? { code: this.closeFrame.code, reason: this.closeFrame.message } : info);
      return;
    }
    if (this.state === 'disconnected') return;
    clearInterval(this.pingTimer);
    const close = this.closeFrame;
    const result = close
      ? { code: close.code, reason: close.message || codeName(close.code), reconnect: close.reconnect }
      : { code: info.code, reason: info.reason, reconnect: info.code !== 1000 };
    this.closeInfo = result;
    for (const [, p] of this.pending) p.reject(new RoomcastError(result.code, result.reason, 'disconnected'));
    this.pending.clear();
    this.setState('disconnected', result);
    this.resolveClosed(result);
  }

  request(frame, kind, room) {
    if (this.state !== 'connected') {
      return Promise.reject(new RoomcastError(this.closeInfo?.code ?? 0, 'not connected', 'disconnected'));
    }
    return new Promise((resolve, reject) => {
      this.pending.set(frame.id, { resolve, reject, kind, room });
      this.send(encodeFrame(frame));
    });
  }

  /**
   * Subscribes to `room`; `onEvent(event)` gets each of its events (`{room, event, data, bytes,
   * seq, via}`). Resolves with a {@link Subscription} once the broker confirmed, rejects with a
   * {@link RoomcastError} (e.g. `invalid_room`, 4101). With `latestOnly`, events whose `seq` is
   * not above the last one delivered are dropped (for volatile rooms, where datagrams may
   * arrive out of order).
   */
  async subscribe(room, onEvent, options = {}) {
    if (typeof onEvent !== 'function') throw new TypeError('subscribe(room, onEvent): onEvent must be a function');
    const record = { room, onEvent, latestOnly: options.latestOnly === true, lastSeq: undefined };
    let records = this.rooms.get(room);
    if (!records) this.rooms.set(room, (records = new Set()));
    records.add(record);
    try {
      const reply = await this.request({ type: 'Subscribe', id: this.nextId++, room }, 'subscribe', room);
      return new Subscription(this, record, reply.seq);
    } catch (e) {
      this.forget(record);
      throw e;
    }
  }

  forget(record) {
    const records = this.rooms.get(record.room);
    if (!records) return false;
    records.delete(record);
    if (records.size > 0) return false;
    this.rooms.delete(record.room);
    return true;
  }

  async leave(record) {
    if (!this.forget(record) || this.state !== 'connected') return;
    const room = record.room;
    try {
      await this.request({ type: 'Unsubscribe', id: this.nextId++, room }, 'unsubscribe', room);
    } catch (e) {
      if (!(e instanceof RoomcastError && e.codeName === 'not_subscribed')) throw e;
    }
    // Someone subscribed again while the Unsubscribe was on its way: subscribe for them.
    if (this.rooms.has(room) && this.state === 'connected') {
      await this.request({ type: 'Subscribe', id: this.nextId++, room }, 'subscribe', room);
    }
  }

  /**
   * Publishes `event` with payload `data` (any value cbor-x encodes; with `encoded: true`, a
   * Uint8Array holding one CBOR item) to `room`. Resolves with `{seq}` (seq absent when the
   * room had no subscribers) once the broker acknowledged, or at once with `ack: false`;
   * rejects with a {@link RoomcastError} carrying the broker's code. With `datagram: true`, on
   * WebTransport, the frame goes as a datagram when it fits (it may be lost; meant for
   * volatile rooms).
   */
  publish(room, event, data, options = {}) {
    if (this.state !== 'connected') {
      return Promise.reject(new RoomcastError(this.closeInfo?.code ?? 0, 'not connected', 'disconnected'));
    }
    const payload = options.encoded ? data : encodePayload(data);
    if (!(payload instanceof Uint8Array)) throw new TypeError('encoded payload must be a Uint8Array');
    const ack = options.ack !== false;
    const id = this.nextId++;
    const frame = encodeFrame({ type: 'Publish', id, room, event, data: payload, ack });
    if (this.welcome.maxFrame && frame.length > this.welcome.maxFrame) {
      return Promise.reject(new RangeError(`frame of ${frame.length} bytes is over the broker's ${this.welcome.maxFrame}`));
    }
    if (!ack) {
      this.send(frame, options.datagram === true);
      return Promise.resolve({});
    }
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve: (a) => resolve(a.seq === undefined ? {} : { seq: a.seq }), reject, kind: 'publish', room });
      this.send(frame, options.datagram === true);
    });
  }

  /** Sends a Ping and resolves with the round-trip time in milliseconds. */
  async ping() {
    const start = performance.now();
    await this.request({ type: 'Ping', id: this.nextId++ }, 'ping');
    return performance.now() - start;
  }

  /** Ends the session (WebSocket close 1000, or WebTransport close 0). */
  close() {
    if (this.state === 'disconnected') return this.closedPromise;
    clearInterval(this.pingTimer);
    const info = { code: 4000, reason: 'closed by the client', reconnect: false };
    this.closeInfo = info;
    for (const [, p] of this.pending) p.reject(new RoomcastError(info.code, info.reason, 'disconnected'));
    this.pending.clear();
    this.link?.close();
    this.setState('disconnected', info);
    this.resolveClosed(info);
    return this.closedPromise;
  }
}

/** A subscription to one room, from {@link Client.subscribe}. */
export class Subscription {
  constructor(client, record, startSeq) {
    this.client = client;
    this.record = record;
    /** The room. */
    this.room = record.room;
    /** The room's last `seq` when the subscription took effect. */
    this.startSeq = startSeq;
    this.active = true;
  }

  /** Stops delivery at once; resolves once the broker confirmed (when this was the room's last subscription). */
  async unsubscribe() {
    if (!this.active) return;
    this.active = false;
    await this.client.leave(this.record);
  }
}
