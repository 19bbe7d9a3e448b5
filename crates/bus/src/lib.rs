//! How fleet stages talk.
//!
//! Owns the [`Bus`] trait (Redis Streams semantics) with its in-memory
//! implementation ([`MemoryBus`]), the names of every stream and key ([`keys`]) and the encoding of
//! `nexus.pipeline.v1` messages into stream entries ([`codec`]). Key names put
//! a session's keys under one Redis Cluster hash tag, so a session's result log
//! and its state always live on one shard.

pub mod codec;
pub mod jobs;
pub mod keys;
pub mod memory;
pub mod redis_bus;
pub mod stream;

pub use codec::{BusError, StreamMessage, decode, encode};
pub use jobs::JobStore;
pub use keys::{Keys, SessionId};
pub use memory::MemoryBus;
pub use redis_bus::RedisBus;
pub use stream::{
    Bus, Entry, EntryId, Fields, GroupInfo, Holder, Lease, MAX_DEAD_LETTERS, StreamLimits,
};
