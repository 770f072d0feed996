//! portal: a TLS-terminating, leader-aware proxy for replicated databases.
//!
//! The crate is laid out one module per concern; `shared/design.md` has the
//! picture. The binary is a thin `main` over [`cli`].

pub mod config;
pub mod view;
