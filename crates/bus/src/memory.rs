//! The in-memory [`Bus`] for the embedded single process and tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

use crate::codec::BusError;
use crate::stream::{
    Bus, Entry, EntryId, Fields, Holder, Lease, StreamLimits, member_tenant, reserve_slots,
};

#[derive(Debug)]
struct Pending {
    consumer: String,
    delivered_at: Instant,
    deliveries: u32,
}

#[derive(Debug, Default)]
struct Group {
    last_delivered: EntryId,
    pending: BTreeMap<EntryId, Pending>,
    /// Entries this group has acknowledged, kept until every group has.
    acked: std::collections::BTreeSet<EntryId>,
}

#[derive(Debug, Default)]
struct Stream {
    entries: BTreeMap<EntryId, Fields>,
    last_id: EntryId,
    groups: HashMap<String, Group>,
}

impl Stream {
    /// Entries a group has not acknowledged yet. `acked` only holds ids still in
    /// `entries` (`compact` removes both together), so this is a difference of sizes.
    fn backlog(&self, g: &Group) -> usize {
        self.entries.len() - g.acked.len()
    }

    /// Drops entries every group has acknowledged (a log without groups keeps everything).
    fn compact(&mut self) {
        if self.groups.is_empty() {
            return;
        }
        let done: Vec<EntryId> = self
            .entries
            .keys()
            .copied()
            .filter(|id| self.groups.values().all(|g| g.acked.contains(id)))
            .collect();
        for id in done {
            self.entries.remove(&id);
            for g in self.groups.values_mut() {
                g.acked.remove(&id);
            }
        }
    }
}

fn no_group(stream: &str, group: &str) -> BusError {
    BusError::NoGroup(format!("{stream}/{group}"))
}

/// A capacity pool: nodes' advertised slots and holders' leases, each with its deadline.
#[derive(Debug, Default)]
struct Pool {
    nodes: HashMap<String, (u32, Instant)>,
    leases: HashMap<String, Instant>,
}

#[derive(Debug, Default)]
struct State {
    streams: HashMap<String, Stream>,
    /// `add_unique` keys per stream, with the id that holds each.
    unique: HashMap<String, HashMap<String, EntryId>>,
    /// Deadlines of streams written with a time to live.
    expiry: HashMap<String, Instant>,
    last_purge: Option<Instant>,
    pools: HashMap<String, Pool>,
    /// Records with their deadlines.
    records: HashMap<String, (Vec<u8>, Instant)>,
}

impl State {
    /// Forgets expired streams, at most once a second (each look is a scan).
    fn purge_expired(&mut self, now: Instant) {
        if self
            .last_purge
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.last_purge = Some(now);
        let dead: Vec<String> = self
            .expiry
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in dead {
            self.expiry.remove(&k);
            self.streams.remove(&k);
            self.unique.remove(&k);
        }
        self.records.retain(|_, (_, until)| *until > now);
    }
}

/// Streams held in this process. Clones share the same streams.
#[derive(Debug, Clone, Default)]
pub struct MemoryBus {
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
}

impl MemoryBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_id(stream: &Stream) -> EntryId {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        if ms > stream.last_id.ms {
            EntryId { ms, seq: 0 }
        } else {
            EntryId {
                ms: stream.last_id.ms,
                seq: stream.last_id.seq + 1,
            }
        }
    }

    fn append(st: &mut State, stream: &str, fields: Fields) -> EntryId {
        let s = st.streams.entry(stream.to_owned()).or_default();
        let id = Self::next_id(s);
        s.last_id = id;
        s.entries.insert(id, fields);
        id
    }

    fn take_new(
        st: &mut State,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
    ) -> Result<Vec<Entry>, BusError> {
        let s = st
            .streams
            .get_mut(stream)
            .ok_or_else(|| no_group(stream, group))?;
        let g = s
            .groups
            .get_mut(group)
            .ok_or_else(|| no_group(stream, group))?;
        let now = Instant::now();
        let mut out = Vec::new();
        let start = g.last_delivered;
        for (id, fields) in s
            .entries
            .range(start..)
            .filter(|(id, _)| **id > start)
            .take(count)
        {
            g.pending.insert(
                *id,
                Pending {
                    consumer: consumer.to_owned(),
                    delivered_at: now,
                    deliveries: 1,
                },
            );
            out.push(Entry {
                id: *id,
                fields: fields.clone(),
                deliveries: 1,
            });
        }
        if let Some(last) = out.last() {
            g.last_delivered = last.id;
        }
        Ok(out)
    }
}

