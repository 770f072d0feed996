//! etcd's v3 gRPC API, client side: the protobuf messages and the tonic
//! clients (`KvClient`, `WatchClient`, `MaintenanceClient`, `AuthClient`,
//! ...) that the etcd probe ([`crate::probe::etcd`]) and the etcd DCS source
//! ([`crate::dcs::etcd`]) speak over their own tonic channels.
//!
//! The three package files beside this one are **generated and committed**
//! (from etcd's `rpc.proto`, `kv.proto` and `auth.proto` under `proto/`,
//! etcd v3.7.2), so building portal compiles no protobuf and needs no
//! `protoc`. Do not edit them; regenerate after changing `proto/` or the
//! tonic/prost versions:
//!
//! ```text
//! cargo run --manifest-path tools/gen-etcd-api/Cargo.toml
//! ```
//!
//! The generator (protox, a protobuf compiler in Rust, plus
//! tonic-prost-build) writes the files and formats them with rustfmt; it is
//! a separate crate that portal's own build never compiles.

// Generated code: its lints are the generator's business, not this crate's.
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod authpb;
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod etcdserverpb;
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod mvccpb;
