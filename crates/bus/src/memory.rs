//! The in-memory [`Bus`] for the embedded single process and tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

use crate::codec::BusError;
use crate::stream::{Bus, Entry, EntryId, Fields, StreamLimits};

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
    /// Entries a group has not acknowledged yet.
    fn backlog(&self, g: &Group) -> usize {
        self.entries
            .range(..)
            .filter(|(id, _)| !g.acked.contains(id))
            .count()
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

#[derive(Debug, Default)]
struct State {
    streams: HashMap<String, Stream>,
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
            .ok_or_else(|| BusError::NoGroup(format!("{stream}/{group}")))?;
        let g = s
            .groups
            .get_mut(group)
            .ok_or_else(|| BusError::NoGroup(format!("{stream}/{group}")))?;
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
        let deadline = tokio::time::Instant::now() + block;
        loop {
            let notified = self.notify.notified();
            let got = Self::take_new(&mut self.lock(), stream, group, consumer, count)?;
            if !got.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(got);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Self::take_new(&mut self.lock(), stream, group, consumer, count);
            }
        }
    }

    async fn ack(&self, stream: &str, group: &str, ids: &[EntryId]) -> Result<(), BusError> {
        let mut st = self.lock();
        let s = st
            .streams
            .get_mut(stream)
            .ok_or_else(|| BusError::NoGroup(format!("{stream}/{group}")))?;
        let g = s
            .groups
            .get_mut(group)
            .ok_or_else(|| BusError::NoGroup(format!("{stream}/{group}")))?;
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
                .ok_or_else(|| BusError::NoGroup(format!("{stream}/{group}")))?;
            let g = s
                .groups
                .get_mut(group)
                .ok_or_else(|| BusError::NoGroup(format!("{stream}/{group}")))?;
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
        }
        Ok(out)
    }

    async fn range_after(
        &self,
        stream: &str,
        after: Option<EntryId>,
        count: usize,
    ) -> Result<Vec<Entry>, BusError> {
        let st = self.lock();
        let Some(s) = st.streams.get(stream) else {
            return Ok(Vec::new());
        };
        Ok(s.entries
            .iter()
            .filter(|(id, _)| after.is_none_or(|a| **id > a))
            .take(count)
            .map(|(id, f)| Entry {
                id: *id,
                fields: f.clone(),
                deliveries: 0,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(v: &str) -> Fields {
        HashMap::from([("v".to_string(), v.as_bytes().to_vec())])
    }

    fn val(e: &Entry) -> String {
        String::from_utf8(e.fields["v"].clone()).unwrap()
    }

    const NOW: Duration = Duration::ZERO;

    #[tokio::test]
    async fn groups_deliver_each_entry_once_per_group() {
        let bus = MemoryBus::new();
        bus.ensure_group("s", "enc").await.unwrap();
        bus.ensure_group("s", "audit").await.unwrap();
        for v in ["a", "b", "c"] {
            bus.add("s", fields(v), StreamLimits::default())
                .await
                .unwrap();
        }
        let r1 = bus.read_group("s", "enc", "c1", 2, NOW).await.unwrap();
        let r2 = bus.read_group("s", "enc", "c2", 2, NOW).await.unwrap();
        assert_eq!(r1.iter().map(val).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(r2.iter().map(val).collect::<Vec<_>>(), ["c"]);
        let audit = bus.read_group("s", "audit", "x", 10, NOW).await.unwrap();
        assert_eq!(audit.len(), 3, "another group sees everything");
        assert!(r1[0].id < r1[1].id && r1[1].id < r2[0].id);
        assert_eq!(r1[0].id.to_string().parse::<EntryId>().unwrap(), r1[0].id);
    }

    #[tokio::test]
    async fn unacked_entries_are_redelivered_then_dead_lettered() {
        let bus = MemoryBus::new();
        let limits = StreamLimits {
            max_deliveries: 2,
            ..StreamLimits::default()
        };
        bus.ensure_group("s", "g").await.unwrap();
        bus.add("s", fields("x"), limits).await.unwrap();
        let first = bus
            .read_group("s", "g", "dead-worker", 1, NOW)
            .await
            .unwrap();
        assert_eq!(first[0].deliveries, 1);
        // Not idle long enough yet: nothing to claim.
        assert!(
            bus.claim_stale("s", "g", "w2", Duration::from_secs(60), 10, limits, "dlq")
                .await
                .unwrap()
                .is_empty()
        );
        let again = bus
            .claim_stale("s", "g", "w2", NOW, 10, limits, "dlq")
            .await
            .unwrap();
        assert_eq!(
            (again.len(), again[0].deliveries, val(&again[0])),
            (1, 2, "x".to_string())
        );
        // Delivered max_deliveries times and still not acknowledged: dead-lettered, not returned.
        let third = bus
            .claim_stale("s", "g", "w3", NOW, 10, limits, "dlq")
            .await
            .unwrap();
        assert!(third.is_empty());
        let dead = bus.range_after("dlq", None, 10).await.unwrap();
        assert_eq!(val(&dead[0]), "x");
        assert!(
            String::from_utf8(dead[0].fields["dead.from"].clone())
                .unwrap()
                .starts_with("s/g/")
        );
        assert!(
            bus.claim_stale("s", "g", "w4", NOW, 10, limits, "dlq")
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn acked_entries_are_gone_and_a_full_backlog_pushes_back() {
        let bus = MemoryBus::new();
        let limits = StreamLimits {
            max_backlog: 2,
            ..StreamLimits::default()
        };
        bus.ensure_group("s", "g").await.unwrap();
        bus.add("s", fields("1"), limits).await.unwrap();
        bus.add("s", fields("2"), limits).await.unwrap();
        let e = bus.add("s", fields("3"), limits).await.unwrap_err();
        assert!(matches!(e, BusError::Full { backlog: 2, .. }), "{e}");
        let got = bus.read_group("s", "g", "c", 10, NOW).await.unwrap();
        // Delivered but unacknowledged still counts.
        assert!(bus.add("s", fields("3"), limits).await.is_err());
        bus.ack("s", "g", &[got[0].id]).await.unwrap();
        bus.add("s", fields("3"), limits).await.unwrap();
        assert!(
            bus.claim_stale("s", "g", "c2", NOW, 10, limits, "dlq")
                .await
                .unwrap()
                .iter()
                .all(|e| e.id != got[0].id)
        );
    }

    #[tokio::test]
    async fn a_blocked_reader_wakes_on_add_and_logs_resume_from_an_id() {
        let bus = MemoryBus::new();
        bus.ensure_group("s", "g").await.unwrap();
        let reader = {
            let bus = bus.clone();
            tokio::spawn(async move {
                bus.read_group("s", "g", "c", 1, Duration::from_secs(5))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        bus.add("s", fields("late"), StreamLimits::default())
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), reader)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(val(&got[0]), "late");
        // A result log without groups keeps everything; readers resume after an id.
        let mut ids = Vec::new();
        for v in ["r1", "r2", "r3"] {
            ids.push(
                bus.add("log", fields(v), StreamLimits::default())
                    .await
                    .unwrap(),
            );
        }
        let rest = bus.range_after("log", Some(ids[0]), 10).await.unwrap();
        assert_eq!(rest.iter().map(val).collect::<Vec<_>>(), ["r2", "r3"]);
        assert!(
            bus.range_after("absent", None, 10)
                .await
                .unwrap()
                .is_empty()
        );
        let timeout = bus
            .read_group("s", "g", "c", 1, Duration::from_millis(30))
            .await
            .unwrap();
        assert!(timeout.is_empty());
        assert!(matches!(
            bus.read_group("s", "nope", "c", 1, NOW).await,
            Err(BusError::NoGroup(_))
        ));
    }
}
