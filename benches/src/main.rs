//! `roomcast-bench`: load generator for a running broker.
//!
//! Scenarios: `fanout` (closed-loop fan-out to N subscribers of one room), `latency`
//! (publish→deliver latency at a fixed publish rate), `connections` (many idle sessions, the
//! broker's memory per session), `publishers` (many publishers, each into its own watched
//! room), `hol` (head-of-line blocking across rooms: a WebTransport subscriber of a heavy
//! and a light room behind a lossy user-space UDP relay) and `soak` (minutes of session
//! churn with recoveries, reported interval by interval: broker RSS, latency, errors). Each
//! scenario lives in its own module; `common` holds sessions and wire helpers, `measure`
//! clocks, histograms and schedules, `timed` the subscribers that time every delivery.
//! Subscribers of the throughput scenarios read events straight off the socket after the
//! handshake and look only at what they measure, so the generator stays cheaper than the
//! broker it measures (`soak`, at a lighter load, decodes and checks every frame). Every
//! scenario stops by itself, prints progress on stderr once per second (`soak`: once per
//! `--interval`) and ends with a table, or one JSON line with `--json`.
//!
//! JSON units: durations in seconds (`*_s`), latencies in milliseconds (`*_ms` objects with
//! `n`, `p50`, `p90`, `p99`, `p999`, `max`, `mean`, the shape of limit-ref's `lat_ms`), memory
//! in bytes (`broker_rss`, `rss_*`), rates per second (`*_per_s`), CPU in percent of one core
//! (`*_cpu_pct`); `series` holds the measured deliveries of each second. `--tag KEY=VALUE`
//! adds string fields (the scripts add `label`, `commit` and `dirty`).

mod common;
mod connections;
mod fanout;
mod flood;
mod hol;
mod latency;
mod measure;
mod publishers;
mod soak;
mod timed;
mod wt;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    about = "Load generator for a running roomcast broker",
    after_help = "Each scenario stops by itself; progress goes to stderr once per second. \
With --json one line with every figure goes to stdout: latencies in ms, durations in s, \
memory in bytes, rates per second, CPU in percent of one core."
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// N subscribers in one room, one closed-loop publisher (limit-ref A).
    Fanout(fanout::FanoutArgs),
    /// Publish→deliver latency at a fixed publish rate, every delivery timed (limit-ref B).
    Latency(latency::LatencyArgs),
    /// Many idle sessions: connect rate and the broker's RSS per session (limit-ref C).
    Connections(connections::ConnectionsArgs),
    /// Many publishers, each into its own room with a few watchers (IoT style).
    Publishers(publishers::PublishersArgs),
    /// Head-of-line blocking across rooms: one WebTransport subscriber of a heavy and a light
    /// room behind a lossy UDP relay; the light room's latency.
    Hol(hol::HolArgs),
    /// Minutes of churn (sessions connect, subscribe, recover, leave; publishers at a fixed
    /// rate): RSS, latency and errors interval by interval (scripts/soak; not in CI).
    Soak(soak::SoakArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Thousands of sockets need more than the usual soft limit of 1,024 open files.
    measure::raise_nofile();
    let result = match Cli::parse().scenario {
        Scenario::Fanout(args) => fanout::run(args).await,
        Scenario::Latency(args) => latency::run(args).await,
        Scenario::Connections(args) => connections::run(args).await,
        Scenario::Publishers(args) => publishers::run(args).await,
        Scenario::Hol(args) => hol::run(args).await,
        Scenario::Soak(args) => soak::run(args).await,
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
