//! Integration tests: the real binaries against a throwaway PostgreSQL.
//!
//! One shared cluster per test process (see `harness`); every test uses its own channel and its
//! own server, so tests run in parallel.

mod harness;

mod autobahn;
mod bench_smoke;
mod browser;
mod burst;
mod channels;
mod config_errors;
mod config_file;
mod delivery;
mod durable;
mod harness_selftest;
mod hostile;
mod http;
mod image_contract;
mod jwt;
mod kubernetes;
mod lifecycle;
mod operations;
mod operator;
mod payloads;
mod resilience;
mod resume;
mod sse;
mod test_client;
mod tls;
