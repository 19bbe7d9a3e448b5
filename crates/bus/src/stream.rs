//! The transport between stages, as one trait with Redis Streams semantics, so
//! the embedded single process (in memory) and the fleet (Redis) behave alike:
//! append-only streams with ids `ms-seq`; consumer groups that deliver each
//! entry to one consumer; explicit acknowledgement; redelivery of entries left
//! unacknowledged past an idle time; dead-lettering after too many deliveries;
//! and backpressure when a group falls too far behind.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use crate::codec::BusError;

/// A consumer group's position on its stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// The group's name.
    pub name: String,
    /// Entries delivered to a consumer and not yet acknowledged.
    pub pending: usize,
    /// Entries not yet delivered to any consumer of the group.
    pub lag: usize,
}

/// An entry id: milliseconds and a sequence number, ordered like Redis ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EntryId {
    /// Milliseconds part.
    pub ms: u64,
    /// Sequence within the millisecond.
    pub seq: u64,
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for EntryId {
    type Err = BusError;
    fn from_str(s: &str) -> Result<Self, BusError> {
        let bad = || BusError::InvalidEntryId(s.chars().take(40).collect());
        let (ms, seq) = s.split_once('-').ok_or_else(bad)?;
        Ok(Self {
            ms: ms.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

/// Field name to bytes.
pub type Fields = HashMap<String, Vec<u8>>;

/// An entry as a consumer receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Its id.
    pub id: EntryId,
    /// Its fields.
    pub fields: Fields,
    /// How many times it has been delivered to this group, this delivery included.
    pub deliveries: u32,
}

/// Settings of one work stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// `add` answers [`BusError::Full`] once the slowest group has this many
    /// entries not yet acknowledged (delivered or not).
    pub max_backlog: usize,
    /// Deliveries after which an entry goes to the dead-letter stream.
    pub max_deliveries: u32,
}

/// Dead letters kept per stage, newest first: enough to see what failed, never
/// a store that grows with every poisoned entry (an audio entry can be MBs).
pub const MAX_DEAD_LETTERS: usize = 100;

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            max_backlog: 10_000,
            max_deliveries: 5,
        }
    }
}

/// Outcome of asking a capacity pool for a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// The holder has a slot until the lease's time runs out.
    Granted {
        /// Slots leased in the pool, this one included.
        used: u32,
        /// Slots the pool's live nodes advertise.
        capacity: u32,
    },
    /// Every advertised slot is leased.
    Full {
        /// Slots the pool's live nodes advertise.
        capacity: u32,
    },
    /// No live node advertises capacity (none running, or all stopped advertising).
    NoCapacity,
    /// Free slots remain, but only the pool's reserve, and the asking tenant
    /// already holds its fair share: the reserve is for tenants below theirs
    /// (see [`Bus::lease`]).
    OverShare {
        /// Slots the pool's live nodes advertise.
        capacity: u32,
        /// Slots the tenant holds.
        held: u32,
        /// Tenants holding slots, the asking one included.
        tenants: u32,
    },
}

/// Who holds, or asks for, a slot of a capacity pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder<'a> {
    /// The tenant it acts for: a pool's reserve goes to tenants below their share.
    pub tenant: &'a str,
    /// The holder itself (a session's id).
    pub id: &'a str,
}

impl Holder<'_> {
    /// How the pool stores it: the tenant, a unit separator, the id.
    pub(crate) fn member(&self) -> String {
        format!("{}\u{1f}{}", self.tenant, self.id)
    }
}

/// The tenant part of a stored holder (see [`Holder::member`]).
pub(crate) fn member_tenant(member: &str) -> &str {
    member.split_once('\u{1f}').map_or("", |(t, _)| t)
}

