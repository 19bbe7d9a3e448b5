//! Reading a stage's work: new entries for this replica, and entries a crashed
//! or hung replica left unacknowledged, taken over after an idle time. Outages
//! of the bus are waited out with backoff instead of failing the stage.

use std::future::Future;
use std::time::{Duration, Instant};

use nexus_bus::{Bus, BusError, Entry, EntryId, StreamLimits};
use tokio_util::sync::CancellationToken;

/// Retries `f` while the bus is unavailable (a Redis restart, a network blip),
/// backing off from 50 ms to 1 s, until `budget` runs out or `shutdown` fires.
/// Other errors return at once.
pub async fn retry<T, F, Fut>(
    what: &str,
    budget: Duration,
    shutdown: &CancellationToken,
    mut f: F,
) -> Result<T, BusError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, BusError>>,
{
    let start = Instant::now();
    let mut wait = Duration::from_millis(50);
    loop {
        match f().await {
            Err(BusError::Unavailable(e))
                if start.elapsed() + wait < budget && !shutdown.is_cancelled() =>
            {
                tracing::warn!(what, error = %e, retry_in = ?wait, "bus unavailable");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => {}
                }
                wait = (wait * 2).min(Duration::from_secs(1));
            }
            r => return r,
        }
    }
}

/// A replica's view of one stage stream.
#[derive(Debug)]
pub struct StageReader<B: Bus> {
    bus: B,
    stream: String,
    group: String,
    consumer: String,
    dead_letter: String,
    limits: StreamLimits,
    claim_idle: Duration,
    next_claim: Instant,
    failures: u32,
}

impl<B: Bus> StageReader<B> {
    /// A reader of `stream` in `group` under the name `consumer`.
    pub fn new(
        bus: B,
        stream: String,
        group: &str,
        consumer: &str,
        dead_letter: String,
        limits: StreamLimits,
        claim_idle: Duration,
    ) -> Self {
        Self {
            bus,
            stream,
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            dead_letter,
            limits,
            claim_idle,
            next_claim: Instant::now(),
            failures: 0,
        }
    }

    /// A reader of one of the fleet's stages (`crate::stages`) in `group`
    /// under this replica's name, its group created (waiting for the bus to
    /// answer) before it returns.
    pub async fn for_stage(
        bus: B,
        fleet: &crate::Fleet,
        stage: &str,
        group: &str,
        shutdown: &CancellationToken,
    ) -> Result<Self, BusError> {
        let reader = Self::new(
            bus,
            crate::stages::stream(&fleet.keys, stage),
            group,
            &fleet.node,
            fleet.keys.dead_letter(stage),
            fleet.limits,
            fleet.claim_idle,
        );
        reader.join(shutdown).await?;
        Ok(reader)
    }

    /// Creates the consumer group if needed, waiting for the bus to answer.
    pub async fn join(&self, shutdown: &CancellationToken) -> Result<(), BusError> {
        retry("join group", Duration::MAX, shutdown, || {
            self.bus.ensure_group(&self.stream, &self.group)
        })
        .await
    }

    /// Up to `max` entries: first those other replicas left idle too long (looked
    /// for every half idle time), else new ones, waiting up to `block`. Returns
    /// an empty batch after an outage (logged) and `None` once `shutdown` fires.
    pub async fn next(
        &mut self,
        max: usize,
        block: Duration,
        shutdown: &CancellationToken,
    ) -> Option<Vec<Entry>> {
        if shutdown.is_cancelled() {
            return None;
        }
        if Instant::now() >= self.next_claim {
            self.next_claim = Instant::now() + self.claim_idle / 2;
            match self
                .bus
                .claim_stale(
                    &self.stream,
                    &self.group,
                    &self.consumer,
                    self.claim_idle,
                    max,
                    self.limits,
                    &self.dead_letter,
                )
                .await
            {
                Ok(claimed) if !claimed.is_empty() => {
                    tracing::info!(
                        stream = %self.stream,
                        entries = claimed.len(),
                        "took over work another replica left unacknowledged"
                    );
                    self.failures = 0;
                    return Some(claimed);
                }
                Ok(_) => {}
                Err(e) => return self.failed(e, shutdown).await,
            }
        }
        let read = tokio::select! {
            r = self.bus.read_group(&self.stream, &self.group, &self.consumer, max, block) => r,
            _ = shutdown.cancelled() => return None,
        };
        match read {
            Ok(entries) => {
                self.failures = 0;
                Some(entries)
            }
            Err(e) => self.failed(e, shutdown).await,
        }
    }

