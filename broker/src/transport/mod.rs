//! The one session I/O abstraction: receive frame bytes, send a batch of frame bytes, close
//! with a code. Adapters (`ws`) map a concrete transport onto it; they hold no protocol logic.

use std::future::Future;

use bytes::Bytes;
use roomcast_protocol::Code;

use crate::wire::{Lane, Outgoing};

pub(crate) mod ws;
pub(crate) mod wt;

/// Transport-level failures, as the session needs to tell them apart.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TransportError {
    /// The peer sent a message larger than the frame limit.
    #[error("message exceeds the frame size limit")]
    TooLarge,
    /// The peer broke the transport's own rules (e.g. a WebSocket text message).
    #[error("transport protocol violation: {0}")]
    Protocol(String),
    /// Frames written but not yet accepted by the transport exceed the session's cap.
    #[error("the transport's write backlog exceeds its cap")]
    Backlogged,
    /// The connection failed or was reset.
    #[error("transport I/O: {0}")]
    Io(String),
}

/// What a reader produced.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// One protocol frame.
    Frame(Bytes),
    /// One protocol frame that arrived as a QUIC datagram: it counts against the session's
    /// datagram bucket as well (datagrams are not flow-controlled by QUIC).
    Datagram(Bytes),
    /// Transport-level bytes owed to the peer (e.g. a WebSocket pong or close reply), to be
    /// handed to [`FrameWriter::send_control`].
    Control(Bytes),
    /// The peer closed the transport.
    Closed,
}

/// Receiving half of a session transport.
pub(crate) trait FrameReader: Send {
    /// The next frame, control reply or end. Must be cancel-safe: dropping the future loses
    /// nothing.
    fn recv(&mut self) -> impl Future<Output = Result<Incoming, TransportError>> + Send;

    /// After the session's `Close`: reads and drops what the peer still sends, without
    /// decoding it, until the peer closes its side or `limit` bytes were dropped. A TCP
    /// socket closed with unread input is reset, and the reset can destroy the `Close` frame
    /// before the client reads it; transports without that problem return at once.
    fn discard_input(&mut self, _limit: usize) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Sending half of a session transport.
pub(crate) trait FrameWriter: Send {
    /// Takes every frame in `batch` (emptying it), each for its lane's channel where the
    /// transport has several, and writes them, ideally in one system call per channel.
    /// A writer may return before all is written and keep the rest as its backlog.
    /// Cancel-safe: a call dropped before it returns never leaves half a frame unaccounted
    /// for; the next call (or [`FrameWriter::finish_frame`]) goes on where it stopped.
    fn send_batch(
        &mut self,
        batch: &mut Vec<Outgoing>,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Whether frames of earlier batches still wait for the transport (writers that return
    /// from `send_batch` before everything was written, so that one blocked channel does not
    /// hold up the others).
    fn has_backlog(&self) -> bool {
        false
    }

    /// Writes the backlog, at least until one channel has caught up. Cancel-safe: progress is
    /// kept when the future is dropped.
    fn write_backlog(&mut self) -> impl Future<Output = Result<(), TransportError>> + Send {
        async { Ok(()) }
    }

    /// Whether the writer holds so much unwritten that the session should ask
    /// [`FrameWriter::holds`] which frames to leave in its outbox for now.
    fn backpressured(&self) -> bool {
        false
    }

    /// Whether frames of `lane` should stay in the session's outbox for now (their channel
    /// is backlogged): there they can be conflated, dropped (volatile) or count against its
    /// cap, and frames of other channels are not held up behind them. Asked only while
    /// [`FrameWriter::backpressured`]; frames are held at least until the next time
    /// [`FrameWriter::write_backlog`] returns.
    fn holds(&self, _lane: Lane) -> bool {
        false
    }

    /// Completes the frame an abandoned [`FrameWriter::send_batch`] left half-written and
    /// forgets the frames queued after it: a slow consumer's close, after which the client
    /// gets whole frames only, and then its `Close`. Writers that never cut a frame only
    /// forget what they hold.
    fn finish_frame(&mut self) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Writes transport-level bytes produced as [`Incoming::Control`].
    fn send_control(
        &mut self,
        raw: Bytes,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Closes the transport with the code's transport-level mapping.
    fn close(&mut self, code: Code) -> impl Future<Output = Result<(), TransportError>> + Send;
}