impl Bus for MemoryBus {
    async fn add(
        &self,
        stream: &str,
        fields: Fields,
        limits: StreamLimits,
    ) -> Result<EntryId, BusError> {
        let id = {
            let mut st = self.lock();
            if let Some(s) = st.streams.get(stream)
                && let Some((group, behind)) = s
                    .groups
                    .iter()
                    .map(|(n, g)| (n, s.backlog(g)))
                    .max_by_key(|(_, b)| *b)
                && behind >= limits.max_backlog
            {
                return Err(BusError::Full {
                    stream: stream.to_owned(),
                    group: group.clone(),
                    backlog: behind,
                });
            }
            Self::append(&mut st, stream, fields)
        };
        self.notify.notify_waiters();
        Ok(id)
    }

    async fn groups(&self, stream: &str) -> Result<Vec<crate::GroupInfo>, BusError> {
        let st = self.lock();
        let Some(s) = st.streams.get(stream) else {
            return Ok(Vec::new());
        };
        let mut out: Vec<crate::GroupInfo> = s
            .groups
            .iter()
            .map(|(name, g)| crate::GroupInfo {
                name: name.clone(),
                pending: g.pending.len(),
                lag: s
                    .entries
                    .range(g.last_delivered..)
                    .filter(|(id, _)| **id > g.last_delivered)
                    .count(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn ensure_group(&self, stream: &str, group: &str) -> Result<(), BusError> {
        let mut st = self.lock();
        st.streams
            .entry(stream.to_owned())
            .or_default()
            .groups
            .entry(group.to_owned())
            .or_default();
        Ok(())
    }

    async fn read_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>, BusError> {
        self.wait_for(block, |st| {
            Self::take_new(st, stream, group, consumer, count)
        })
        .await
    }

    async fn len(&self, stream: &str) -> Result<usize, BusError> {
        Ok(self
            .lock()
            .streams
            .get(stream)
            .map_or(0, |s| s.entries.len()))
    }

    async fn ack(&self, stream: &str, group: &str, ids: &[EntryId]) -> Result<(), BusError> {
        let mut st = self.lock();
        let s = st
            .streams
            .get_mut(stream)
            .ok_or_else(|| no_group(stream, group))?;
        let g = s
            .groups
            .get_mut(group)
            .ok_or_else(|| no_group(stream, group))?;
        for id in ids {
            if g.pending.remove(id).is_some() {
                g.acked.insert(*id);
            }
        }
        s.compact();
        Ok(())
    }

    async fn claim_stale(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
        limits: StreamLimits,
        dead_letter: &str,
    ) -> Result<Vec<Entry>, BusError> {
        let mut st = self.lock();
        let now = Instant::now();
        let mut out = Vec::new();
        let mut dead = Vec::new();
        {
            let s = st
                .streams
                .get_mut(stream)
                .ok_or_else(|| no_group(stream, group))?;
            let g = s
                .groups
                .get_mut(group)
                .ok_or_else(|| no_group(stream, group))?;
            let stale: Vec<EntryId> = g
                .pending
                .iter()
                .filter(|(_, p)| now.duration_since(p.delivered_at) >= min_idle)
                .map(|(id, _)| *id)
                .take(count)
                .collect();
            for id in stale {
                let Some(fields) = s.entries.get(&id).cloned() else {
                    g.pending.remove(&id);
                    continue;
                };
                let p = g
                    .pending
                    .get_mut(&id)
                    .expect("listed just above; this is a bug");
                if p.deliveries >= limits.max_deliveries {
                    g.pending.remove(&id);
                    g.acked.insert(id);
                    dead.push((id, fields));
                    continue;
                }
                p.deliveries += 1;
                p.delivered_at = now;
                p.consumer = consumer.to_owned();
                out.push(Entry {
                    id,
                    fields,
                    deliveries: p.deliveries,
                });
            }
            s.compact();
        }
        for (id, mut fields) in dead {
            fields.insert(
                "dead.from".into(),
                format!("{stream}/{group}/{id}").into_bytes(),
            );
            Self::append(&mut st, dead_letter, fields);
            if let Some(d) = st.streams.get_mut(dead_letter) {
                while d.entries.len() > crate::stream::MAX_DEAD_LETTERS {
                    d.entries.pop_first();
                }
            }
        }
        Ok(out)
    }

    async fn range_after(
        &self,
        stream: &str,
        after: Option<EntryId>,
        count: usize,
    ) -> Result<Vec<Entry>, BusError> {
        let mut st = self.lock();
        st.purge_expired(Instant::now());
        Ok(Self::range(&st, stream, after, count))
    }

    async fn add_unique(
        &self,
        stream: &str,
        unique: &str,
        fields: Fields,
        ttl: Duration,
    ) -> Result<(EntryId, bool), BusError> {
        let added = {
            let mut st = self.lock();
            let now = Instant::now();
            st.purge_expired(now);
            if let Some(id) = st.unique.get(stream).and_then(|u| u.get(unique)) {
                return Ok((*id, false));
            }
            let id = Self::append(&mut st, stream, fields);
            st.unique
                .entry(stream.to_owned())
                .or_default()
                .insert(unique.to_owned(), id);
            st.expiry.insert(stream.to_owned(), now + ttl);
            id
        };
        self.notify.notify_waiters();
        Ok((added, true))
    }

    async fn read_after(
        &self,
        stream: &str,
        after: Option<EntryId>,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>, BusError> {
        self.wait_for(block, |st| Ok(Self::range(st, stream, after, count)))
            .await
    }

    async fn advertise(
        &self,
        pool: &str,
        node: &str,
        slots: u32,
        ttl: Duration,
    ) -> Result<(), BusError> {
        let mut st = self.lock();
        st.pools
            .entry(pool.to_owned())
            .or_default()
            .nodes
            .insert(node.to_owned(), (slots, Instant::now() + ttl));
        Ok(())
    }

    async fn lease(
        &self,
        pool: &str,
        holder: Holder<'_>,
        ttl: Duration,
        reserve: f32,
    ) -> Result<Lease, BusError> {
        let mut st = self.lock();
        let now = Instant::now();
        let p = st.pools.entry(pool.to_owned()).or_default();
        p.nodes.retain(|_, (_, until)| *until > now);
        p.leases.retain(|_, until| *until > now);
        let capacity: u32 = p.nodes.values().map(|(n, _)| *n).sum();
        let used = p.leases.len() as u32;
        let member = holder.member();
        if !p.leases.contains_key(&member) {
            if capacity == 0 {
                return Ok(Lease::NoCapacity);
            }
            if used >= capacity {
                return Ok(Lease::Full { capacity });
            }
            if capacity - used <= reserve_slots(capacity, reserve) {
                let mut tenants: HashMap<&str, u32> = HashMap::new();
                for m in p.leases.keys() {
                    *tenants.entry(member_tenant(m)).or_default() += 1;
                }
                let held = tenants.get(holder.tenant).copied().unwrap_or(0);
                let active = tenants.len() as u32 + u32::from(held == 0);
                if held * (active + 1) >= capacity {
                    return Ok(Lease::OverShare {
                        capacity,
                        held,
                        tenants: active,
                    });
                }
            }
        }
        p.leases.insert(member, now + ttl);
        Ok(Lease::Granted {
            used: p.leases.len() as u32,
            capacity,
        })
    }

    async fn pool_usage(&self, pool: &str) -> Result<(u32, u32), BusError> {
        let st = self.lock();
        let now = Instant::now();
        Ok(st.pools.get(pool).map_or((0, 0), |p| {
            (
                p.leases.values().filter(|u| **u > now).count() as u32,
                p.nodes
                    .values()
                    .filter(|(_, u)| *u > now)
                    .map(|(n, _)| *n)
                    .sum(),
            )
        }))
    }

    async fn release(&self, pool: &str, holder: Holder<'_>) -> Result<(), BusError> {
        if let Some(p) = self.lock().pools.get_mut(pool) {
            p.leases.remove(&holder.member());
        }
        Ok(())
    }

    async fn touch(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        ids: &[EntryId],
    ) -> Result<(), BusError> {
        let mut st = self.lock();
        let now = Instant::now();
        let g = st
            .streams
            .get_mut(stream)
            .and_then(|s| s.groups.get_mut(group))
            .ok_or_else(|| no_group(stream, group))?;
        for id in ids {
            if let Some(p) = g.pending.get_mut(id) {
                p.delivered_at = now;
                p.consumer = consumer.to_owned();
            }
        }
        Ok(())
    }

    async fn put(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<(), BusError> {
        let until = Instant::now() + ttl;
        self.lock().records.insert(key.to_owned(), (value, until));
        Ok(())
    }

    async fn put_new(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<Option<Vec<u8>>, BusError> {
        let now = Instant::now();
        let mut st = self.lock();
        match st.records.get(key) {
            Some((v, until)) if *until > now => Ok(Some(v.clone())),
            _ => {
                st.records.insert(key.to_owned(), (value, now + ttl));
                Ok(None)
            }
        }
    }

    async fn put_all_new(
        &self,
        records: Vec<(String, Vec<u8>)>,
        ttl: Duration,
    ) -> Result<Option<Vec<u8>>, BusError> {
        let now = Instant::now();
        let mut st = self.lock();
        if let Some((first, _)) = records.first()
            && let Some((v, until)) = st.records.get(first)
            && *until > now
        {
            return Ok(Some(v.clone()));
        }
        for (k, v) in records {
            st.records.insert(k, (v, now + ttl));
        }
        Ok(None)
    }

    async fn put_if(
        &self,
        key: &str,
        expect: &[u8],
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<bool, BusError> {
        Ok(self.compare_and_set(key, expect, Some((value, ttl))))
    }

    async fn delete_if(&self, key: &str, expect: &[u8]) -> Result<bool, BusError> {
        Ok(self.compare_and_set(key, expect, None))
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BusError> {
        let now = Instant::now();
        let mut st = self.lock();
        match st.records.get(key) {
            Some((v, until)) if *until > now => Ok(Some(v.clone())),
            Some(_) => {
                st.records.remove(key);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), BusError> {
        self.lock().records.remove(key);
        Ok(())
    }

    async fn keep(&self, key: &str, ttl: Duration) -> Result<bool, BusError> {
        let mut st = self.lock();
        let now = Instant::now();
        match st.records.get_mut(key) {
            Some((_, until)) if *until > now => {
                *until = now + ttl;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

impl MemoryBus {
    /// While the live record under `key` holds `expect`, replaces it with
    /// `then` (value and TTL) or removes it (`None`); whether it did.
    fn compare_and_set(&self, key: &str, expect: &[u8], then: Option<(Vec<u8>, Duration)>) -> bool {
        let now = Instant::now();
        let mut st = self.lock();
        let holds = st
            .records
            .get(key)
            .is_some_and(|(v, until)| *until > now && v == expect);
        if holds {
            match then {
                Some((value, ttl)) => st.records.insert(key.to_owned(), (value, now + ttl)),
                None => st.records.remove(key),
            };
        }
        holds
    }

    /// Runs `take` until it finds entries or `block` passes, waking on every add.
    async fn wait_for(
        &self,
        block: Duration,
        mut take: impl FnMut(&mut State) -> Result<Vec<Entry>, BusError>,
    ) -> Result<Vec<Entry>, BusError> {
        let deadline = tokio::time::Instant::now() + block;
        loop {
            let notified = self.notify.notified();
            let got = take(&mut self.lock())?;
            if !got.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(got);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return take(&mut self.lock());
            }
        }
    }

    fn range(st: &State, stream: &str, after: Option<EntryId>, count: usize) -> Vec<Entry> {
        let Some(s) = st.streams.get(stream) else {
            return Vec::new();
        };
        let start = after.unwrap_or_default();
        s.entries
            .range(start..)
            .filter(|(id, _)| after.is_none_or(|a| **id > a))
            .take(count)
            .map(|(id, f)| Entry {
                id: *id,
                fields: f.clone(),
                deliveries: 0,
            })
            .collect()
    }
}
