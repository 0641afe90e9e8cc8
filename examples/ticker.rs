//! A tiny ticker: publishes ten prices to `ticker:DEMO` and prints what a subscriber receives.
//!
//! Start the broker first (`cargo run --release -p roomcast-broker --bin roomcast -- serve`),
//! then: `cargo run -p roomcast-client --example ticker [ws://127.0.0.1:4433/ws]`.

use roomcast_client::{ConnectOptions, connect};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Tick {
    symbol: String,
    price: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "ws://127.0.0.1:4433/ws".to_owned());
    let client = connect(&url, ConnectOptions::default()).await?;
    let mut ticks = client.subscribe("ticker:DEMO").await?;
    for i in 0..10 {
        let tick = Tick {
            symbol: "DEMO".into(),
            price: 100.0 + f64::from(i) * 0.25,
        };
        client.publish("ticker:DEMO", "tick", &tick).await?;
    }
    for _ in 0..10 {
        let Some(event) = ticks.next_event().await else {
            break;
        };
        let event = event?;
        let tick: Tick = event.decode()?;
        println!("seq {:>3}  {} {:.2}", event.seq, tick.symbol, tick.price);
    }
    client.close().await;
    Ok(())
}
