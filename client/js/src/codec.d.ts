/** Newest protocol version this client speaks. */
export const PROTOCOL_VERSION: number;
/** Key table (PROTOCOL.md §3.1): number → [protocol name, CBOR type]. */
export const KEYS: Readonly<Record<number, readonly [string, 'uint' | 'text' | 'bytes' | 'bool']>>;
/** Frame types (§3.2): number → [name, sender, required fields, optional fields with defaults]. */
export const FRAME_TYPES: Readonly<
  Record<number, readonly [string, 'client' | 'broker', readonly string[], Readonly<Record<string, unknown>>]>
>;
/** The code table (§7): number → [name, sent in, retry/reconnect]. */
export const CODES: Readonly<Record<number, readonly [string, 'Error' | 'Close', boolean]>>;
/** Deepest payload nesting a broker accepts by default (§4). */
export const MAX_PAYLOAD_DEPTH: number;
/** Longest idempotency key (`Publish.key`) a broker accepts, in bytes (§6.3); at least 1. */
export const MAX_IDEMPOTENCY_KEY_LEN: number;

/** The name of a code (`"invalid_room"` for 4101), or undefined outside the table. */
export function codeName(code: number): string | undefined;

/** A frame as a plain object; `type` names the frame type, fields use camelCase. */
export type Frame =
  | { type: 'Hello'; version: number; token?: string }
  /** `seq` and `epoch` together are the position `since` to recover from (§6.3): both or neither. */
  | ({ type: 'Subscribe'; id: number; room: string } & ({ seq?: undefined; epoch?: undefined } | { seq: number; epoch: number }))
  | { type: 'Unsubscribe'; id: number; room: string }
  | {
      type: 'Publish';
      id?: number;
      room: string;
      event: string;
      data: Uint8Array;
      ack?: boolean;
      /** Idempotency key, 1–64 bytes (§6.3). */
      key?: string;
    }
  | { type: 'Ping'; id?: number }
  | { type: 'Refresh'; id: number; token: string }
  | {
      type: 'Welcome';
      version: number;
      session: string;
      time: number;
      maxFrame: number;
      pingInterval: number;
      idleTimeout: number;
    }
  | {
      type: 'Subscribed';
      id: number;
      room: string;
      /** With `epoch`: the position the room's events that follow continue from (§6.3). */
      seq: number;
      /** The room's history epoch; 0: the room keeps no history (never send `since` for it). */
      epoch: number;
      /** Present exactly when the Subscribe carried `seq` and `epoch`. */
      recovered?: boolean;
    }
  | { type: 'Unsubscribed'; id: number; room: string }
  | {
      type: 'Event';
      room: string;
      event: string;
      data: Uint8Array;
      seq: number;
      /** Present only when the room's numbering restarted: the room's epoch from this event on. */
      epoch?: number;
      readonly value?: unknown;
    }
  | { type: 'Ack'; id: number; seq?: number }
  | { type: 'Error'; id?: number; code: number; message: string; retryAfter?: number }
  | { type: 'Pong'; id?: number }
  | {
      type: 'Close';
      code: number;
      message: string;
      reconnect: boolean;
      /** Milliseconds to wait at least before reconnecting. */
      retryAfter?: number;
    }
  /** The subscriber receives only the latest event per conflation key (`conflated: true`) or every event again. */
  | { type: 'Conflation'; room: string; conflated: boolean };

/** Why a frame was refused: `kind` is the reference crate's DecodeError variant (§3.5). */
export class DecodeError extends Error {
  readonly kind: 'Malformed' | 'TrailingBytes' | 'DuplicateKey' | 'MissingField' | 'UnknownType' | 'InvalidValue';
  readonly details: Record<string, unknown>;
  /** As written in PROTOCOL.md §9, e.g. `MissingField frame=Subscribe field=room`. */
  render(): string;
}

/** Encodes a frame canonically (ascending keys, shortest integers). */
export function encodeFrame(frame: Frame): Uint8Array;
/** Decodes a broker frame as a client does, with the value checks; an Event carries `value`. */
export function decodeServerFrame(bytes: Uint8Array): Frame;
/** Decodes a client frame as the broker does. */
export function decodeClientFrame(bytes: Uint8Array): Frame;
/** Encodes a value as one CBOR item (the content of `data`). */
export function encodePayload(value: unknown): Uint8Array;
/** Decodes the content of `data` (maps become plain objects). */
export function decodePayload(bytes: Uint8Array): unknown;
/** Checks a room name (§5): null when valid, else the reference NameError variant. */
export function roomNameError(name: string): string | null;
/** Checks an event name (§5): null when valid, else the reference NameError variant. */
export function eventNameError(name: string): string | null;

/** A QUIC variable-length integer (RFC 9000 §16). */
export function encodeVarint(n: number): Uint8Array;
/** A frame with its varint length in front (WebTransport stream framing, §2b). */
export function lengthPrefixed(frame: Uint8Array): Uint8Array;
/** Splits a stream of length-prefixed frames. */
export class FrameSplitter {
  constructor(maxFrame?: number);
  push(chunk: Uint8Array): Uint8Array[];
  readonly pending: number;
}
