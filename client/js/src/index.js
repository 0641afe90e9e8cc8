// @roomcast/client: the browser client of the roomcast broker. See README.md.

export {
  Client,
  DEFAULT_BACKOFF_BASE_MS,
  DEFAULT_BACKOFF_CAP_MS,
  DEFAULT_IDEMPOTENCY_WINDOW_MS,
  DEFAULT_WEBSOCKET_TIMEOUT_MS,
  DEFAULT_WEBTRANSPORT_TIMEOUT_MS,
  RoomcastError,
  Subscription,
  backoffDelay,
  brokerUrls,
  connect,
  jwtClaims,
  tokenRefreshDelay,
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
