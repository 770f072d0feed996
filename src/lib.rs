//! portal: a TLS-terminating, leader-aware proxy for replicated databases.
//!
//! One module per concern (the README's "Project layout" has the picture):
//! [`config`] is the typed configuration, [`view`] the pure membership view,
//! [`probe`] asks members what they are, [`dcs`] watches where a leader is
//! named (Patroni's keys in etcd, Sentinel), [`roster`] holds the members
//! (configured or learned from the DCS), [`cluster`] feeds both to the
//! view and publishes snapshots, [`router`] picks members, [`proxy`] is the
//! data path ([`admission`] counts what connections may take,
//! [`proxy_protocol`] reads a trusted balancer's PROXY header, [`splice`]
//! relays a session's bytes), [`frontend`] the
//! protocol-specific openings and refusals, [`tls`] and [`certs`] the TLS
//! material, [`admin`] and [`metrics`] the operator's side ([`log_limit`]
//! keeps strangers from setting the log's volume), [`peers`] the
//! exchange of proven terms between portals, [`server`] the wiring and
//! shutdown, [`cli`] the commands.
//! [`etcd_api`] is etcd's v3 gRPC client that the etcd probe and the etcd
//! DCS source speak: generated code, committed (see `tools/gen-etcd-api`).

pub mod admin;
pub mod admission;
pub mod backend;
pub mod certs;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod data_threads;
pub mod dcs;
pub mod etcd_api;
pub mod frontend;
pub mod log_limit;
pub mod metrics;
pub mod peers;
pub mod probe;
pub mod proxy;
pub mod proxy_protocol;
pub mod roster;
pub mod router;
pub mod server;
pub mod splice;
pub mod stream;
pub mod tls;
pub mod view;
