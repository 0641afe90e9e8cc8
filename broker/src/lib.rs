//! roomcast-broker: the edge broker.
//!
//! Modules, each owning one thing: [`node`] (the node's shared state, built from the
//! configuration), [`admission`] (judging session requests before anything is allocated),
//! [`accept`] (the one accept path: admission, the transport's opening, the session on its
//! own task), `listen` (the TCP and QUIC listeners), [`auth`] (token verification),
//! [`policy`] (the `--config` file and namespace rules), [`schema`] (CDDL payload schemas and
//! the path of a mismatch), [`limits`] (rate limits and connection caps), `memory` (handing free allocator pages back), [`gate`] (each
//! session's judge of requests), [`transport`] (session I/O over WebSocket and
//! WebTransport), [`certs`] (TLS identities, their renewal and reload), [`session`] (drives
//! the protocol state machine, owns the outbound queue), [`outbox`] (the bounded per-session
//! queue, where conflation happens), [`wire`] (frames as sent, their lanes and the WebSocket
//! header: the leaf under hub, outbox and transports), [`conflation`] (where a namespace's
//! conflation key is in an event), [`hub`] (rooms and fan-out), [`cluster`] (the bridge
//! between the hub and other nodes: in-process or NATS), [`config`], [`metrics`], [`api`]
//! (HTTP routes), [`dev_ui`] (`--dev-ui`: a demo page and its certificate hash) and
//! [`server`] (start, stop, drain). The embedded single-node mode needs no external service.
//! See docs/ARCHITECTURE.md.

pub(crate) mod accept;
pub(crate) mod admission;
pub(crate) mod api;
pub mod auth;
pub mod certs;
pub mod cluster;
pub mod config;
pub mod conflation;
pub(crate) mod dev_ui;
pub mod gate;
pub mod hub;
pub(crate) mod limits;
pub(crate) mod listen;
pub(crate) mod memory;
pub(crate) mod metrics;
pub mod node;
pub mod outbox;
pub(crate) mod policy;
pub(crate) mod schema;
pub mod server;
pub(crate) mod session;
pub(crate) mod transport;
pub mod wire;

pub use config::Config;
pub use server::{Server, serve};
