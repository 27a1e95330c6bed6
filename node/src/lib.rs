//! The piehole node.
//!
//! Module map, in the order a push passes through them:
//! - [`api::local`]: the Unix-socket API the hook and the CLI call.
//! - [`push`]: one push: receive.* policy, [`durability`], the update rule,
//!   then the replica's refs.
//! - [`update_rule`]: SPEC §3, accept or reject every ref of a push.
//! - [`ref_rule`]: the compare-and-swap of one push over any view of a
//!   group; both backends decide with it.
//! - [`consensus`]: the one trait the rest talks to; [`consensus::raft`] is
//!   the embedded Raft backend (driver thread, sled log, transport).
//! - [`state`]: the deterministic state machine (groups, replicas, refs),
//!   over [`disk`] (sled, fsynced for real).
//! - [`local_refs`]: the one place that moves a replica's refs.
//! - [`replicator`]: makes local repositories match the consensus, fetching
//!   packs from peers through [`api::peer`].
//! - [`access`]: who may call what on the local socket, repository roots.
//! - [`config`], [`server`]: settings and wiring.
//!
//! Invariants: `consensus` and `state` never touch git; the update rule and
//! the replicator never see Raft types; only `local_refs` moves local refs.

// tonic::Status is what API handlers return; boxing it would buy nothing.
pub mod access;
#[allow(clippy::result_large_err)]
pub mod api;
pub mod config;
pub mod consensus;
pub mod disk;
pub mod durability;
pub mod listener;
pub mod local_refs;
pub mod peer_client;
pub mod push;
pub mod ref_rule;
pub mod replicator;
pub mod server;
pub mod state;
pub mod update_rule;

pub use config::{NodeConfig, NodeSettings};
