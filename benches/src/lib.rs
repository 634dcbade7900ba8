//! Criterion benchmarks live in `benches/`; see README.md.
