export {
  CODES,
  DecodeError,
  MAX_IDEMPOTENCY_KEY_LEN,
  PROTOCOL_VERSION,
  codeName,
  decodePayload,
  encodePayload,
} from './codec.js';

/** `webtransport` (HTTP/3 over QUIC) or `websocket`. */
export type TransportKind = 'webtransport' | 'websocket';

/** The channel a frame arrived on. */
export type Channel = 'websocket' | 'stream' | 'datagram';

export interface ConnectOptions {
  /**
   * More broker URLs (nodes of one cluster), after the `url` argument if there is one. Each
   * attempt goes to the next URL, round robin.
   */
  urls?: string[];
  /** Authentication token sent in Hello (use `getToken` for tokens that expire). */
  token?: string;
  /**
   * Token provider: called for the Hello of every (re)connect attempt, and before the
   * session's token expires (read from the JWT's `exp`, unverified) to send `Refresh`. A failed
   * refresh is reported as an `error` with `codeName` `refresh_failed`.
   */
  getToken?: () => string | Promise<string>;
  /**
   * SHA-256 of the broker's certificate (64 hex digits, colons allowed, or the bytes), passed
   * to WebTransport as `serverCertificateHashes`: for the broker's development certificate
   * (served at `GET /cert-hash`). An array accepts any of several (one per broker URL).
   */
  certHash?: string | Uint8Array | ArrayBuffer | Array<string | Uint8Array | ArrayBuffer>;
  /** Transports in the order they are tried at each URL. Default `['webtransport', 'websocket']`. */
  transports?: TransportKind[];
  /** Overrides the WebTransport URL derived from the broker URL (single URL only). */
  webTransportUrl?: string;
  /** Overrides the WebSocket URL derived from the broker URL (single URL only). */
  webSocketUrl?: string;
  /** Time a WebTransport attempt may take before falling back, ms. Default 3000. */
  webTransportTimeout?: number;
  /** Time a WebSocket attempt may take, ms. Default 10000. */
  webSocketTimeout?: number;
  /** Reconnect when a session ends (default true). `false`: one session, as in earlier versions. */
  reconnect?: boolean;
  /** Backoff base, ms (default 200): attempt n waits a random delay in [0, min(cap, base · 2^n)]. */
  backoffBase?: number;
  /** Backoff cap, ms (default 10000). */
  backoffCap?: number;
  /**
   * How long after its first sending a keyed publish may still be sent again, ms (default
   * 120000, the broker's default dedup window); later it fails with `disconnected` instead.
   */
  idempotencyWindow?: number;
  /** Called on every state change, from the first `connecting` on. */
  onState?: (state: StateChange) => void;
  /** Called for errors that belong to no request (an Error for a fire-and-forget publish, a failed refresh …). */
  onError?: (error: Error) => void;
  /** Called with each room's recovery outcome after a reconnect, and when a room is reset. */
  onRecovery?: (recovery: RoomRecovery) => void;
  /** @internal Test hook: clock, timers, randomness and transports. */
  environment?: Record<string, unknown>;
}

export type StateChange =
  /** One transport attempt at one URL. */
  | { state: 'connecting'; transport: TransportKind; url: string; attempt: number }
  | { state: 'connected'; transport: TransportKind; session: string; url: string; reconnected: boolean }
  /** A session ended; `reconnecting` follows unless the client stops (`closed`). */
  | ({ state: 'disconnected' } & CloseInfo)
  /** Waiting `delay` ms before attempt `attempt` (0, 1, … since the last Welcome) to `url`. */
  | { state: 'reconnecting'; attempt: number; delay: number; url: string }
  /** The client stopped for good: `close()`, a Close with reconnect false, or a failed first connect. */
  | ({ state: 'closed' } & CloseInfo);

/** A room's position: `seq` within `epoch` (epoch 0: the room keeps no history). */
export interface Position {
  epoch: number;
  seq: number;
}

