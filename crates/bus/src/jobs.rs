//! The records of a batch transcription job, shared by everything that
//! submits, runs or watches jobs (ingest's API and job runners, the Kubernetes
//! operator).
//!
//! A job is a handful of records under [`Keys::job`]: `spec` (what to do),
//! `status` (a `nexus.speech.v1.Job`), `audio` (uploaded bytes, when no URI),
//! `result` (the transcript as JSON), `cancel` (set to ask for cancellation)
//! and `runner` (the lease of the replica running it), plus one entry on the
//! [`JOBS`] or [`JOBS_URGENT`] stream whose `job` field names it.

use std::time::Duration;

use nexus_proto::pipeline::JobSpec;
use nexus_proto::speech::{Job, JobState};
use prost::Message;

use crate::{Bus, BusError, Fields, Keys, SessionId, StreamLimits};

/// Work stream of batch transcription jobs, read by job runners (ingest replicas).
pub const JOBS: &str = "jobs";
/// Work stream of batch jobs with a positive priority, read before [`JOBS`].
pub const JOBS_URGENT: &str = "jobs-urgent";
/// Consumer group of the job runners.
pub const JOB_GROUP: &str = "jobs";
/// Entry field naming the job.
pub const FIELD_JOB: &str = "job";
/// How long a job's records (and its idempotency key) last until the queue
/// holds the job: what a submitter that dies half-way leaves behind lapses
/// after this.
pub const PENDING_TTL: Duration = Duration::from_secs(60);

/// The records a submit writes (`audio` only for uploaded content).
const SUBMITTED_PARTS: [&str; 3] = ["status", "audio", "spec"];

/// Whether a job state is final.
pub fn terminal(state: i32) -> bool {
    state == JobState::Succeeded as i32
        || state == JobState::Failed as i32
        || state == JobState::Cancelled as i32
}

/// What [`JobStore::submit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    /// The job's records were written and its entry queued.
    Queued,
    /// A job with this id was submitted before; nothing was written.
    Exists,
}

/// The job records of one fleet, on one bus.
#[derive(Clone)]
pub struct JobStore<B> {
    bus: B,
    keys: Keys,
    ttl: Duration,
    limits: StreamLimits,
}

impl<B: Bus> JobStore<B> {
    /// Records live for `ttl`; the job streams hold at most `limits.max_backlog` jobs.
    pub fn new(bus: B, keys: Keys, ttl: Duration, limits: StreamLimits) -> Self {
        Self {
            bus,
            keys,
            ttl,
            limits,
        }
    }

    /// How long records are kept.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The key of one of a job's records.
    pub fn key(&self, id: &SessionId, part: &str) -> String {
        self.keys.job(id, part)
    }

    /// The stream a job of this priority waits on.
    pub fn stream(&self, urgent: bool) -> String {
        self.keys
            .stage_stream(if urgent { JOBS_URGENT } else { JOBS }, 0)
    }

    /// Writes a new job's records and queues it. The records (spec, audio,
    /// status) are written in one step, only if the spec is absent, so
    /// submitting one id twice (a retried call, a controller reconciling
    /// again) queues it once and no half-written job is ever seen. On a full
    /// queue the records are removed again and [`BusError::Full`] returned.
    ///
    /// The records and the queue live under different hash tags, so no one
    /// step can write both. The records are therefore written to last
    /// [`PENDING_TTL`] only, and kept for the job's full time once the queue
    /// holds the job. A submitter that dies in between leaves no job that
    /// looks queued but never runs: its records lapse within a minute.
    pub async fn submit(
        &self,
        spec: &JobSpec,
        job: &Job,
        audio: Option<Vec<u8>>,
        urgent: bool,
    ) -> Result<Submitted, BusError> {
        let id = SessionId::parse(&spec.job_id)?;
        let mut records = vec![(self.key(&id, "spec"), spec.encode_to_vec())];
        if let Some(audio) = audio {
            records.push((self.key(&id, "audio"), audio));
        }
        records.push((self.key(&id, "status"), job.encode_to_vec()));
        if self
            .bus
            .put_all_new(records, PENDING_TTL.min(self.ttl))
            .await?
            .is_some()
        {
            return Ok(Submitted::Exists);
        }
        let fields: Fields = [(FIELD_JOB.to_owned(), id.as_str().as_bytes().to_vec())]
            .into_iter()
            .collect();
        // The runners' group counts the queue: made here too, so the bound
        // holds before any runner has started.
        let stream = self.stream(urgent);
        let queued = match self.bus.ensure_group(&stream, JOB_GROUP).await {
            Ok(()) => self.bus.add(&stream, fields, self.limits).await,
            Err(e) => Err(e),
        };
        match queued {
            Ok(_) => {
                for part in SUBMITTED_PARTS {
                    // Absent when there is no audio, or once a runner finished
                    // and removed it.
                    self.bus.keep(&self.key(&id, part), self.ttl).await?;
                }
                Ok(Submitted::Queued)
            }
            Err(e) => {
                for part in SUBMITTED_PARTS {
                    let _ = self.bus.delete(&self.key(&id, part)).await;
                }
                Err(e)
            }
        }
    }

