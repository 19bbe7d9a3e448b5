//! The same semantics checked on both transports: the in-memory bus and a real
//! Redis on 127.0.0.1 (`NEXUS_TEST_REDIS`, default `redis://127.0.0.1:6379`;
//! the test script starts one if none answers).

#![allow(clippy::unwrap_used)] // test helpers: a failed step should panic with its error

use std::collections::HashMap;
use std::time::Duration;

use nexus_bus::{
    Bus, BusError, Entry, EntryId, Fields, Holder, Lease, MAX_DEAD_LETTERS, MemoryBus, RedisBus,
    StreamLimits,
};

const NOW: Duration = Duration::ZERO;

fn fields(v: &str) -> Fields {
    HashMap::from([("v".to_string(), v.as_bytes().to_vec())])
}

fn val(e: &Entry) -> String {
    String::from_utf8(e.fields["v"].clone()).unwrap()
}

/// Stream names of one test.
struct Names {
    s: String,
    dlq: String,
    log: String,
    pool: String,
}

/// Stream names unique to this run, so parallel tests and reruns never collide.
fn names(test: &str) -> Names {
    let tag = format!(
        "t{}-{}-{}",
        std::process::id(),
        test,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    Names {
        s: format!("{tag}:s"),
        dlq: format!("{tag}:dlq"),
        log: format!("{tag}:log"),
        pool: format!("{tag}:pool"),
    }
}

async fn redis() -> RedisBus {
    let url = std::env::var("NEXUS_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    RedisBus::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("{e}: scripts/redis.sh starts a server"))
}

async fn cleanup(keys: &[&str]) {
    let url = std::env::var("NEXUS_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("DEL")
        .arg(keys)
        .query_async(&mut c)
        .await
        .unwrap();
}

async fn groups_deliver_each_entry_once_per_group(bus: impl Bus, n: &Names) {
    let s = n.s.as_str();
    bus.ensure_group(s, "enc").await.unwrap();
    bus.ensure_group(s, "enc").await.unwrap(); // idempotent
    bus.ensure_group(s, "audit").await.unwrap();
    for v in ["a", "b", "c"] {
        bus.add(s, fields(v), StreamLimits::default())
            .await
            .unwrap();
    }
    let r1 = bus.read_group(s, "enc", "c1", 2, NOW).await.unwrap();
    let r2 = bus.read_group(s, "enc", "c2", 2, NOW).await.unwrap();
    assert_eq!(r1.iter().map(val).collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(r2.iter().map(val).collect::<Vec<_>>(), ["c"]);
    assert_eq!(
        bus.read_group(s, "audit", "x", 10, NOW)
            .await
            .unwrap()
            .len(),
        3
    );
    assert!(r1[0].id < r1[1].id && r1[1].id < r2[0].id);
    assert_eq!(r1[0].id.to_string().parse::<EntryId>().unwrap(), r1[0].id);
    assert!(matches!(
        bus.read_group(s, "nope", "c", 1, NOW).await,
        Err(BusError::NoGroup(_))
    ));
}

/// Group positions (the autoscaler's lag signal) read the same on both buses.
async fn group_positions_count_lag_and_pending(bus: impl Bus, n: &Names) {
    let s = n.s.as_str();
    assert!(bus.groups(s).await.unwrap().is_empty(), "no stream yet");
    bus.ensure_group(s, "enc").await.unwrap();
    bus.ensure_group(s, "audit").await.unwrap();
    for v in ["a", "b", "c", "d"] {
        bus.add(s, fields(v), StreamLimits::default())
            .await
            .unwrap();
    }
    let got = bus.read_group(s, "enc", "c1", 3, NOW).await.unwrap();
    bus.ack(s, "enc", &[got[0].id]).await.unwrap();
    let g = bus.groups(s).await.unwrap();
    let pos = |name: &str| {
        let g = g.iter().find(|g| g.name == name).unwrap();
        (g.lag, g.pending)
    };
    assert_eq!(
        pos("enc"),
        (1, 2),
        "one undelivered, two delivered and unacknowledged"
    );
    assert_eq!(pos("audit"), (4, 0));
}

async fn unacked_entries_are_redelivered_then_dead_lettered(bus: impl Bus, n: &Names) {
    let (s, dlq) = (n.s.as_str(), n.dlq.as_str());
    let limits = StreamLimits {
        max_deliveries: 2,
        ..StreamLimits::default()
    };
    bus.ensure_group(s, "g").await.unwrap();
    bus.add(s, fields("x"), limits).await.unwrap();
    let first = bus.read_group(s, "g", "dead-worker", 1, NOW).await.unwrap();
    assert_eq!(first[0].deliveries, 1);
    assert!(
        bus.claim_stale(s, "g", "w2", Duration::from_secs(60), 10, limits, dlq)
            .await
            .unwrap()
            .is_empty()
    );
    let again = bus
        .claim_stale(s, "g", "w2", NOW, 10, limits, dlq)
        .await
        .unwrap();
    assert_eq!(
        (again.len(), again[0].deliveries, val(&again[0])),
        (1, 2, "x".to_string())
    );
    assert!(
        bus.claim_stale(s, "g", "w3", NOW, 10, limits, dlq)
            .await
            .unwrap()
            .is_empty()
    );
    let dead = bus.range_after(dlq, None, 10).await.unwrap();
    assert_eq!(val(&dead[0]), "x");
    assert!(
        String::from_utf8(dead[0].fields["dead.from"].clone())
            .unwrap()
            .starts_with(&format!("{s}/g/"))
    );
    assert!(
        bus.claim_stale(s, "g", "w4", NOW, 10, limits, dlq)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn dead_letters_keep_only_the_newest(bus: impl Bus, n: &Names) {
    let limits = StreamLimits {
        max_deliveries: 1,
        ..StreamLimits::default()
    };
    bus.ensure_group(&n.s, "g").await.unwrap();
    let total = MAX_DEAD_LETTERS + 20;
    for i in 0..total {
        bus.add(&n.s, fields(&i.to_string()), limits).await.unwrap();
    }
    let read = bus.read_group(&n.s, "g", "w", total, NOW).await.unwrap();
    assert_eq!(read.len(), total);
    let claimed = bus
        .claim_stale(&n.s, "g", "w2", NOW, total, limits, &n.dlq)
        .await
        .unwrap();
    assert!(claimed.is_empty());
    assert_eq!(bus.len(&n.dlq).await.unwrap(), MAX_DEAD_LETTERS);
    let dead = bus.range_after(&n.dlq, None, total).await.unwrap();
    assert_eq!(val(&dead[0]), "20");
    assert_eq!(val(dead.last().unwrap()), (total - 1).to_string());
    // Dead-lettered entries count as acknowledged: the stage stream is empty.
    assert_eq!(bus.len(&n.s).await.unwrap(), 0);
}

async fn acknowledged_entries_leave_the_stream(bus: impl Bus, n: &Names) {
    let limits = StreamLimits::default();
    bus.ensure_group(&n.s, "a").await.unwrap();
    bus.ensure_group(&n.s, "b").await.unwrap();
    for v in ["1", "2", "3"] {
        bus.add(&n.s, fields(v), limits).await.unwrap();
    }
    let a = bus.read_group(&n.s, "a", "c", 10, NOW).await.unwrap();
    let ids = |e: &[Entry]| e.iter().map(|e| e.id).collect::<Vec<_>>();
    bus.ack(&n.s, "a", &ids(&a)).await.unwrap();
    // Group b has read nothing yet: everything stays for it.
    assert_eq!(bus.len(&n.s).await.unwrap(), 3);
    let b = bus.read_group(&n.s, "b", "c", 10, NOW).await.unwrap();
    bus.ack(&n.s, "b", &ids(&b[..2])).await.unwrap();
    assert_eq!(bus.len(&n.s).await.unwrap(), 1);
    let left = bus.range_after(&n.s, None, 10).await.unwrap();
    assert_eq!(left.iter().map(val).collect::<Vec<_>>(), ["3"]);
    bus.ack(&n.s, "b", &ids(&b[2..])).await.unwrap();
    assert_eq!(bus.len(&n.s).await.unwrap(), 0);
    // A new entry after the trim is delivered as usual.
    bus.add(&n.s, fields("4"), limits).await.unwrap();
    let a = bus.read_group(&n.s, "a", "c", 10, NOW).await.unwrap();
    assert_eq!(a.iter().map(val).collect::<Vec<_>>(), ["4"]);
    assert_eq!(bus.len("no-such-stream-here").await.unwrap(), 0);
}

async fn a_full_backlog_pushes_back_until_acked(bus: impl Bus, n: &Names) {
    let (s, dlq) = (n.s.as_str(), n.dlq.as_str());
    let limits = StreamLimits {
        max_backlog: 2,
        ..StreamLimits::default()
    };
    bus.ensure_group(s, "g").await.unwrap();
    bus.add(s, fields("1"), limits).await.unwrap();
    bus.add(s, fields("2"), limits).await.unwrap();
    let e = bus.add(s, fields("3"), limits).await.unwrap_err();
    assert!(matches!(e, BusError::Full { backlog: 2, .. }), "{e}");
    let got = bus.read_group(s, "g", "c", 10, NOW).await.unwrap();
    assert!(
        bus.add(s, fields("3"), limits).await.is_err(),
        "delivered but unacknowledged still counts"
    );
    bus.ack(s, "g", &[got[0].id]).await.unwrap();
    bus.add(s, fields("3"), limits).await.unwrap();
    let reclaimed = bus
        .claim_stale(s, "g", "c2", NOW, 10, limits, dlq)
        .await
        .unwrap();
    assert!(
        reclaimed.iter().all(|e| e.id != got[0].id),
        "acknowledged entries are never redelivered"
    );
}

async fn blocked_readers_wake_and_logs_resume(bus: impl Bus, n: &Names) {
    let (s, log) = (n.s.as_str(), n.log.as_str());
    bus.ensure_group(s, "g").await.unwrap();
    let reader = {
        let bus = bus.clone();
        let s = s.to_owned();
        tokio::spawn(async move {
            bus.read_group(&s, "g", "c", 1, Duration::from_secs(5))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    bus.add(s, fields("late"), StreamLimits::default())
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(3), reader)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(val(&got[0]), "late");
    let mut ids = Vec::new();
    for v in ["r1", "r2", "r3"] {
        ids.push(
            bus.add(log, fields(v), StreamLimits::default())
                .await
                .unwrap(),
        );
    }
    let rest = bus.range_after(log, Some(ids[0]), 10).await.unwrap();
    assert_eq!(rest.iter().map(val).collect::<Vec<_>>(), ["r2", "r3"]);
    assert_eq!(bus.range_after(log, None, 1).await.unwrap().len(), 1);
    assert!(
        bus.read_group(s, "g", "c", 1, Duration::from_millis(30))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn idempotent_results_never_land_twice(bus: impl Bus, n: &Names) {
    let log = n.log.as_str();
    let ttl = Duration::from_secs(60);
    let waiter = {
        let bus = bus.clone();
        let log = log.to_owned();
        tokio::spawn(async move { bus.read_after(&log, None, 10, Duration::from_secs(5)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (a, added) = bus
        .add_unique(log, "0:1", fields("s0r1"), ttl)
        .await
        .unwrap();
    assert!(added);
    let woke = tokio::time::timeout(Duration::from_secs(3), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(woke.iter().map(val).collect::<Vec<_>>(), ["s0r1"]);
    // A redelivered segment produces the same key: the first entry stands.
    let (again, added) = bus
        .add_unique(log, "0:1", fields("s0r1-second-try"), ttl)
        .await
        .unwrap();
    assert_eq!((again, added), (a, false));
    let (b, added) = bus
        .add_unique(log, "0:2", fields("s0r2"), ttl)
        .await
        .unwrap();
    assert!(added && b > a);
    let all = bus.read_after(log, None, 10, NOW).await.unwrap();
    assert_eq!(all.iter().map(val).collect::<Vec<_>>(), ["s0r1", "s0r2"]);
    let rest = bus
        .read_after(log, Some(a), 10, Duration::from_millis(20))
        .await
        .unwrap();
    assert_eq!(rest.iter().map(val).collect::<Vec<_>>(), ["s0r2"]);
    let none = bus
        .read_after(log, Some(b), 10, Duration::from_millis(30))
        .await
        .unwrap();
    assert!(none.is_empty());
}

async fn capacity_pool_leases_slots(bus: impl Bus, n: &Names) {
    let pool = n.pool.as_str();
    let long = Duration::from_secs(60);
    fn h(id: &str) -> Holder<'_> {
        Holder { tenant: "t", id }
    }
    assert_eq!(
        bus.lease(pool, h("a"), long, 0.0).await.unwrap(),
        Lease::NoCapacity
    );
    assert_eq!(bus.pool_usage(pool).await.unwrap(), (0, 0));
    bus.advertise(pool, "node1", 1, long).await.unwrap();
    bus.advertise(pool, "node2", 1, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(
        bus.lease(pool, h("a"), long, 0.0).await.unwrap(),
        Lease::Granted {
            used: 1,
            capacity: 2
        }
    );
    assert_eq!(
        bus.lease(pool, h("b"), long, 0.0).await.unwrap(),
        Lease::Granted {
            used: 2,
            capacity: 2
        }
    );
    assert_eq!(
        bus.lease(pool, h("c"), long, 0.0).await.unwrap(),
        Lease::Full { capacity: 2 }
    );
    assert_eq!(bus.pool_usage(pool).await.unwrap(), (2, 2));
    // Renewing a held lease always works.
    assert!(matches!(
        bus.lease(pool, h("a"), long, 0.0).await.unwrap(),
        Lease::Granted { used: 2, .. }
    ));
    bus.release(pool, h("b")).await.unwrap();
    assert!(matches!(
        bus.lease(pool, h("c"), long, 0.0).await.unwrap(),
        Lease::Granted { used: 2, .. }
    ));
    // node2 stops advertising: its slot goes away; expired leases free theirs.
    tokio::time::sleep(Duration::from_millis(400)).await;
    bus.release(pool, h("c")).await.unwrap();
    assert_eq!(bus.pool_usage(pool).await.unwrap(), (1, 1));
    assert_eq!(
        bus.lease(pool, h("d"), long, 0.0).await.unwrap(),
        Lease::Full { capacity: 1 }
    );
    bus.advertise(pool, "node1", 3, long).await.unwrap();
    bus.lease(pool, h("e"), Duration::from_millis(100), 0.0)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        bus.lease(pool, h("d"), long, 0.0).await.unwrap(),
        Lease::Granted {
            used: 2,
            capacity: 3
        }
    );
}

/// The pool's reserve goes to tenants below their fair share: one tenant
/// alone fills it but for the reserve, another arriving gets the reserve.
async fn a_pool_keeps_its_reserve_for_tenants_below_their_share(bus: impl Bus, n: &Names) {
    let pool = n.pool.as_str();
    let long = Duration::from_secs(60);
    fn a(id: &str) -> Holder<'_> {
        Holder { tenant: "a", id }
    }
    fn b(id: &str) -> Holder<'_> {
        Holder { tenant: "b", id }
    }
    fn c(id: &str) -> Holder<'_> {
        Holder { tenant: "c", id }
    }
    bus.advertise(pool, "node", 8, long).await.unwrap();
    // Tenant a takes 6 of 8; the last 2 (a quarter) are the reserve.
    for i in 0..6 {
        let id = format!("a{i}");
        assert!(matches!(
            bus.lease(pool, a(&id), long, 0.25).await.unwrap(),
            Lease::Granted { .. }
        ));
    }
    assert_eq!(
        bus.lease(pool, a("a6"), long, 0.25).await.unwrap(),
        Lease::OverShare {
            capacity: 8,
            held: 6,
            tenants: 1
        }
    );
    // Its held slots still renew.
    assert!(matches!(
        bus.lease(pool, a("a0"), long, 0.25).await.unwrap(),
        Lease::Granted { used: 6, .. }
    ));
    // Tenant b holds nothing (share 4 of 8 with a): it gets the reserve.
    assert!(matches!(
        bus.lease(pool, b("b0"), long, 0.25).await.unwrap(),
        Lease::Granted { used: 7, .. }
    ));
    // a stays over its share (6 of 8 with two tenants); c, new, is below its own.
    assert!(matches!(
        bus.lease(pool, a("a6"), long, 0.25).await.unwrap(),
        Lease::OverShare {
            held: 6,
            tenants: 2,
            ..
        }
    ));
    assert!(matches!(
        bus.lease(pool, c("c0"), long, 0.25).await.unwrap(),
        Lease::Granted { used: 8, .. }
    ));
    assert_eq!(
        bus.lease(pool, b("b1"), long, 0.25).await.unwrap(),
        Lease::Full { capacity: 8 }
    );
    // a ends a session: the slot is in the reserve again, b (1 of a 8/3 share) takes it.
    bus.release(pool, a("a5")).await.unwrap();
    assert!(matches!(
        bus.lease(pool, a("a5"), long, 0.25).await.unwrap(),
        Lease::OverShare {
            held: 5,
            tenants: 3,
            ..
        }
    ));
    assert!(matches!(
        bus.lease(pool, b("b1"), long, 0.25).await.unwrap(),
        Lease::Granted { used: 8, .. }
    ));
    // Without a reserve, first come first served.
    bus.release(pool, b("b1")).await.unwrap();
    assert!(matches!(
        bus.lease(pool, a("a5"), long, 0.0).await.unwrap(),
        Lease::Granted { used: 8, .. }
    ));
}

/// Records: replaced by put, kept by put_new, gone after delete or their
/// time, kept longer by keep.
async fn records_keep_the_first_or_the_latest(bus: impl Bus, n: &Names) {
    let (k, long) = (&n.s, Duration::from_secs(60));
    assert_eq!(bus.get(k).await.unwrap(), None);
    assert_eq!(bus.put_new(k, b"a".to_vec(), long).await.unwrap(), None);
    assert_eq!(
        bus.put_new(k, b"b".to_vec(), long).await.unwrap(),
        Some(b"a".to_vec())
    );
    assert_eq!(bus.get(k).await.unwrap(), Some(b"a".to_vec()));
    bus.put(k, b"c".to_vec(), long).await.unwrap();
    assert_eq!(bus.get(k).await.unwrap(), Some(b"c".to_vec()));
    bus.delete(k).await.unwrap();
    assert_eq!(bus.get(k).await.unwrap(), None);
    bus.put(k, b"d".to_vec(), Duration::from_millis(100))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(bus.get(k).await.unwrap(), None);
    assert_eq!(bus.put_new(k, b"e".to_vec(), long).await.unwrap(), None);
    // keep: a short-lived record kept longer keeps its value; a gone one stays gone.
    bus.put(k, b"f".to_vec(), Duration::from_millis(100))
        .await
        .unwrap();
    assert!(bus.keep(k, long).await.unwrap());
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(bus.get(k).await.unwrap(), Some(b"f".to_vec()));
    bus.delete(k).await.unwrap();
    assert!(!bus.keep(k, long).await.unwrap());
    assert_eq!(bus.get(k).await.unwrap(), None);
}

/// Leases renewed and released only by their holder; records written together.
async fn records_compare_and_set(bus: impl Bus, n: &Names) {
    let (k, long) = (&n.s, Duration::from_secs(60));
    assert!(!bus.put_if(k, b"me", b"me".to_vec(), long).await.unwrap());
    assert_eq!(bus.get(k).await.unwrap(), None);
    bus.put_new(k, b"me".to_vec(), long).await.unwrap();
    assert!(bus.put_if(k, b"me", b"me".to_vec(), long).await.unwrap());
    // Another runner took the lease over: the old holder neither renews nor releases it.
    bus.put(k, b"other".to_vec(), long).await.unwrap();
    assert!(!bus.put_if(k, b"me", b"me".to_vec(), long).await.unwrap());
    assert!(!bus.delete_if(k, b"me").await.unwrap());
    assert_eq!(bus.get(k).await.unwrap(), Some(b"other".to_vec()));
    assert!(bus.delete_if(k, b"other").await.unwrap());
    assert_eq!(bus.get(k).await.unwrap(), None);
    let (a, b) = (format!("{}:{{x}}a", n.log), format!("{}:{{x}}b", n.log));
    let recs = |v: &str| {
        vec![
            (a.clone(), v.as_bytes().to_vec()),
            (b.clone(), v.as_bytes().to_vec()),
        ]
    };
    assert_eq!(bus.put_all_new(recs("1"), long).await.unwrap(), None);
    assert_eq!(
        bus.put_all_new(recs("2"), long).await.unwrap(),
        Some(b"1".to_vec())
    );
    assert_eq!(bus.get(&b).await.unwrap(), Some(b"1".to_vec()));
    bus.delete(&a).await.unwrap();
    bus.delete(&b).await.unwrap();
}

/// Touched entries do not look idle; untouched they are claimed again.
async fn touched_entries_stay_with_their_consumer(bus: impl Bus, n: &Names) {
    bus.ensure_group(&n.s, "g").await.unwrap();
    bus.add(&n.s, fields("1"), StreamLimits::default())
        .await
        .unwrap();
    let got = bus
        .read_group(&n.s, "g", "c1", 10, Duration::from_millis(10))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    let ids = [got[0].id];
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(120)).await;
        bus.touch(&n.s, "g", "c1", &ids).await.unwrap();
        let stolen = bus
            .claim_stale(
                &n.s,
                "g",
                "c2",
                Duration::from_millis(200),
                10,
                StreamLimits::default(),
                &n.dlq,
            )
            .await
            .unwrap();
        assert!(stolen.is_empty(), "a touched entry was claimed");
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    let stolen = bus
        .claim_stale(
            &n.s,
            "g",
            "c2",
            Duration::from_millis(200),
            10,
            StreamLimits::default(),
            &n.dlq,
        )
        .await
        .unwrap();
    assert_eq!(stolen.len(), 1);
}

macro_rules! both {
    ($name:ident, $check:ident) => {
        mod $name {
            use super::*;

            #[tokio::test]
            async fn memory() {
                $check(MemoryBus::new(), &names(stringify!($name))).await;
            }

            #[tokio::test]
            async fn redis() {
                let n = names(stringify!($name));
                $check(super::redis().await, &n).await;
                let (unique, nodes, leases) = (
                    format!("{}:unique", n.log),
                    format!("{}:nodes", n.pool),
                    format!("{}:leases", n.pool),
                );
                cleanup(&[&n.s, &n.dlq, &n.log, &unique, &nodes, &leases]).await;
            }
        }
    };
}

both!(groups, groups_deliver_each_entry_once_per_group);
both!(positions, group_positions_count_lag_and_pending);
both!(
    redelivery,
    unacked_entries_are_redelivered_then_dead_lettered
);
both!(backpressure, a_full_backlog_pushes_back_until_acked);
both!(trimmed, acknowledged_entries_leave_the_stream);
both!(dead_letter_cap, dead_letters_keep_only_the_newest);
both!(blocking, blocked_readers_wake_and_logs_resume);
both!(idempotent, idempotent_results_never_land_twice);
both!(pool, capacity_pool_leases_slots);
both!(
    pool_share,
    a_pool_keeps_its_reserve_for_tenants_below_their_share
);
both!(records, records_keep_the_first_or_the_latest);
both!(touch, touched_entries_stay_with_their_consumer);
both!(compare_and_set, records_compare_and_set);

#[tokio::test]
async fn unreachable_redis_is_a_retryable_error() {
    let e = RedisBus::connect("redis://127.0.0.1:1").await.unwrap_err();
    assert!(matches!(e, BusError::Unavailable(_)), "{e}");
}
