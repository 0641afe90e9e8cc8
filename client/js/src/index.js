// @roomcast/client: the browser client of the roomcast broker. See README.md.

export {
  Client,
  DEFAULT_WEBSOCKET_TIMEOUT_MS,
  DEFAULT_WEBTRANSPORT_TIMEOUT_MS,
  RoomcastError,
  Subscription,
  brokerUrls,
  connect,
} from './client.js';
export {
  CODES,
  DecodeError,
  MAX_IDEMPOTENCY_KEY_LEN,
  PROTOCOL_VERSION,
  codeName,
  decodePayload,
  encodePayload,
} from './codec.js';
