//! roomcast-bench: micro-benchmarks (`cargo bench -p roomcast-bench`) of the frame codec,
//! payload validation and in-process hub fan-out. The `roomcast-bench` binary (src/main.rs)
//! is the load generator for a running broker (scenarios fanout, latency, connections,
//! publishers; run side by side with limit-ref by scripts/bench-*). This crate uses only the
//! public APIs of the protocol and broker crates.
