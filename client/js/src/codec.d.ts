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

/** The name of a code (`"invalid_room"` for 4101), or undefined outside the table. */
export function codeName(code: number): string | undefined;

/** A frame as a plain object; `type` names the frame type, fields use camelCase. */
export type Frame =
  | { type: 'Hello'; version: number; token?: string }
  | { type: 'Subscribe'; id: number; room: string }
  | { type: 'Unsubscribe'; id: number; room: string }
  | { type: 'Publish'; id?: number; room: string; event: string; data: Uint8Array; ack?: boolean }
  | { type: 'Ping'; id?: number }
  | {
      type: 'Welcome';
      version: number;
      session: string;
      time: number;
      maxFrame: number;
      pingInterval: number;
      idleTimeout: number;
    }
  | { type: 'Subscribed'; id: number; room: string; seq: number }
  | { type: 'Unsubscribed'; id: number; room: string }
  | { type: 'Event'; room: string; event: string; data: Uint8Array; seq: number; readonly value?: unknown }
  | { type: 'Ack'; id: number; seq?: number }
  | { type: 'Error'; id?: number; code: number; message: string }
  | { type: 'Pong'; id?: number }
  | { type: 'Close'; code: number; message: string; reconnect: boolean };

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
