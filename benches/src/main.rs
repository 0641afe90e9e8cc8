//! `roomcast-bench`: load generator for a running broker.
//!
//! Scenarios: `fanout` (closed-loop fan-out to N subscribers of one room). Each scenario
//! lives in its own module; `common` holds what they share. Subscribers read events straight
//! off the socket after the handshake and look only at what they measure, so the generator
//! stays cheaper than the broker it measures.

mod common;
mod fanout;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Load generator for a running roomcast broker")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// N subscribers in one room, one closed-loop publisher.
    Fanout(fanout::FanoutArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let result = match Cli::parse().scenario {
        Scenario::Fanout(args) => fanout::run(args).await,
    };
    // Reader tasks are still parked on their sockets: leave without waiting for them.
    std::process::exit(match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    });
}
