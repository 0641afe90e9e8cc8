//! The node's listeners, one module per transport: [`tcp`] (HTTP/1 with upgrades, TLS,
//! WebSocket) and [`quic`] (WebTransport endpoints). Each accepts connections until the
//! listeners close (a drain window after shutdown began, [`crate::node::Shared::listeners_closed`])
//! and hands session requests to [`crate::accept`].
//!
//! Owns sockets and connection-level settings; must not judge or run sessions.

pub(crate) mod quic;
pub(crate) mod tcp;
