//! Every integration test, in one test binary: one compile and one link
//! instead of one per file (`cargo test --test suite`; a file's tests are
//! the module of that name, e.g. `cargo test --test suite routing::`).
//!
//! The shared harness is `common` (real servers, the portal process, TLS
//! clients) and `common::chaos` (the fault-injection harness). Ports are
//! handed out without repeats within this one process.

mod common;

mod abuse;
mod admin;
mod admission;
mod bad_clients;
mod chaos_patroni;
mod chaos_postgres;
mod chaos_redis;
mod chaos_sentinel;
mod config_errors;
mod dcs_members;
mod e2e_patroni;
mod etcd_harness;
mod etcd_routing;
mod failover;
mod member_tls;
mod mtls;
mod patroni_probe;
mod postgres_backend_tls;
mod postgres_bad_clients;
mod postgres_cancel;
mod postgres_failover;
mod postgres_harness;
mod postgres_routing;
mod postgres_tls;
mod proxy_protocol;
mod reload;
mod routing;
mod sentinel;
mod shutdown;
mod split_brain;
mod tls;
