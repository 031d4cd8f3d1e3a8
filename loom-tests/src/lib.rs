//! loom models of kvindex's lock-free protocols.
//!
//! The models are the integration tests in `tests/` (one file per protocol); they compile only
//! under `RUSTFLAGS="--cfg loom --cfg crossbeam_loom"`, which `scripts/test.sh` sets for its loom
//! step. In that build the engine's and the log's `sync` shims hand loom's primitives to the
//! production code, so what loom explores is the real code on a tiny state. The normal
//! `cargo test --workspace` builds this crate without any model.
//!
//! This library holds the helpers the models share: building events and running a model.

#[cfg(loom)]
pub mod support;
