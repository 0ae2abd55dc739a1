//! Benchmarks live in `benches/`: `cargo bench -p stslock-bench`.
