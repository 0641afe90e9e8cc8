// The roomcast browser client: a session to a broker, over WebTransport when it can and
// WebSocket otherwise, with the same model as the Rust client (`client/src`): subscribe to
// rooms, publish events, get replies matched to requests by id.
//
// When a session ends the client reconnects by itself (docs/PROTOCOL.md §6.6): exponential
// backoff with full jitter, never sooner than a `Close`'s `retry_after`, rotating over the broker
// URLs; it then resubscribes every room with the position it holds (recovery, §6.3), tells the
// application per room whether it was recovered, re-sends the publishes that carry an
// idempotency key, and keeps the session's token fresh with `Refresh`.

import {
  MAX_IDEMPOTENCY_KEY_LEN,
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
/** Reconnect backoff: the delay before attempt n is drawn from [0, min(cap, base · 2^n)] (§6.6). */
export const DEFAULT_BACKOFF_BASE_MS = 200;
/** Reconnect backoff cap (§6.6). */
export const DEFAULT_BACKOFF_CAP_MS = 10000;
/**
 * How long after its first sending a keyed publish may still be sent again: the broker's default
 * dedup window (§6.3). Later, re-sending could deliver it twice, so it fails instead.
 */
export const DEFAULT_IDEMPOTENCY_WINDOW_MS = 120000;

/** A token is refreshed at this fraction of its lifetime … */
const REFRESH_FRACTION = 0.8;
/** … or this long before it expires, whichever is earlier (never before half its lifetime). */
const REFRESH_MARGIN_MS = 30000;
/** Shortest time between two refreshes, so a provider handing out stale tokens does not spin. */
const MIN_REFRESH_INTERVAL_MS = 1000;

/**
 * A request the broker refused (`Error` frame), or a session that ended while the request was
 * waiting (`Close`, transport loss). `code` is the protocol code (4101 …), `codeName` its name
 * (`invalid_room` …; `disconnected`, `refresh_failed` for the client's own failures).
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

/**
 * The backoff before reconnect attempt `attempt` (0, 1, 2 … since the last session that reached
 * `Welcome`): full jitter, uniform in [0, min(cap, base · 2^attempt)] ms (§6.6).
 */
export function backoffDelay(
  attempt,
  { base = DEFAULT_BACKOFF_BASE_MS, cap = DEFAULT_BACKOFF_CAP_MS, random = Math.random } = {},
) {
  const ceiling = Math.min(cap, base * 2 ** Math.min(Math.max(attempt, 0), 52));
  return Math.min(ceiling, Math.floor(random() * (ceiling + 1)));
}

/** The payload (claims) of a JWT, decoded without verifying anything; undefined when it is none. */
export function jwtClaims(token) {
  if (typeof token !== 'string') return undefined;
  const parts = token.split('.');
  if (parts.length !== 3) return undefined;
  try {
    let b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    while (b64.length % 4) b64 += '=';
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims !== null && typeof claims === 'object' && !Array.isArray(claims) ? claims : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Milliseconds from `now` until `token` should be refreshed, or undefined when it is not a JWT
 * with a numeric `exp`. The lifetime runs from `iat` (else `obtainedAt`, when the client got the
 * token) to `exp`; the refresh comes at 80 % of it or 30 s before `exp`, whichever is earlier,
 * but not before half of it. `skew` is the broker's clock minus the local one (ms): `exp` and
 * `iat` are read in the broker's time.
 */
export function tokenRefreshDelay(token, { now = Date.now(), obtainedAt = now, skew = 0 } = {}) {
  const claims = jwtClaims(token);
  if (!claims || typeof claims.exp !== 'number' || !Number.isFinite(claims.exp)) return undefined;
  const exp = claims.exp * 1000 - skew;
  const start = typeof claims.iat === 'number' && Number.isFinite(claims.iat) ? claims.iat * 1000 - skew : obtainedAt;
  const lifetime = exp - start;
  if (!(lifetime > 0)) return 0;
  const after = Math.max(Math.min(REFRESH_FRACTION * lifetime, lifetime - REFRESH_MARGIN_MS), lifetime / 2);
  return Math.max(0, Math.round(start + after - now));
}

/**
 * Certificate hashes as bytes: each 64 hex digits (colons allowed) or the bytes themselves; one
 * or an array (one per broker of several, each with its own development certificate).
 */
function certHashList(hashes) {
  const list = Array.isArray(hashes) ? hashes : [hashes];
  return list.map(certHashBytes).filter((h) => h !== undefined);
}

function certHashBytes(hash) {
  if (hash === undefined || hash === null || hash === '') return undefined;
  if (hash instanceof Uint8Array) return hash;
  if (hash instanceof ArrayBuffer) return new Uint8Array(hash);
  const hex = String(hash).replace(/:/g, '').toLowerCase();
  if (!/^[0-9a-f]{64}$/.test(hex)) throw new TypeError('certHash must be 64 hex digits (SHA-256)');
  return Uint8Array.from(hex.match(/../g), (b) => parseInt(b, 16));
}

/** A random UUID (v4): `crypto.randomUUID` where there is one (secure contexts), else built. */
function randomUuid() {
  const c = globalThis.crypto;
  if (typeof c?.randomUUID === 'function') return c.randomUUID();
  const b = c.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** What the client takes from its surroundings; `options.environment` replaces parts (tests). */
const DEFAULT_ENVIRONMENT = {
  now: () => Date.now(),
  random: () => Math.random(),
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (timer) => clearTimeout(timer),
  setInterval: (fn, ms) => setInterval(fn, ms),
  clearInterval: (timer) => clearInterval(timer),
  randomUUID: randomUuid,
  hasWebTransport: () => typeof WebTransport !== 'undefined',
  createTransport: (kind, url, { certHashes }) =>
    kind === 'webtransport' ? new WebTransportTransport(url, certHashes) : new WebSocketTransport(url),
};

const TRANSPORTS = ['webtransport', 'websocket'];

/**
 * Connects to a broker and resolves with a {@link Client} once the broker's `Welcome` arrived.
 * `url` is one broker URL or an array of them (`options.urls` adds more); each is tried once, in
 * order, with its transports in `options.transports` order (default WebTransport, then
 * WebSocket). Rejects when no attempt reached `Welcome`. Once connected, the client reconnects by
 * itself whenever the session ends (unless `options.reconnect` is false).
 */
export async function connect(url, options = {}) {
  if (url !== null && typeof url === 'object' && !Array.isArray(url) && !(url instanceof URL)) {
    options = url;
    url = undefined;
  }
  const client = new Client(url, options);
  await client.start();
  return client;
}

function disconnected(code, message) {
  return new RoomcastError(code ?? 0, message, 'disconnected');
}

/** A client of one broker (or of several URLs of one cluster); made by {@link connect}. */
export class Client {
  constructor(url, options = {}) {
    const list = [];
    const add = (u) => {
      if (u === undefined || u === null) return;
      const s = String(u);
      if (!list.includes(s)) list.push(s);
    };
    if (Array.isArray(url)) url.forEach(add);
    else add(url);
    if (options.urls !== undefined) {
      if (!Array.isArray(options.urls)) throw new TypeError('options.urls must be an array of broker URLs');
      options.urls.forEach(add);
    }
    if (list.length === 0) throw new TypeError('connect: no broker URL');
    this.brokers = list.map((base) => ({ base, ...brokerUrls(base) }));
    if (options.webTransportUrl || options.webSocketUrl) {
      if (this.brokers.length > 1) throw new TypeError('webTransportUrl / webSocketUrl need a single broker URL');
      this.brokers[0].webtransport = options.webTransportUrl ?? this.brokers[0].webtransport;
      this.brokers[0].websocket = options.webSocketUrl ?? this.brokers[0].websocket;
    }
    this.transports = options.transports ?? TRANSPORTS;
    for (const kind of this.transports) {
      if (!TRANSPORTS.includes(kind)) throw new TypeError(`unknown transport ${kind}`);
    }
    if (options.getToken !== undefined && typeof options.getToken !== 'function') {
      throw new TypeError('options.getToken must be a function returning (a promise of) a token');
    }
    this.options = options;
    this.env = { ...DEFAULT_ENVIRONMENT, ...options.environment };
    this.certHashes = certHashList(options.certHash);
    this.autoReconnect = options.reconnect !== false;
    this.backoff = {
      base: options.backoffBase ?? DEFAULT_BACKOFF_BASE_MS,
      cap: options.backoffCap ?? DEFAULT_BACKOFF_CAP_MS,
    };
    this.idempotencyWindow = options.idempotencyWindow ?? DEFAULT_IDEMPOTENCY_WINDOW_MS;
    /** The broker URL of the current (or last) session. */
    this.url = this.brokers[0].base;
    /** Its endpoints. */
    this.urls = { webtransport: this.brokers[0].webtransport, websocket: this.brokers[0].websocket };
    /** `connecting`, `connected`, `disconnected`, `reconnecting` or `closed`. */
    this.state = 'connecting';
    /** `webtransport` or `websocket` once connected. */
    this.transport = null;
    /** The `Welcome` frame: session id, limits. */
    this.welcome = null;
    /** Attempts that failed before the one in use (`{url, transport, error}`). */
    this.fallbacks = [];
    /** How the last session ended (`{code, reason, reconnect}`), once one has. */
    this.closeInfo = null;
    /** Frames received and sent, by channel (`websocket`, `stream`, `datagram`), and more. */
    this.stats = {
      received: { websocket: 0, stream: 0, datagram: 0 },
      sent: { websocket: 0, stream: 0, datagram: 0 },
      staleDropped: 0,
      sessions: 0,
      refreshes: 0,
    };
    this.listeners = { state: new Set(), error: new Set(), recovery: new Set(), conflation: new Set() };
    if (options.onState) this.listeners.state.add(options.onState);
    if (options.onError) this.listeners.error.add(options.onError);
    if (options.onRecovery) this.listeners.recovery.add(options.onRecovery);
    this.link = null;
    this.nextId = 1;
    this.pending = new Map(); // request id → {resolve, reject, kind, room, entry?}
    this.rooms = new Map(); // room → RoomState
    this.leaving = new Map(); // room → promise of its Unsubscribe
    this.outbox = new Set(); // keyed publishes not yet acknowledged
    this.attempt = 0; // reconnect attempts since the last Welcome
    this.nextUrl = 0;
    this.retryAfter = undefined; // floor for the next delay, from a Close
    this.stopped = false;
    this.token = undefined;
    this.tokenObtainedAt = 0;
    this.skew = 0;
    this.closeFrame = null;
    this.lastSent = 0;
    this.lastReceived = 0;
    this.pingSentAt = undefined;
    this.pingTimer = undefined;
    this.refreshTimer = undefined;
    this.sleepTimer = undefined;
    this.wake = undefined;
    this.abortAttempt = undefined;
    this.closedPromise = new Promise((resolve) => {
      this.resolveClosed = resolve;
    });
  }

  /**
   * Registers `fn` for `state` changes, asynchronous `error`s, per-room `recovery` outcomes or
   * `conflation` changes; returns a function that removes it.
   */
  on(kind, fn) {
    const set = this.listeners[kind];
    if (!set) throw new TypeError(`no such client event: ${kind}`);
    set.add(fn);
    return () => set.delete(fn);
  }

  emit(kind, value) {
    for (const fn of this.listeners[kind]) callSafely(fn, value);
  }

  setState(state, detail = {}) {
    this.state = state;
    this.emit('state', { state, ...detail });
  }

  /** Resolves with `{code, reason, reconnect}` once the client stopped for good. */
  get closed() {
    return this.closedPromise;
  }

  /** The session id the broker assigned to the current session. */
  get sessionId() {
    return this.welcome?.session;
  }

  /** The URLs this client connects to, in rotation order. */
  get brokerList() {
    return this.brokers.map((b) => b.base);
  }

  /** The position held for `room` (`{epoch, seq}`), or undefined when it holds none. */
  position(room) {
    const rs = this.rooms.get(room);
    return rs && rs.seq !== undefined ? { epoch: rs.epoch, seq: rs.seq } : undefined;
  }

  async start() {
    if (!(await this.run(true)) && this.startError) throw this.startError;
  }

  // ---- connecting ------------------------------------------------------------------------------

  /**
   * Makes attempts, one broker URL each (rotating), until one reaches `Welcome`: true then. An
   * initial run tries each URL once; a reconnect run goes on until it succeeds or the client is
   * stopped. False when the client stopped (closed by the app, a final `Close`, or an initial
   * run that failed).
   */
  async run(initial) {
    this.fallbacks = [];
    for (;;) {
      if (this.stopped) return false;
      const url = this.brokers[this.nextUrl];
      if (!initial || this.attempt > 0) {
        const delay = Math.max(
          backoffDelay(this.attempt, { ...this.backoff, random: this.env.random }),
          this.retryAfter ?? 0,
        );
        this.retryAfter = undefined;
        if (!initial) this.setState('reconnecting', { attempt: this.attempt, delay, url: url.base });
        await this.sleep(delay);
        if (this.stopped) return false;
      }
      this.nextUrl = (this.nextUrl + 1) % this.brokers.length;
      let token;
      let tokenOk = true;
      try {
        token = await this.tokenForAttempt();
      } catch (e) {
        tokenOk = false;
        const error = new RoomcastError(0, `getToken() failed: ${e?.message ?? e}`, 'token_unavailable');
        error.cause = e;
        this.fallbacks.push({ url: url.base, transport: null, error: error.detail });
        this.emit('error', error);
      }
      if (this.stopped) return false;
      if (tokenOk) {
        for (const kind of this.transports) {
          if (kind === 'webtransport' && !this.env.hasWebTransport()) {
            this.fallbacks.push({ url: url.base, transport: kind, error: 'this browser has no WebTransport' });
            continue;
          }
          const endpoint = url[kind];
          this.setState('connecting', { transport: kind, url: endpoint, attempt: this.attempt });
          try {
            await this.attemptTransport(kind, url, token, initial);
            return true;
          } catch (e) {
            if (this.stopped) return false;
            this.fallbacks.push({ url: url.base, transport: kind, error: String(e?.message ?? e) });
            if (e?.closeInfo) {
              if (e.closeInfo.retryAfter !== undefined) this.retryAfter = e.closeInfo.retryAfter;
              if (this.closeIsFinal(e.closeInfo)) {
                this.closeInfo = e.closeInfo;
                this.finish(e.closeInfo);
                if (initial) {
                  const error = new Error(`closed by the broker: ${e.closeInfo.code} ${e.closeInfo.reason}`);
                  this.startError = Object.assign(error, { fallbacks: this.fallbacks, closeInfo: e.closeInfo });
                }
                return false;
              }
              break; // the broker answered and sent us away: next attempt (another URL, after the delay)
            }
          }
        }
      }
      this.attempt++;
      if (initial && this.attempt >= this.brokers.length) {
        const why = this.fallbacks.map((f) => `${f.url} ${f.transport ?? 'token'}: ${f.error}`).join('; ');
        const info = { code: this.closeFrame?.code ?? 0, reason: `could not connect (${why})`, reconnect: true };
        this.closeInfo = info;
        this.startError = Object.assign(new Error(info.reason), { fallbacks: this.fallbacks });
        this.finish(info);
        return false;
      }
    }
  }

  sleep(ms) {
    return new Promise((resolve) => {
      this.wake = resolve;
      this.sleepTimer = this.env.setTimeout(() => {
        this.sleepTimer = undefined;
        this.wake = undefined;
        resolve();
      }, ms);
    });
  }

  async tokenForAttempt() {
    if (this.options.getToken) {
      const token = await this.options.getToken();
      if (typeof token !== 'string' || token === '') throw new TypeError('getToken() must resolve with a non-empty string');
      return token;
    }
    return this.options.token;
  }

  /** Whether a `Close` ends the client for good rather than asking it to reconnect. */
  closeIsFinal(info) {
    if (!info.reconnect) return true;
    // An expired token cannot be replaced without a provider: reconnecting would end the same way.
    return info.code === 4419 && !this.options.getToken;
  }

  /** One transport of one URL: open it, send Hello, wait for Welcome, all within the timeout. */
  attemptTransport(kind, url, token, initial) {
    const link = this.env.createTransport(kind, url[kind], { certHashes: this.certHashes });
    const timeoutMs =
      kind === 'webtransport'
        ? (this.options.webTransportTimeout ?? DEFAULT_WEBTRANSPORT_TIMEOUT_MS)
        : (this.options.webSocketTimeout ?? DEFAULT_WEBSOCKET_TIMEOUT_MS);
    this.closeFrame = null;
    return new Promise((resolve, reject) => {
      let settled = false;
      const fail = (e) => {
        if (settled) return;
        settled = true;
        this.env.clearTimeout(timer);
        this.onWelcome = this.onEarlyClose = this.abortAttempt = undefined;
        if (this.link === link) this.link = null;
        link.close();
        reject(e);
      };
      const timer = this.env.setTimeout(() => fail(new Error(`no session within ${timeoutMs} ms`)), timeoutMs);
      this.abortAttempt = fail;
      this.onWelcome = (welcome) => {
        if (settled) return;
        settled = true;
        this.env.clearTimeout(timer);
        this.onWelcome = this.onEarlyClose = this.abortAttempt = undefined;
        // Synchronously, so that no frame of the session is handled before it is set up.
        this.sessionStarted(kind, url, token, welcome, initial);
        resolve();
      };
      this.onEarlyClose = (info, fromBroker = false) => {
        const error = new Error(`closed before Welcome: ${info.code} ${info.reason}`);
        if (fromBroker) error.closeInfo = info;
        fail(error);
      };
      this.link = link;
      link
        .open({
          frame: (bytes, via) => this.receive(link, bytes, via),
          closed: (info) => this.transportClosed(link, info),
          error: (e) => {
            if (this.link === link) this.emit('error', e);
          },
        })
        .then(() => {
          if (settled) return;
          const hello = { type: 'Hello', version: PROTOCOL_VERSION };
          if (token !== undefined) hello.token = token;
          this.send(encodeFrame(hello));
        }, fail);
    });
  }

  /** A session reached `Welcome`: set it up, resubscribe, re-send keyed publishes. */
  sessionStarted(kind, url, token, welcome, initial) {
    const now = this.env.now();
    this.welcome = welcome;
    this.transport = kind;
    this.url = url.base;
    this.urls = { webtransport: url.webtransport, websocket: url.websocket };
    this.attempt = 0;
    this.retryAfter = undefined;
    this.closeFrame = null;
    this.token = token;
    this.tokenObtainedAt = now;
    this.skew = typeof welcome.time === 'number' ? welcome.time - now : 0;
    this.stats.sessions++;
    this.state = 'connected';
    this.startKeepalive();
    this.scheduleRefresh(false);
    for (const rs of this.rooms.values()) {
      if (rs.status === 'idle') this.sendSubscribe(rs);
    }
    for (const entry of this.outbox) {
      if (!entry.inFlight) this.sendKeyed(entry);
    }
    this.setState('connected', { transport: kind, session: welcome.session, url: url.base, reconnected: !initial });
  }

  /** The current session ended (transport loss, `Close`, dead keepalive): reconnect or stop. */
  sessionEnded(info) {
    if (this.state !== 'connected') return;
    this.teardownSession();
    for (const [, p] of this.pending) {
      if (p.kind === 'subscribe') continue; // the room is resubscribed in the next session
      if (p.kind === 'unsubscribe') p.resolve();
      else if (p.entry) p.entry.inFlight = false; // keyed publish: sent again in the next session
      else p.reject(disconnected(info.code, info.reason));
    }
    this.pending.clear();
    for (const rs of this.rooms.values()) {
      rs.status = 'idle';
      rs.buffer = [];
    }
    this.closeInfo = info;
    this.setState('disconnected', info);
    if (this.stopped) return;
    if (!this.autoReconnect || this.closeIsFinal(info)) {
      this.finish(info);
      return;
    }
    if (info.retryAfter !== undefined) this.retryAfter = info.retryAfter;
    this.run(false).catch((e) => this.emit('error', e));
  }

  teardownSession() {
    this.env.clearInterval(this.pingTimer);
    this.env.clearTimeout(this.refreshTimer);
    this.pingTimer = this.refreshTimer = undefined;
    const link = this.link;
    this.link = null;
    return link;
  }

  /** Stops the client for good: nothing is retried any more. */
  finish(info) {
    if (this.state === 'closed') return;
    this.stopped = true;
    this.env.clearTimeout(this.sleepTimer);
    this.sleepTimer = undefined;
    this.wake?.();
    this.wake = undefined;
    this.abortAttempt?.(new Error(info.reason));
    this.teardownSession()?.close();
    const error = () => disconnected(info.code, info.reason);
    for (const [, p] of this.pending) {
      if (p.kind === 'unsubscribe') p.resolve();
      else if (!p.entry && p.kind !== 'subscribe') p.reject(error());
    }
    this.pending.clear();
    for (const entry of this.outbox) entry.reject(error());
    this.outbox.clear();
    for (const rs of this.rooms.values()) {
      for (const w of rs.waiters) w.reject(error());
      rs.waiters = [];
      rs.status = 'idle';
    }
    this.closeInfo = info;
    this.setState('closed', info);
    this.resolveClosed(info);
  }

  send(frame, datagram = false) {
    const link = this.link;
    if (!link) return;
    if (datagram && link.sendDatagram(frame)) {
      this.stats.sent.datagram++;
    } else {
      link.send(frame);
      this.stats.sent[link.kind === 'websocket' ? 'websocket' : 'stream']++;
    }
    this.lastSent = this.env.now();
  }

  /**
   * Keepalive (§6.4): a Ping after `ping_interval` of silence (ours or the broker's); when a Ping
   * stays unanswered (no frame at all) for `idle_timeout`, the connection counts as dead.
   */
  startKeepalive() {
    const interval = this.welcome.pingInterval;
    this.lastSent = this.lastReceived = this.env.now();
    this.pingSentAt = undefined;
    if (!interval) return;
    this.pingTimer = this.env.setInterval(() => this.keepalive(), Math.max(250, Math.floor(interval / 4)));
  }

  keepalive() {
    if (this.state !== 'connected') return;
    const now = this.env.now();
    const interval = this.welcome.pingInterval;
    const idle = this.welcome.idleTimeout;
    if (this.pingSentAt !== undefined && idle && now - this.pingSentAt >= idle) {
      this.link?.close();
      this.sessionEnded({ code: 0, reason: `no frame from the broker within ${idle} ms of a Ping`, reconnect: true });
      return;
    }
    if (this.pingSentAt === undefined && (now - this.lastSent >= interval || now - this.lastReceived >= interval)) {
      this.send(encodeFrame({ type: 'Ping' }));
      this.pingSentAt = now;
    }
  }

  // ---- receiving -------------------------------------------------------------------------------

  /** One frame from the broker, from any channel of `link`. */
  receive(link, bytes, via) {
    if (link !== this.link) return;
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
    this.lastReceived = this.env.now();
    this.pingSentAt = undefined;
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
        if (frame.retryAfter !== undefined) error.retryAfter = frame.retryAfter;
        if (frame.id === undefined || !this.settle(frame.id, (p) => p.reject(error))) this.emit('error', error);
        break;
      }
      case 'Close': {
        // The session is over: the broker closes the transport next (WebSocket) or after the
        // client did (WebTransport, §2b), so close it now.
        this.closeFrame = frame;
        const info = {
          code: frame.code,
          reason: frame.message || codeName(frame.code),
          reconnect: frame.reconnect,
        };
        if (frame.retryAfter !== undefined) info.retryAfter = frame.retryAfter;
        link.close(link.kind === 'websocket' ? 1000 : 0);
        if (this.state === 'connected') this.sessionEnded(info);
        else this.onEarlyClose?.(info, true);
        break;
      }
      case 'Conflation':
        this.emit('conflation', { room: frame.room, conflated: frame.conflated });
        break;
      default:
        break;
    }
  }

  transportClosed(link, info) {
    if (link !== this.link) return;
    if (this.state === 'connected') {
      this.sessionEnded({ code: info.code, reason: info.reason || 'connection lost', reconnect: true });
    } else {
      this.onEarlyClose?.(info);
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
    const rs = this.rooms.get(frame.room);
    if (!rs) return;
    // Until its Subscribed is in, a room's events wait (on WebTransport they travel on another
    // stream than the Subscribed and may overtake it).
    if (rs.status === 'subscribing') rs.buffer.push([frame, via]);
    else if (rs.status === 'subscribed') this.deliver(rs, frame, via);
  }

  /** Moves the room's position on (or drops a duplicate) and hands the event to its subscribers. */
  deliver(rs, frame, via) {
    if (frame.epoch !== undefined && frame.epoch !== rs.epoch) {
      // The room's numbering restarted (§6.3): nothing can be recovered across it.
      const previous = { epoch: rs.epoch, seq: rs.seq };
      rs.epoch = frame.epoch;
      rs.seq = frame.seq;
      this.recovery(rs, { status: 'reset', recovered: false, cause: 'epoch', previous });
      if (this.rooms.get(rs.room) !== rs) return;
    } else if (rs.seq !== undefined && frame.seq <= rs.seq) {
      this.stats.staleDropped++; // a duplicate, or a datagram that arrived late
      return;
    } else {
      rs.seq = frame.seq;
    }
    const event = {
      room: frame.room,
      event: frame.event,
      data: frame.value,
      bytes: frame.data,
      seq: frame.seq,
      epoch: rs.epoch,
      via,
    };
    for (const record of [...rs.records]) {
      if (rs.records.has(record)) callSafely(record.onEvent, event);
    }
  }

  /** Tells the application (client listeners, then the room's subscriptions) how a room came back. */
  recovery(rs, info) {
    const value = { room: rs.room, ...info, epoch: rs.epoch, seq: rs.seq };
    this.emit('recovery', value);
    for (const record of [...rs.records]) {
      if (record.onRecovery) callSafely(record.onRecovery, value);
    }
  }

  // ---- requests --------------------------------------------------------------------------------

  request(frame, kind, room) {
    if (this.state !== 'connected') {
      return Promise.reject(disconnected(this.closeInfo?.code, this.stopped ? 'the client is closed' : 'not connected'));
    }
    return new Promise((resolve, reject) => {
      this.pending.set(frame.id, { resolve, reject, kind, room });
      this.send(encodeFrame(frame));
    });
  }

  /** Sends the room's Subscribe: with `since` = the held position when there is one to recover. */
  sendSubscribe(rs) {
    const id = this.nextId++;
    const since =
      rs.everSubscribed && rs.epoch !== undefined && rs.epoch !== 0 && rs.seq !== undefined
        ? { epoch: rs.epoch, seq: rs.seq }
        : undefined;
    rs.status = 'subscribing';
    rs.buffer = [];
    this.pending.set(id, {
      kind: 'subscribe',
      room: rs.room,
      resolve: (frame) => this.subscribed(rs, frame, since),
      reject: (error) => this.subscribeFailed(rs, error),
    });
    const frame = { type: 'Subscribe', id, room: rs.room };
    if (since) Object.assign(frame, since);
    this.send(encodeFrame(frame));
  }

  subscribed(rs, frame, since) {
    if (this.rooms.get(rs.room) !== rs) return; // left while the Subscribe was on its way
    const previous = rs.everSubscribed ? { epoch: rs.epoch, seq: rs.seq } : undefined;
    rs.epoch = frame.epoch;
    rs.seq = frame.seq;
    rs.status = 'subscribed';
    rs.everSubscribed = true;
    const waiters = rs.waiters;
    rs.waiters = [];
    if (since) {
      const recovered = frame.recovered === true;
      this.recovery(rs, { status: recovered ? 'recovered' : 'reset', recovered, cause: 'reconnect', previous });
    } else if (previous) {
      this.recovery(rs, { status: 'fresh', cause: 'reconnect', previous });
    }
    for (const w of waiters) {
      if (rs.records.has(w.record)) w.resolve(new Subscription(this, w.record, frame.seq));
    }
    const buffered = rs.buffer;
    rs.buffer = [];
    for (const [event, via] of buffered) {
      if (this.rooms.get(rs.room) !== rs || rs.status !== 'subscribed') break;
      this.deliver(rs, event, via);
    }
  }

  subscribeFailed(rs, error) {
    if (this.rooms.get(rs.room) !== rs) return;
    const waiters = rs.waiters;
    rs.waiters = [];
    for (const w of waiters) {
      rs.records.delete(w.record);
      w.reject(error);
    }
    if (rs.everSubscribed && rs.records.size > 0) {
      // A resubscription was refused (e.g. `forbidden` with the new token): the room is lost.
      this.rooms.delete(rs.room);
      error.room = rs.room;
      this.recovery(rs, { status: 'failed', cause: 'reconnect', error });
      for (const record of rs.records) if (record.subscription) record.subscription.active = false;
      this.emit('error', error);
    } else if (rs.records.size === 0) {
      this.rooms.delete(rs.room);
    } else {
      rs.status = 'idle';
    }
  }

  /**
   * Subscribes to `room`; `onEvent(event)` gets each of its events (`{room, event, data, bytes,
   * seq, epoch, via}`). Resolves with a {@link Subscription} once the broker confirmed (while the
   * client is reconnecting: once the next session did), rejects with a {@link RoomcastError}
   * (e.g. `invalid_room`, 4101). `onRecovery` gets the room's recovery outcomes after
   * reconnects (and resets), like the client's `recovery` event.
   */
  async subscribe(room, onEvent, options = {}) {
    if (typeof onEvent !== 'function') throw new TypeError('subscribe(room, onEvent): onEvent must be a function');
    if (options.onRecovery !== undefined && typeof options.onRecovery !== 'function') {
      throw new TypeError('subscribe: onRecovery must be a function');
    }
    while (this.leaving.has(room)) await this.leaving.get(room).catch(() => {});
    if (this.stopped) throw disconnected(this.closeInfo?.code, 'the client is closed');
    const record = { room, onEvent, onRecovery: options.onRecovery, subscription: null };
    let rs = this.rooms.get(room);
    if (!rs) {
      // status: `idle` (no Subscribe in this session), `subscribing`, `subscribed`.
      rs = { room, records: new Set(), waiters: [], buffer: [], status: 'idle', everSubscribed: false };
      rs.epoch = rs.seq = undefined; // the held position
      this.rooms.set(room, rs);
    }
    rs.records.add(record);
    if (rs.status === 'subscribed') return new Subscription(this, record, rs.seq);
    const subscription = new Promise((resolve, reject) => rs.waiters.push({ record, resolve, reject }));
    if (rs.status === 'idle' && this.state === 'connected') this.sendSubscribe(rs);
    return subscription;
  }

  async leave(record) {
    const rs = this.rooms.get(record.room);
    if (!rs || !rs.records.delete(record)) return;
    if (rs.records.size > 0) return;
    this.rooms.delete(rs.room);
    if (rs.status === 'idle' || this.state !== 'connected') return;
    const room = rs.room;
    const done = this.request({ type: 'Unsubscribe', id: this.nextId++, room }, 'unsubscribe', room).catch((e) => {
      if (!(e instanceof RoomcastError && (e.codeName === 'not_subscribed' || e.codeName === 'disconnected'))) throw e;
    });
    this.leaving.set(room, done);
    try {
      await done;
    } finally {
      if (this.leaving.get(room) === done) this.leaving.delete(room);
    }
  }

  /**
   * Publishes `event` with payload `data` (any value cbor-x encodes; with `encoded: true`, a
   * Uint8Array holding one CBOR item) to `room`. Resolves with `{seq}` (seq absent when the
   * broker did not know it) once the broker acknowledged, or at once with `ack: false`; rejects
   * with a {@link RoomcastError} carrying the broker's code, or `disconnected` when the session
   * ended before the Ack. With `key` (or `idempotent: true`, which makes a random one), the
   * publish is idempotent: it waits for its Ack across reconnects and is sent again, with the
   * same key, in the next session. With `datagram: true`, on WebTransport, the frame goes as a
   * datagram when it fits (it may be lost; meant for volatile rooms).
   */
  publish(room, event, data, options = {}) {
    if (this.stopped) return Promise.reject(disconnected(this.closeInfo?.code, 'the client is closed'));
    const payload = options.encoded ? data : encodePayload(data);
    if (!(payload instanceof Uint8Array)) throw new TypeError('encoded payload must be a Uint8Array');
    let key = options.key;
    if (key === undefined && options.idempotent === true) key = this.env.randomUUID();
    if (key !== undefined) {
      if (typeof key !== 'string') throw new TypeError('publish: key must be a string');
      const length = new TextEncoder().encode(key).length;
      if (length < 1 || length > MAX_IDEMPOTENCY_KEY_LEN) {
        const why = `idempotency key of ${length} bytes (1–${MAX_IDEMPOTENCY_KEY_LEN} allowed)`;
        return Promise.reject(new RoomcastError(4111, why));
      }
    }
    const ack = key !== undefined || options.ack !== false;
    const datagram = options.datagram === true;
    const frameOf = (id) => {
      const frame = { type: 'Publish', id, room, event, data: payload, ack };
      if (key !== undefined) frame.key = key;
      return encodeFrame(frame);
    };
    const maxFrame = this.welcome?.maxFrame;
    if (maxFrame) {
      const size = frameOf(this.nextId).length;
      if (size > maxFrame) return Promise.reject(new RangeError(`frame of ${size} bytes is over the broker's ${maxFrame}`));
    }
    if (key !== undefined) {
      return new Promise((resolve, reject) => {
        const entry = { room, key, frameOf, datagram, resolve, reject, inFlight: false, firstSent: undefined };
        this.outbox.add(entry);
        if (this.state === 'connected') this.sendKeyed(entry);
      });
    }
    if (this.state !== 'connected') return Promise.reject(disconnected(this.closeInfo?.code, 'not connected'));
    const id = this.nextId++;
    if (!ack) {
      this.send(frameOf(id), datagram);
      return Promise.resolve({});
    }
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve: (a) => resolve(a.seq === undefined ? {} : { seq: a.seq }), reject, kind: 'publish', room });
      this.send(frameOf(id), datagram);
    });
  }

  /** Sends (again) a keyed publish, unless its idempotency window has passed. */
  sendKeyed(entry) {
    const now = this.env.now();
    if (entry.firstSent !== undefined && now - entry.firstSent > this.idempotencyWindow) {
      this.outbox.delete(entry);
      entry.reject(
        disconnected(
          this.closeInfo?.code,
          `not acknowledged within ${this.idempotencyWindow} ms of its first sending; ` +
            'not sent again (it may or may not have been delivered)',
        ),
      );
      return;
    }
    const id = this.nextId++;
    entry.firstSent ??= now;
    entry.inFlight = true;
    this.pending.set(id, {
      kind: 'publish',
      room: entry.room,
      entry,
      resolve: (a) => {
        this.outbox.delete(entry);
        entry.resolve(a.seq === undefined ? { key: entry.key } : { seq: a.seq, key: entry.key });
      },
      reject: (e) => {
        this.outbox.delete(entry);
        entry.reject(e);
      },
    });
    this.send(entry.frameOf(id), entry.datagram);
  }

  /** Sends a Ping and resolves with the round-trip time in milliseconds. */
  async ping() {
    const start = performance.now();
    await this.request({ type: 'Ping', id: this.nextId++ }, 'ping');
    return performance.now() - start;
  }

  // ---- tokens ----------------------------------------------------------------------------------

  /** Arms the timer of the next `Refresh` from the current token's `exp` (with `getToken`). */
  scheduleRefresh(afterRefresh) {
    this.env.clearTimeout(this.refreshTimer);
    this.refreshTimer = undefined;
    if (!this.options.getToken || this.state !== 'connected') return;
    let delay = tokenRefreshDelay(this.token, { now: this.env.now(), obtainedAt: this.tokenObtainedAt, skew: this.skew });
    if (delay === undefined) return;
    if (afterRefresh) delay = Math.max(delay, MIN_REFRESH_INTERVAL_MS);
    this.armRefresh(delay);
  }

  armRefresh(delay) {
    this.env.clearTimeout(this.refreshTimer);
    this.refreshTimer = this.env.setTimeout(() => {
      this.refreshTimer = undefined;
      this.refreshToken().catch(() => {});
    }, delay);
  }

  /**
   * Gets a token from `getToken` and sends it in `Refresh`; resolves once the broker accepted it.
   * The client does this by itself before the token expires; a failure is reported as an
   * `error` (`refresh_failed`) and retried while the token is still valid.
   */
  async refreshToken() {
    if (!this.options.getToken) throw new TypeError('refreshToken() needs the getToken option');
    if (this.state !== 'connected') throw disconnected(this.closeInfo?.code, 'not connected');
    const session = this.welcome;
    let token;
    try {
      token = await this.options.getToken();
      if (typeof token !== 'string' || token === '') throw new TypeError('getToken() must resolve with a non-empty string');
    } catch (cause) {
      throw this.refreshFailed(session, cause, false);
    }
    // The session ended while the provider worked: the next one sends a token of its own.
    if (this.welcome !== session || this.state !== 'connected') return;
    const obtainedAt = this.env.now();
    try {
      await this.request({ type: 'Refresh', id: this.nextId++, token }, 'refresh');
    } catch (cause) {
      throw this.refreshFailed(session, cause, true);
    }
    if (this.welcome !== session) return;
    this.token = token;
    this.tokenObtainedAt = obtainedAt;
    this.stats.refreshes++;
    this.scheduleRefresh(true);
  }

  refreshFailed(session, cause, sent) {
    const why = `token refresh failed: ${cause?.detail || cause?.message || cause}`;
    const error = new RoomcastError(cause?.code ?? 0, why, 'refresh_failed');
    error.cause = cause;
    const sameSession = this.welcome === session && this.state === 'connected';
    // A failure of the provider, or a Refresh the broker refused (it ends the session with
    // unauthorized or token_expired); not a session lost for another reason meanwhile.
    const refused = sent && (cause?.code === 4403 || cause?.code === 4419);
    if (sameSession || refused) this.emit('error', error);
    if (sameSession) {
      // Try again while the token still holds (the broker closes the session at its exp; the
      // reconnect then asks the provider again).
      const exp = jwtClaims(this.token)?.exp;
      const left = typeof exp === 'number' ? exp * 1000 - this.skew - this.env.now() : 0;
      if (left > MIN_REFRESH_INTERVAL_MS) this.armRefresh(Math.min(10000, Math.max(MIN_REFRESH_INTERVAL_MS, left / 4)));
    }
    return error;
  }

  /** Ends the session and stops reconnecting. */
  close() {
    if (this.state === 'closed') return this.closedPromise;
    const info = { code: 4000, reason: 'closed by the client', reconnect: false };
    if (this.state === 'connected') {
      this.stopped = true;
      this.link?.close();
      this.sessionEnded(info);
    }
    this.finish(info);
    return this.closedPromise;
  }
}

function callSafely(fn, value) {
  try {
    fn(value);
  } catch (e) {
    // A listener's bug must not break the client.
    setTimeout(() => {
      throw e;
    });
  }
}

/** A subscription to one room, from {@link Client.subscribe}. */
export class Subscription {
  constructor(client, record, startSeq) {
    this.client = client;
    this.record = record;
    record.subscription = this;
    /** The room. */
    this.room = record.room;
    /** The room's last `seq` when the subscription took effect. */
    this.startSeq = startSeq;
    this.active = true;
  }

  /** The position the client holds for the room (`{epoch, seq}`). */
  get position() {
    return this.active ? this.client.position(this.room) : undefined;
  }

  /** Stops delivery at once; resolves once the broker confirmed (when this was the room's last subscription). */
  async unsubscribe() {
    if (!this.active) return;
    this.active = false;
    await this.client.leave(this.record);
  }
}