/// A stage-to-stage transport.
pub trait Bus: Clone + Send + Sync + 'static {
    /// Appends an entry; [`BusError::Full`] when a group is `max_backlog` behind.
    fn add(
        &self,
        stream: &str,
        fields: Fields,
        limits: StreamLimits,
    ) -> impl Future<Output = Result<EntryId, BusError>> + Send;

    /// How far behind each consumer group of `stream` is (empty when the
    /// stream does not exist): the autoscaler's signal.
    fn groups(&self, stream: &str)
    -> impl Future<Output = Result<Vec<GroupInfo>, BusError>> + Send;

    /// Creates a consumer group reading from the stream's start, if absent.
    fn ensure_group(
        &self,
        stream: &str,
        group: &str,
    ) -> impl Future<Output = Result<(), BusError>> + Send;

    /// New entries for `consumer`, waiting up to `block` for the first.
    fn read_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> impl Future<Output = Result<Vec<Entry>, BusError>> + Send;

    /// Entries the stream holds now (0 when it does not exist).
    fn len(&self, stream: &str) -> impl Future<Output = Result<usize, BusError>> + Send;

    /// Acknowledges entries: they will not be delivered again. Entries every
    /// group of the stream has acknowledged leave the stream: it holds only
    /// what is in flight.
    fn ack(
        &self,
        stream: &str,
        group: &str,
        ids: &[EntryId],
    ) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Takes over entries another consumer left unacknowledged for `min_idle`
    /// (it crashed or hung). Entries delivered `max_deliveries` times already
    /// are moved to `dead_letter` (which keeps the newest [`MAX_DEAD_LETTERS`])
    /// and acknowledged instead of returned.
    fn claim_stale(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
        limits: StreamLimits,
        dead_letter: &str,
    ) -> impl Future<Output = Result<Vec<Entry>, BusError>> + Send;

    /// Marks entries `consumer` still works on as fresh, so that
    /// [`Bus::claim_stale`] does not hand them to another consumer (a long
    /// translation, say); their delivery counts stay as they are.
    fn touch(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        ids: &[EntryId],
    ) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Entries after `after` in id order, for readers that resume a log.
    fn range_after(
        &self,
        stream: &str,
        after: Option<EntryId>,
        count: usize,
    ) -> impl Future<Output = Result<Vec<Entry>, BusError>> + Send;

    /// Appends an entry unless this stream already holds one appended under
    /// `unique`: redelivered work then never adds a second copy of its result.
    /// Returns the id of the entry holding `unique` and whether this call added
    /// it. The stream and its record of keys expire `ttl` after the last add.
    fn add_unique(
        &self,
        stream: &str,
        unique: &str,
        fields: Fields,
        ttl: Duration,
    ) -> impl Future<Output = Result<(EntryId, bool), BusError>> + Send;

    /// Like [`Bus::range_after`], waiting up to `block` for the first entry.
    fn read_after(
        &self,
        stream: &str,
        after: Option<EntryId>,
        count: usize,
        block: Duration,
    ) -> impl Future<Output = Result<Vec<Entry>, BusError>> + Send;

    /// Says that `node` serves `slots` slots of `pool` for the next `ttl`; nodes
    /// repeat it well within `ttl`, and a node that stops is forgotten after it.
    fn advertise(
        &self,
        pool: &str,
        node: &str,
        slots: u32,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Takes a slot of `pool` for `holder`, or renews the one it holds, for `ttl`.
    /// Renewal always succeeds; a new holder gets a slot only while leases are
    /// fewer than the capacity the pool's live nodes advertise, and the last
    /// `reserve` of that capacity (a fraction, 0-1, rounded up to slots) only
    /// while its tenant holds less than its fair share: the capacity over the
    /// tenants holding slots (itself included) plus one, the tenant that may
    /// come next. So one tenant alone fills the pool but for the reserve, and
    /// another arriving then still gets in.
    fn lease(
        &self,
        pool: &str,
        holder: Holder<'_>,
        ttl: Duration,
        reserve: f32,
    ) -> impl Future<Output = Result<Lease, BusError>> + Send;

    /// Slots of `pool` in use and advertised by live nodes, as `(used, capacity)`.
    fn pool_usage(&self, pool: &str) -> impl Future<Output = Result<(u32, u32), BusError>> + Send;

    /// Gives `holder`'s slot back.
    fn release(
        &self,
        pool: &str,
        holder: Holder<'_>,
    ) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Stores a record under `key` for `ttl`, replacing what was there.
    fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Stores a record under `key` for `ttl` unless one is there; returns the
    /// record that was there (`None` when this call stored `value`).
    fn put_new(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, BusError>> + Send;

    /// Stores all `records` for `ttl` in one step unless the first is there;
    /// returns the first's value when it was (nothing was written). The keys
    /// must share a hash tag (one job's records), so a cluster can do it atomically.
    fn put_all_new(
        &self,
        records: Vec<(String, Vec<u8>)>,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, BusError>> + Send;

    /// Replaces the record under `key` only while it holds `expect` (a lease's
    /// holder renewing it); false when another value, or none, is there.
    fn put_if(
        &self,
        key: &str,
        expect: &[u8],
        value: Vec<u8>,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, BusError>> + Send;

    /// Removes the record under `key` only while it holds `expect`; false otherwise.
    fn delete_if(
        &self,
        key: &str,
        expect: &[u8],
    ) -> impl Future<Output = Result<bool, BusError>> + Send;

    /// The record under `key`, if any.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Vec<u8>>, BusError>> + Send;

    /// Removes the record under `key`.
    fn delete(&self, key: &str) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Keeps the record under `key` for `ttl` from now, its value unchanged;
    /// false when there is none.
    fn keep(&self, key: &str, ttl: Duration)
    -> impl Future<Output = Result<bool, BusError>> + Send;
}

/// Slots of `capacity` kept for tenants below their share: `reserve` (0-1) of
/// it, rounded up.
pub(crate) fn reserve_slots(capacity: u32, reserve: f32) -> u32 {
    (capacity as f32 * reserve_fraction(reserve)).ceil() as u32
}

/// `reserve` as a fraction from 0 to 1 (what is not a number keeps none).
pub(crate) fn reserve_fraction(reserve: f32) -> f32 {
    if reserve.is_finite() {
        reserve.clamp(0.0, 1.0)
    } else {
        0.0
    }
}