/** An event of a subscribed room. */
export interface RoomEvent {
  room: string;
  /** Event name. */
  event: string;
  /** The payload, decoded from CBOR (maps become plain objects). */
  data: unknown;
  /** The payload as sent: one CBOR item. */
  bytes: Uint8Array;
  /** Per-room sequence number; increasing within an epoch (with gaps in cluster mode). */
  seq: number;
  /** The room's epoch this event belongs to (0: no history). */
  epoch: number;
  /** The channel it arrived on. */
  via: Channel;
}

/**
 * How a room came back after a reconnect (`cause: 'reconnect'`), or that its numbering
 * restarted (`cause: 'epoch'`).
 *
 * - `recovered` (`recovered: true`): every event after the held position follows; nothing missed.
 * - `reset` (`recovered: false`): the events in between are lost to this client; resync the
 *   state they describe from its source of truth, then apply the events that follow.
 * - `fresh`: subscribed again without a position (a volatile room, epoch 0): what was published
 *   meanwhile is not recovered.
 * - `failed`: the broker refused the resubscription (`error`); the room is dropped.
 */
export interface RoomRecovery {
  room: string;
  status: 'recovered' | 'reset' | 'fresh' | 'failed';
  /** `Subscribed.recovered` when the resubscription carried a position; false for an epoch reset. */
  recovered?: boolean;
  cause: 'reconnect' | 'epoch';
  /** The position held before. */
  previous?: { epoch: number | undefined; seq: number | undefined };
  /** The position held now. */
  epoch: number | undefined;
  seq: number | undefined;
  /** With `failed`: the broker's refusal. */
  error?: RoomcastError;
}

export interface SubscribeOptions {
  /** Called with this room's recovery outcomes (see {@link RoomRecovery}). */
  onRecovery?: (recovery: RoomRecovery) => void;
  /**
   * Kept for compatibility: every room now drops events whose seq is not above the held one
   * (duplicates, late datagrams).
   */
  latestOnly?: boolean;
}

export interface PublishOptions {
  /** Wait for the broker's Ack (default true; a keyed publish always waits). */
  ack?: boolean;
  /** On WebTransport, send as a datagram when it fits (may be lost). */
  datagram?: boolean;
  /** `data` is already one encoded CBOR item (a Uint8Array). */
  encoded?: boolean;
  /**
   * Idempotency key, 1–64 bytes, unique per event: the publish survives reconnects (sent again
   * with the same key; the broker delivers it once within its dedup window).
   */
  key?: string;
  /** Make a random key (`crypto.randomUUID()`), as with `key`. */
  idempotent?: boolean;
}

export interface PublishResult {
  /** The event's seq, when the broker knew it. */
  seq?: number;
  /** The idempotency key, for a keyed publish. */
  key?: string;
}

/** A refused request or a session that ended under it. */
export class RoomcastError extends Error {
  /** Protocol code, e.g. 4101 (0 for the client's own failures). */
  readonly code: number;
  /**
   * Its name, e.g. `invalid_room`; `disconnected` when the session ended under the request,
   * `refresh_failed` for a token refresh, `token_unavailable` when `getToken` failed.
   */
  readonly codeName: string;
  /** The broker's message. */
  readonly detail: string;
  /** With `rate_limited`: ms after which the request may succeed. */
  readonly retryAfter?: number;
  /** For a refused resubscription: the room. */
  readonly room?: string;
}

export class Subscription {
  readonly room: string;
  /** The room's last seq when the subscription took effect. */
  readonly startSeq: number;
  /** False once unsubscribed (or its room was dropped after a refused resubscription). */
  readonly active: boolean;
  /** The position the client holds for the room. */
  readonly position: Position | undefined;
  unsubscribe(): Promise<void>;
}

export interface CloseInfo {
  code: number;
  reason: string;
  reconnect: boolean;
  /** From the broker's Close: ms to wait at least before reconnecting. */
  retryAfter?: number;
}

