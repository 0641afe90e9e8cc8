//! roomcast-bench: micro-benchmarks (`cargo bench -p roomcast-bench`) of the frame codec,
//! payload validation and in-process hub fan-out. The `roomcast-bench` load generator joins
//! this crate with the performance issue. This crate uses only the public APIs of the
//! protocol and broker crates.
