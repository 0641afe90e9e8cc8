//! The roomcast Rust client.
//!
//! [`connect`] opens one session to a broker and returns a [`Client`], a cheap cloneable handle.
//! Behind every handle runs one connection task (the *driver*) that owns the socket: it writes
//! the frames the handles ask for, reads the broker's frames, matches replies to requests by id,
//! routes events to [`Subscription`]s and keeps the session alive with pings.
//!
//! ```no_run
//! # async fn demo() -> Result<(), roomcast_client::Error> {
//! use roomcast_client::{connect, ConnectOptions};
//!
//! let client = connect("ws://127.0.0.1:4433/ws", ConnectOptions::default()).await?;
//! let mut orders = client.subscribe("orders:1042").await?;
//! client.publish("orders:1042", "status", &"shipped").await?;
//! while let Some(Ok(event)) = orders.next_event().await {
//!     let status: String = event.decode()?;
//!     println!("{} #{}: {status}", event.event, event.seq);
//! }
//! # Ok(()) }
//! ```
//!
//! Two transports carry the same frames: WebSocket (`ws://`, `wss://`) and WebTransport
//! (`https://host:port/wt`: a control stream for requests and replies, one stream per
//! subscribed room from the broker; see [`ConnectOptions::cert_hash`] for development
//! certificates).
//!
//! What the crate does **not** do (yet): reconnect, resubscribe or recover missed events after
//! a connection ends, and WebTransport datagrams. Names are not validated locally: the broker answers a bad room or
//! event name with [`Error::Server`], so callers see the broker's own verdict.
//!
//! Every queue is bounded: requests wait for room in the driver's command queue, and each
//! subscription buffers at most [`ConnectOptions::subscription_buffer`] events, dropping newer
//! ones (reported as [`SubscriptionError::Lagged`]) rather than ever stalling the reader.

mod client;
mod driver;
mod error;
mod options;
mod subscription;
mod transport;

pub use client::{Client, connect};
pub use error::{CloseInfo, Error, SubscriptionError};
pub use options::ConnectOptions;
pub use subscription::{EventMessage, Subscription};

pub use roomcast_protocol::{Code, EventName, PROTOCOL_VERSION, Payload, PayloadLimits, RoomName};
