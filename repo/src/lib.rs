//! piehole's git layer. It knows repositories, refs, objects and packs, and
//! nothing about Raft or networking.
//!
//! Module map:
//! - [`replica`]: [`Replica`], one bare repository: listing refs, reading
//!   objects, ancestry, and compare-and-swap ref updates under git's ref lock.
//! - `complete`: [`Replica::is_complete`], the connectivity check run before a
//!   ref is moved so that no ref ever points at a missing object.
//! - `pack`: [`Replica::build_pack`] and [`Replica::index_pack`], how objects
//!   travel between nodes.
//! - [`hooks`]: writing and checking the `update` / `post-update` shims.
//! - [`config`]: the cheap read of `piehole.*` keys done by every hook run.
//! - `durable`: libgit2's fsync, on for every process that writes here.
//! - `leftovers`: stale ref locks and partial packs a killed process left.
//! - `maintenance`: `git gc --auto` for replicas that only receive packs.
//! - [`error`] holds [`RepoError`].
//!
//! Conventions: object ids cross this API as 40-char lowercase hex strings and
//! "absent" is `None`; ref names are full (`refs/heads/main`).

pub mod config;
pub mod confine;
pub mod error;
pub mod hooks;
pub mod replica;

mod complete;
mod durable;
mod leftovers;
mod maintenance;
mod pack;

pub use complete::Completeness;
pub use error::RepoError;
pub use replica::Replica;
