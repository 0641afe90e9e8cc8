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
  /** Authentication token sent in Hello. */
  token?: string;
  /**
   * SHA-256 of the broker's certificate (64 hex digits, colons allowed, or the bytes), passed
   * to WebTransport as `serverCertificateHashes`: for the broker's development certificate
   * (served at `GET /cert-hash`).
   */
  certHash?: string | Uint8Array | ArrayBuffer;
  /** Transports in the order they are tried. Default `['webtransport', 'websocket']`. */
  transports?: TransportKind[];
  /** Overrides the WebTransport URL derived from the broker URL. */
  webTransportUrl?: string;
  /** Overrides the WebSocket URL derived from the broker URL. */
  webSocketUrl?: string;
  /** Time a WebTransport attempt may take before falling back, ms. Default 3000. */
  webTransportTimeout?: number;
  /** Time a WebSocket attempt may take, ms. Default 10000. */
  webSocketTimeout?: number;
  /** Called on every state change, from the first `connecting` on. */
  onState?: (state: StateChange) => void;
  /** Called for errors that belong to no request (an Error for a fire-and-forget publish …). */
  onError?: (error: Error) => void;
}

export type StateChange =
  | { state: 'connecting'; transport: TransportKind; url: string }
  | { state: 'connected'; transport: TransportKind; session: string }
  | { state: 'disconnected'; code: number; reason: string; reconnect: boolean };

/** An event of a subscribed room. */
export interface RoomEvent {
  room: string;
  /** Event name. */
  event: string;
  /** The payload, decoded from CBOR (maps become plain objects). */
  data: unknown;
  /** The payload as sent: one CBOR item. */
  bytes: Uint8Array;
  /** Per-room sequence number: compare to drop stale values of volatile rooms. */
  seq: number;
  /** The channel it arrived on. */
  via: Channel;
}

export interface SubscribeOptions {
  /** Drop events whose seq is not above the last delivered one (volatile rooms). */
  latestOnly?: boolean;
}

export interface PublishOptions {
  /** Wait for the broker's Ack (default true). */
  ack?: boolean;
  /** On WebTransport, send as a datagram when it fits (may be lost). */
  datagram?: boolean;
  /** `data` is already one encoded CBOR item (a Uint8Array). */
  encoded?: boolean;
}

/** A refused request or a session that ended under it. */
export class RoomcastError extends Error {
  /** Protocol code, e.g. 4101. */
  readonly code: number;
  /** Its name, e.g. `invalid_room` (`disconnected` when the session ended). */
  readonly codeName: string;
  /** The broker's message. */
  readonly detail: string;
}

export class Subscription {
  readonly room: string;
  /** The room's last seq when the subscription took effect. */
  readonly startSeq: number;
  unsubscribe(): Promise<void>;
}

export interface CloseInfo {
  code: number;
  reason: string;
  reconnect: boolean;
}

export class Client {
  readonly state: 'connecting' | 'connected' | 'disconnected';
  readonly transport: TransportKind | null;
  readonly sessionId: string | undefined;
  readonly urls: { webtransport: string; websocket: string };
  readonly fallbacks: { transport: TransportKind; error: string }[];
  readonly closeInfo: CloseInfo | null;
  readonly closed: Promise<CloseInfo>;
  readonly stats: {
    received: Record<Channel, number>;
    sent: Record<Channel, number>;
    staleDropped: number;
  };
  on(kind: 'state', fn: (state: StateChange) => void): () => void;
  on(kind: 'error', fn: (error: Error) => void): () => void;
  subscribe(room: string, onEvent: (event: RoomEvent) => void, options?: SubscribeOptions): Promise<Subscription>;
  publish(room: string, event: string, data: unknown, options?: PublishOptions): Promise<{ seq?: number }>;
  ping(): Promise<number>;
  close(): Promise<CloseInfo>;
}

/** Connects (WebTransport first, then WebSocket) and resolves once the session is open. */
export function connect(url: string, options?: ConnectOptions): Promise<Client>;

/** The WebTransport and WebSocket endpoints a broker URL stands for. */
export function brokerUrls(url: string): { webtransport: string; websocket: string };

export const DEFAULT_WEBTRANSPORT_TIMEOUT_MS: number;
export const DEFAULT_WEBSOCKET_TIMEOUT_MS: number;
