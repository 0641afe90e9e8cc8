//! roomcast-broker: the edge broker.
//!
//! Modules, each owning one thing: [`admission`] (judging session requests before anything
//! is allocated), [`auth`] (token verification), [`policy`] (the `--config` file and namespace
//! rules), [`schema`] (CDDL payload schemas and the path of a mismatch), [`limits`] (rate
//! limits and connection caps), [`memory`] (handing free allocator pages back), [`gate`] (each session's judge of
//! requests), [`transport`] (session I/O over WebSocket and
//! WebTransport), [`certs`] (TLS identities for QUIC), [`session`]
//! (drives the protocol state machine, owns the outbound queue), [`outbox`] (the bounded
//! per-session queue, where conflation happens), [`wire`] (frames as sent: events encoded once
//! with their WebSocket header in front), [`conflation`] (where a namespace's
//! conflation key is in an event), [`hub`] (rooms and fan-out), [`cluster`] (the bridge between the hub and
//! other nodes: in-process or NATS), [`config`], [`metrics`], [`api`] (HTTP
//! routes), [`dev_ui`] (`--dev-ui`: a demo page and its certificate hash) and [`server`]
//! (listeners, tasks, drain). The embedded single-node mode needs no
//! external service. See docs/ARCHITECTURE.md.

pub mod admission;
pub mod api;
pub mod auth;
pub mod certs;
pub mod cluster;
pub mod config;
pub mod conflation;
pub mod dev_ui;
pub mod gate;
pub mod hub;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod outbox;
pub mod policy;
pub mod schema;
pub mod server;
mod session;
pub mod transport;
pub mod wire;

pub use config::Config;
pub use server::{Server, serve};
