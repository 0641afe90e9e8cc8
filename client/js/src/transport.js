// The two ways frames travel (docs/PROTOCOL.md §2 and §2b), behind one small interface:
//
//   open(handlers) → Promise, resolved once frames can be sent;
//   send(frame)           one frame on the reliable channel;
//   sendDatagram(frame)   one frame as a datagram, `false` when the transport cannot;
//   close(code, reason);
//   handlers.frame(bytes, via)  for every frame received, `via` naming the channel;
//   handlers.closed({code, reason}) once, when the transport has ended.
//
// No protocol logic lives here: frames are opaque bytes.

import { FrameSplitter, lengthPrefixed } from './codec.js';

/** WebSocket (`ws://host:port/ws`): one binary message per frame. */
export class WebSocketTransport {
  constructor(url) {
    this.kind = 'websocket';
    this.url = url;
    this.socket = null;
  }

  open(handlers) {
    return new Promise((resolve, reject) => {
      let socket;
      try {
        socket = new WebSocket(this.url);
      } catch (e) {
        reject(e);
        return;
      }
      this.socket = socket;
      socket.binaryType = 'arraybuffer';
      let opened = false;
      socket.onopen = () => {
        opened = true;
        resolve();
      };
      socket.onmessage = (message) => {
        if (typeof message.data === 'string') {
          // The protocol has no text messages (§2); the broker never sends one.
          handlers.error?.(new Error('text message from the broker'));
          return;
        }
        handlers.frame(new Uint8Array(message.data), 'websocket');
      };
      socket.onclose = (event) => {
        if (!opened) reject(new Error(`WebSocket to ${this.url} failed (close code ${event.code})`));
        else handlers.closed({ code: event.code, reason: event.reason });
      };
    });
  }

  send(frame) {
    this.socket.send(frame);
  }

  sendDatagram() {
    return false;
  }

  close(code = 1000, reason = '') {
    try {
      this.socket?.close(code, reason);
    } catch {
      // Already closed.
    }
  }
}

/**
 * WebTransport (`https://host:port/wt`): one bidirectional control stream opened by the client
 * (Hello first), one unidirectional stream per room from the broker, datagrams for volatile
 * rooms. Frames on streams carry a QUIC varint length in front; a datagram is one whole frame.
 */
export class WebTransportTransport {
  /** `certHashes`: SHA-256 hashes (bytes) of certificates to accept, one or an array of them. */
  constructor(url, certHashes) {
    this.kind = 'webtransport';
    this.url = url;
    this.certHashes = certHashes === undefined || Array.isArray(certHashes) ? (certHashes ?? []) : [certHashes];
    this.session = null;
    this.writer = null;
    this.datagramWriter = null;
    this.ended = false;
  }

  async open(handlers) {
    if (typeof WebTransport === 'undefined') throw new Error('this browser has no WebTransport');
    const options = {};
    if (this.certHashes.length > 0) {
      options.serverCertificateHashes = this.certHashes.map((value) => ({ algorithm: 'sha-256', value }));
    }
    const session = new WebTransport(this.url, options);
    this.session = session;
    let reported = false;
    const ended = (info) => {
      this.ended = true;
      if (reported) return;
      reported = true;
      handlers.closed(info);
    };
    // Observed from the start so a failed connect leaves no unhandled rejection.
    const closed = session.closed.then(
      (info) => ({ code: info?.closeCode ?? 0, reason: info?.reason ?? '' }),
      (e) => ({ code: 0, reason: String(e?.message ?? e) }),
    );
    await session.ready;
    closed.then(ended);
    const control = await session.createBidirectionalStream();
    this.writer = control.writable.getWriter();
    const datagrams = session.datagrams;
    const writable = typeof datagrams.createWritable === 'function' ? datagrams.createWritable() : datagrams.writable;
    this.datagramWriter = writable.getWriter();
    this.datagramWriter.closed.catch(() => {});
    this.readStream(control.readable, handlers);
    this.acceptRoomStreams(session.incomingUnidirectionalStreams, handlers);
    this.readDatagrams(datagrams.readable, handlers);
  }

  /** Reads length-prefixed frames from one stream until it ends. */
  async readStream(readable, handlers) {
    const reader = readable.getReader();
    const splitter = new FrameSplitter();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        for (const frame of splitter.push(value)) handlers.frame(frame, 'stream');
      }
      if (splitter.pending > 0 && !this.ended) handlers.error?.(new Error('stream ended inside a frame'));
    } catch (e) {
      if (!this.ended) handlers.error?.(e);
    }
  }

  /** Starts a reader for every unidirectional stream the broker opens (one per room). */
  async acceptRoomStreams(streams, handlers) {
    const reader = streams.getReader();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        this.readStream(value, handlers);
      }
    } catch {
      // The session ended; `closed` reports it.
    }
  }

  async readDatagrams(readable, handlers) {
    const reader = readable.getReader();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        handlers.frame(value, 'datagram');
      }
    } catch {
      // The session ended; `closed` reports it.
    }
  }

  send(frame) {
    this.writer.write(lengthPrefixed(frame)).catch(() => {});
  }

  sendDatagram(frame) {
    const max = this.session?.datagrams?.maxDatagramSize ?? 0;
    if (!this.datagramWriter || frame.length > max) return false;
    this.datagramWriter.write(frame).catch(() => {});
    return true;
  }

  close(code = 0, reason = '') {
    this.ended = true;
    try {
      this.session?.close({ closeCode: code, reason });
    } catch {
      // Already closed.
    }
  }
}