    /// Writes a job's status record.
    pub async fn put_status(&self, job: &Job) -> Result<(), BusError> {
        let id = SessionId::parse(&job.job_id)?;
        self.bus
            .put(&self.key(&id, "status"), job.encode_to_vec(), self.ttl)
            .await
    }

    /// The job's spec; `None` when unknown or expired.
    pub async fn spec(&self, id: &SessionId) -> Result<Option<JobSpec>, BusError> {
        let Some(b) = self.bus.get(&self.key(id, "spec")).await? else {
            return Ok(None);
        };
        JobSpec::decode(b.as_slice())
            .map(Some)
            .map_err(|source| BusError::Corrupt {
                ty: "JobSpec",
                source,
            })
    }

    /// The job's status, shown CANCELLED while a cancel request is pending;
    /// `None` when unknown or expired.
    pub async fn status(&self, id: &SessionId) -> Result<Option<Job>, BusError> {
        let Some(b) = self.bus.get(&self.key(id, "status")).await? else {
            return Ok(None);
        };
        let mut job =
            Job::decode(b.as_slice()).map_err(|source| BusError::Corrupt { ty: "Job", source })?;
        if !terminal(job.state) && self.cancel_requested(id).await? {
            job.state = JobState::Cancelled as i32;
            job.error = "cancelled by request".into();
        }
        Ok(Some(job))
    }

    /// Asks the job's runner to stop it (it notices within a second).
    pub async fn cancel(&self, id: &SessionId) -> Result<(), BusError> {
        self.bus
            .put(&self.key(id, "cancel"), b"1".to_vec(), self.ttl)
            .await
    }

    /// Whether cancellation was asked for.
    pub async fn cancel_requested(&self, id: &SessionId) -> Result<bool, BusError> {
        Ok(self.bus.get(&self.key(id, "cancel")).await?.is_some())
    }

    /// The job's transcript (JSON of `nexus_transcript::Transcript`), once it succeeded.
    pub async fn result(&self, id: &SessionId) -> Result<Option<Vec<u8>>, BusError> {
        self.bus.get(&self.key(id, "result")).await
    }

    /// Stores the job's transcript.
    pub async fn put_result(&self, id: &SessionId, transcript: Vec<u8>) -> Result<(), BusError> {
        self.bus
            .put(&self.key(id, "result"), transcript, self.ttl)
            .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::MemoryBus;

    fn store(backlog: usize) -> JobStore<MemoryBus> {
        JobStore::new(
            MemoryBus::default(),
            Keys::default(),
            Duration::from_secs(60),
            StreamLimits {
                max_backlog: backlog,
                max_deliveries: 3,
            },
        )
    }

    fn job(id: &str) -> (JobSpec, Job) {
        let spec = JobSpec {
            job_id: id.into(),
            uri: "file:///a.wav".into(),
            ..Default::default()
        };
        let job = Job {
            job_id: id.into(),
            state: JobState::Queued as i32,
            ..Default::default()
        };
        (spec, job)
    }

    #[tokio::test]
    async fn a_job_is_queued_once_and_cancel_shows_in_its_status() {
        let s = store(10);
        let (spec, j) = job("j1");
        assert_eq!(
            s.submit(&spec, &j, None, false).await.unwrap(),
            Submitted::Queued
        );
        assert_eq!(
            s.submit(&spec, &j, None, false).await.unwrap(),
            Submitted::Exists
        );
        let id = SessionId::parse("j1").unwrap();
        assert_eq!(s.spec(&id).await.unwrap().unwrap().uri, "file:///a.wav");
        assert_eq!(
            s.status(&id).await.unwrap().unwrap().state,
            JobState::Queued as i32
        );
        s.cancel(&id).await.unwrap();
        let st = s.status(&id).await.unwrap().unwrap();
        assert_eq!(st.state, JobState::Cancelled as i32);
        assert_eq!(st.error, "cancelled by request");
        assert!(
            s.status(&SessionId::parse("j2").unwrap())
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_full_queue_leaves_no_records_behind() {
        // No runner has joined yet: the bound holds all the same.
        let s = store(1);
        let (spec, j) = job("j1");
        s.submit(&spec, &j, Some(vec![1, 2]), false).await.unwrap();
        let (spec, j) = job("j2");
        let err = s.submit(&spec, &j, Some(vec![1, 2]), false).await;
        assert!(matches!(err, Err(BusError::Full { .. })), "{err:?}");
        let id = SessionId::parse("j2").unwrap();
        for part in ["spec", "status", "audio"] {
            assert!(
                s.bus.get(&s.key(&id, part)).await.unwrap().is_none(),
                "{part}"
            );
        }
    }
}
