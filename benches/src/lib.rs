//! Benchmarks live in `benches/`; the peer comparison runner is `compare.py`.
