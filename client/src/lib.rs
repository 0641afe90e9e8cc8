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
//! # Reconnect, recovery, idempotent publishes, token refresh
//!
//! [`Client::builder`] takes several broker URLs and reconnects by default
//! ([`ConnectOptions::reconnect`] for [`connect`]):
//!
//! ```no_run
//! # async fn demo() -> Result<(), roomcast_client::Error> {
//! use roomcast_client::{Client, ClientEvent, IdempotencyKey, SubscriptionItem};
//!
//! let client = Client::builder()
//!     .urls(["ws://node-a:4433/ws", "ws://node-b:4433/ws"])
//!     .connect()
//!     .await?;
//! let mut events = client.events();
//! tokio::spawn(async move {
//!     while let Some(event) = events.next().await {
//!         if let ClientEvent::Reconnecting { attempt, delay, url } = event {
//!             eprintln!("reconnecting to {url} in {delay:?} (attempt {attempt})");
//!         }
//!     }
//! });
//! let mut orders = client.subscribe("orders:1042").await?;
//! client
//!     .publish_with_key("orders:1042", "status", &"shipped", IdempotencyKey::random())
//!     .await?;
//! while let Some(item) = orders.next_item().await {
//!     match item {
//!         SubscriptionItem::Event(event) => println!("#{}", event.seq),
//!         SubscriptionItem::Resumed(resumed) => println!("resubscribed: {}", resumed.recovery),
//!         SubscriptionItem::Lagged { missed } => println!("{missed} dropped"),
//!         SubscriptionItem::Closed(info) => println!("closed: {info}"),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! - **Reconnect.** A lost transport, a silent broker, or a `Close` whose `reconnect` is true
//!   starts reconnecting: exponential backoff with full jitter (random delay up to
//!   `min(10 s, 200 ms·2^attempt)`, [`ReconnectPolicy`]), never sooner than the `Close`'s
//!   `retry_after`, each attempt to the next URL. A `Close` whose `reconnect` is false
//!   (`normal`, `unauthorized`, `protocol_error`, ...) ends the client. [`Client::state`],
//!   [`Client::watch_state`] and [`Client::events`] show it all.
//! - **Recovery.** The client holds each room's position (epoch from `Subscribed`, seq of the
//!   last event). After a reconnect it subscribes to every room again, with `since` = that
//!   position when the room keeps history (epoch ≠ 0), and puts a
//!   [`SubscriptionItem::Resumed`] marker in the subscription: [`Recovery::Recovered`] (the
//!   broker replayed what was missed), [`Recovery::Reset`] (it could not: resync) or
//!   [`Recovery::Fresh`] (a room without history). [`Subscription::next_event`] and the
//!   `Stream` impl skip recovered markers and report the others as
//!   [`SubscriptionError::Reset`]. An event at or below the held seq of the same epoch is a
//!   duplicate and never yielded; an event carrying a new epoch resets the position (a
//!   `Reset` marker).
//! - **Publishes.** [`Client::publish_with_key`] (or [`ConnectOptions::auto_idempotency_keys`])
//!   sends an idempotency key; such a publish pending when the connection drops is sent again,
//!   same key, on the next session. A pending publish without a key fails with
//!   [`Error::Disconnected`] (it may or may not have been delivered); so do requests without a
//!   key made while reconnecting. Subscribes wait for the next session.
//! - **Tokens.** [`ConnectOptions::token_provider`] ([`TokenProvider`]) gives the token of
//!   every reconnect, and a fresh one sent with `Refresh` before the current token's `exp`
//!   (80 % of its remaining lifetime or 30 s before, whichever is earlier).
//!   [`ClientEvent::TokenRefreshed`] / [`ClientEvent::TokenRefreshFailed`] report the outcome.
//!
//! Each URL names one transport; list a node's `https://` (WebTransport) URL before its
//! `ws://` one to fall back from WebTransport to WebSocket.
//!
//! Names are not validated locally: the broker answers a bad room or event name with [`Error::Server`], so
//! callers see the broker's own verdict.
//!
//! Every queue is bounded: requests wait for room in the driver's command queue, and each
//! subscription buffers at most [`ConnectOptions::subscription_buffer`] events, dropping newer
//! ones (reported as [`SubscriptionError::Lagged`]) rather than ever stalling the reader.

mod client;
mod command;
mod connection;
mod driver;
#[cfg(test)]
mod driver_tests;
mod error;
mod handles;
mod key;
mod options;
mod reconnect;
mod state;
mod subscription;
mod token;
mod transport;

pub use client::{Client, ClientBuilder, StateWatch, connect};
pub use error::{CloseInfo, Error, SubscriptionError};
pub use key::IdempotencyKey;
pub use options::ConnectOptions;
pub use reconnect::ReconnectPolicy;
pub use state::{ClientEvent, ClientEvents, ConnectionState};
pub use subscription::{EventMessage, Recovery, Resumption, Subscription, SubscriptionItem};
pub use token::TokenProvider;

pub use roomcast_protocol::{
    Code, EventName, PROTOCOL_VERSION, Payload, PayloadLimits, Position, RoomName,
};