    async fn failed(&mut self, e: BusError, shutdown: &CancellationToken) -> Option<Vec<Entry>> {
        self.failures += 1;
        let wait = Duration::from_millis(50 * 2u64.pow(self.failures.min(5)));
        tracing::warn!(stream = %self.stream, error = %e, retry_in = ?wait, "reading work failed");
        if matches!(e, BusError::NoGroup(_)) {
            // The server lost the group (restarted without persistence): make it again.
            let _ = self.bus.ensure_group(&self.stream, &self.group).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => Some(Vec::new()),
            _ = shutdown.cancelled() => None,
        }
    }

    /// Acknowledges finished entries (see [`Acker::ack`]).
    pub async fn ack(&self, ids: &[EntryId]) {
        self.acker().ack(ids).await;
    }

    /// A handle that acknowledges this reader's entries from other tasks.
    pub fn acker(&self) -> Acker<B> {
        Acker {
            bus: self.bus.clone(),
            stream: self.stream.clone(),
            group: self.group.clone(),
            consumer: self.consumer.clone(),
        }
    }

    /// The stream read.
    pub fn stream(&self) -> &str {
        &self.stream
    }
}

/// Acknowledges a stage's entries.
#[derive(Debug, Clone)]
pub struct Acker<B: Bus> {
    bus: B,
    stream: String,
    group: String,
    consumer: String,
}

/// How long [`Acker::keep_fresh`] keeps entries fresh at most.
pub const KEEP_FRESH_MAX: Duration = Duration::from_secs(300);

/// Keeps entries fresh while it lives (see [`Acker::keep_fresh`]).
#[derive(Debug)]
pub struct KeepFresh(tokio::task::JoinHandle<()>);

impl Drop for KeepFresh {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<B: Bus> Acker<B> {
    /// Marks `ids` as still in work every `every` until the guard drops, so a
    /// long step (a queue, a translation) is not taken over as if this replica
    /// had died. It stops after [`KEEP_FRESH_MAX`]: work stuck that long is
    /// left for another replica to take over, as from a hung one.
    pub fn keep_fresh(&self, ids: Vec<EntryId>, every: Duration) -> KeepFresh {
        let me = self.clone();
        let until = tokio::time::Instant::now() + KEEP_FRESH_MAX;
        KeepFresh(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if tokio::time::Instant::now() >= until {
                    tracing::warn!(stream = %me.stream, ?ids, "entries in work too long; no longer kept fresh");
                    return;
                }
                if let Err(e) = me
                    .bus
                    .touch(&me.stream, &me.group, &me.consumer, &ids)
                    .await
                {
                    tracing::warn!(stream = %me.stream, error = %e, "keeping entries fresh failed");
                }
            }
        }))
    }

    /// Acknowledges finished entries, retrying through an outage for up to a minute.
    /// An entry that cannot be acknowledged is redelivered later; results are
    /// idempotent, so that costs work, never correctness.
    pub async fn ack(&self, ids: &[EntryId]) {
        if ids.is_empty() {
            return;
        }
        let never = CancellationToken::new();
        if let Err(e) = retry("ack", Duration::from_secs(60), &never, || {
            self.bus.ack(&self.stream, &self.group, ids)
        })
        .await
        {
            tracing::warn!(stream = %self.stream, error = %e, "acknowledging failed; the work will be redone");
        }
    }
}