export type ClientState = 'connecting' | 'connected' | 'disconnected' | 'reconnecting' | 'closed';

export class Client {
  readonly state: ClientState;
  readonly transport: TransportKind | null;
  readonly sessionId: string | undefined;
  /** The broker URL of the current (or last) session. */
  readonly url: string;
  /** Its endpoints. */
  readonly urls: { webtransport: string; websocket: string };
  /** Every broker URL, in rotation order. */
  readonly brokerList: string[];
  /** The attempts that failed before the one in use (in the last connect or reconnect). */
  readonly fallbacks: { url: string; transport: TransportKind | null; error: string }[];
  /** How the last session ended. */
  readonly closeInfo: CloseInfo | null;
  /** Resolves once the client stopped for good (state `closed`). */
  readonly closed: Promise<CloseInfo>;
  readonly stats: {
    received: Record<Channel, number>;
    sent: Record<Channel, number>;
    /** Events dropped as not above the held seq (duplicates, late datagrams). */
    staleDropped: number;
    /** Sessions that reached Welcome (1 + reconnects). */
    sessions: number;
    /** Token refreshes the broker accepted. */
    refreshes: number;
  };
  on(kind: 'state', fn: (state: StateChange) => void): () => void;
  on(kind: 'error', fn: (error: Error) => void): () => void;
  on(kind: 'recovery', fn: (recovery: RoomRecovery) => void): () => void;
  on(kind: 'conflation', fn: (change: { room: string; conflated: boolean }) => void): () => void;
  /**
   * Resolves once subscribed (while reconnecting: once the next session is); the subscription
   * outlives reconnects.
   */
  subscribe(room: string, onEvent: (event: RoomEvent) => void, options?: SubscribeOptions): Promise<Subscription>;
  publish(room: string, event: string, data: unknown, options?: PublishOptions): Promise<PublishResult>;
  /** The position held for a room. */
  position(room: string): Position | undefined;
  ping(): Promise<number>;
  /** Sends `Refresh` with a token from `getToken` now (the client also does it by itself). */
  refreshToken(): Promise<void>;
  /** Ends the session and stops reconnecting. */
  close(): Promise<CloseInfo>;
}

/**
 * Connects (at each URL WebTransport first, then WebSocket; each URL tried once) and resolves
 * once a session is open; the client then reconnects by itself.
 */
export function connect(url: string | string[], options?: ConnectOptions): Promise<Client>;
export function connect(options: ConnectOptions & { urls: string[] }): Promise<Client>;

/** The WebTransport and WebSocket endpoints a broker URL stands for. */
export function brokerUrls(url: string): { webtransport: string; websocket: string };

export const DEFAULT_WEBTRANSPORT_TIMEOUT_MS: number;
export const DEFAULT_WEBSOCKET_TIMEOUT_MS: number;
/** 200 ms. */
export const DEFAULT_BACKOFF_BASE_MS: number;
/** 10 s. */
export const DEFAULT_BACKOFF_CAP_MS: number;
/** 120 s. */
export const DEFAULT_IDEMPOTENCY_WINDOW_MS: number;

/** The backoff before reconnect attempt `attempt`: uniform in [0, min(cap, base · 2^attempt)] ms. */
export function backoffDelay(attempt: number, options?: { base?: number; cap?: number; random?: () => number }): number;
/** A JWT's payload, decoded without verification; undefined when `token` is not a JWT. */
export function jwtClaims(token: string): Record<string, unknown> | undefined;
/**
 * Ms from `now` until the client refreshes `token`: at 80 % of its lifetime (`iat`, else
 * `obtainedAt`, to `exp`) or 30 s before `exp`, whichever is earlier, not before half of it;
 * undefined without a numeric `exp`. `skew`: broker clock minus local clock, ms.
 */
export function tokenRefreshDelay(token: string, options?: { now?: number; obtainedAt?: number; skew?: number }): number | undefined;
