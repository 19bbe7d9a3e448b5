//! `nexus.speech.v1.TranscriptionJobs`: batch transcription of recordings.
//!
//! A job is a handful of records on the bus (status, spec, uploaded audio,
//! result, cancel flag, runner lease) and one entry on the `jobs` stream (or
//! `jobs-urgent` for positive priority). Ingest replicas run jobs: a runner
//! takes an entry, holds the job's runner lease while it works (renewed every
//! third of its time), and acknowledges the entry when the job reached a final
//! state. A runner that dies leaves the entry pending and its lease expiring;
//! another runner (or the same service restarted) claims the entry and starts
//! the job again. On Redis, jobs therefore survive restarts of every service.

use std::time::Duration;

use futures::Stream;
use nexus_bus::jobs::{FIELD_JOB, JobStore, Submitted, terminal};
use nexus_bus::{Bus, BusError, SessionId, StreamLimits};
use nexus_fleet::{StageReader, now_unix_ms, stages};
use nexus_proto::pipeline::JobSpec;
use nexus_proto::speech::submit_job_request::Source;
use nexus_proto::speech::transcription_jobs_server::TranscriptionJobs;
use nexus_proto::speech::{
    CancelJobRequest, GetJobRequest, GetJobResultRequest, GetJobResultResponse, Job, JobOutput,
    JobState, OutputFormat, SubmitJobRequest, Task,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::recognize::Progress;
use crate::{Ingest, invalid};

/// Longest idempotency key, in bytes.
const MAX_IDEMPOTENCY_KEY: usize = 256;
/// Most labels on a job, and the longest key and value (bytes), as Kubernetes allows.
const MAX_LABELS: usize = 32;
const MAX_LABEL_KEY: usize = 63;
const MAX_LABEL_VALUE: usize = 256;

/// Settings of the job runner of an ingest replica.
#[derive(Debug, Clone, clap::Args)]
pub struct JobArgs {
    /// Batch jobs this replica runs at once; 0 runs none (the API still accepts them).
    #[arg(long, env = "NEXUS_JOB_WORKERS", default_value_t = 1)]
    pub job_workers: usize,
    /// A job's runner lease: a runner silent this long is taken to be gone and
    /// its job is started again elsewhere.
    #[arg(long, env = "NEXUS_JOB_LEASE_MS", default_value_t = 30_000)]
    pub job_lease_ms: u64,
    /// How long jobs, their audio and results are kept, in hours.
    #[arg(long, env = "NEXUS_JOB_TTL_H", default_value_t = 168)]
    pub job_ttl_h: u64,
    /// Attempts before a job that keeps failing is failed.
    #[arg(long, env = "NEXUS_JOB_ATTEMPTS", default_value_t = 3)]
    pub job_attempts: u32,
    /// Jobs waiting in the queue at most; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "NEXUS_JOB_QUEUE", default_value_t = 10_000)]
    pub job_queue: usize,
}

impl Default for JobArgs {
    fn default() -> Self {
        Self {
            job_workers: 1,
            job_lease_ms: 30_000,
            job_ttl_h: 168,
            job_attempts: 3,
            job_queue: 10_000,
        }
    }
}

impl JobArgs {
    fn ttl(&self) -> Duration {
        Duration::from_secs(self.job_ttl_h.max(1) * 3600)
    }
    fn lease(&self) -> Duration {
        Duration::from_millis(self.job_lease_ms.max(300))
    }
    fn limits(&self) -> StreamLimits {
        StreamLimits {
            max_backlog: self.job_queue.max(1),
            // A long job's entry is claimed by live runners again and again
            // (they give it back while its lease lives); attempts are counted
            // in the job itself.
            max_deliveries: u32::MAX,
        }
    }
}

fn state_name(state: i32) -> &'static str {
    JobState::try_from(state).map_or("UNKNOWN", |s| s.as_str_name())
}

fn bus_status(e: BusError) -> Status {
    Status::unavailable(format!("the job store is unreachable: {e}; retry"))
}

/// The TranscriptionJobs service of an ingest replica.
pub struct JobsService<B: Bus>(pub(crate) Ingest<B>);

impl<B: Bus> Ingest<B> {
    fn key(&self, id: &SessionId, part: &str) -> String {
        self.inner.cfg.fleet.keys.job(id, part)
    }

    /// The fleet's job records.
    pub(crate) fn job_store(&self) -> JobStore<B> {
        JobStore::new(
            self.inner.bus.clone(),
            self.inner.cfg.fleet.keys.clone(),
            self.inner.jobs.ttl(),
            self.inner.jobs.limits(),
        )
    }

    fn job_id(id: &str) -> Result<SessionId, Status> {
        SessionId::parse(id).map_err(|_| invalid(format!("job_id {id:?} is not a job id")))
    }

    async fn put_job(&self, job: &Job) -> Result<(), BusError> {
        self.job_store().put_status(job).await
    }

    /// The job as its owner sees it; NOT_FOUND for unknown jobs and other tenants' jobs.
    async fn load_job(&self, id: &SessionId, tenant: &str) -> Result<Job, Status> {
        self.check_owner(id, tenant).await?;
        self.job_status(id).await
    }

    /// NOT_FOUND unless the job exists and belongs to `tenant` (any tenant's
    /// when the API is open).
    async fn check_owner(&self, id: &SessionId, tenant: &str) -> Result<(), Status> {
        let not_found = || Status::not_found(format!("no job {id}; it may have expired"));
        let spec = self
            .job_store()
            .spec(id)
            .await
            .map_err(bus_status)?
            .ok_or_else(not_found)?;
        if self.inner.access.requires_keys() && spec.tenant != tenant {
            return Err(not_found());
        }
        Ok(())
    }

    /// The job's status record, cancelled when a cancel request is pending.
    async fn job_status(&self, id: &SessionId) -> Result<Job, Status> {
        self.job_store()
            .status(id)
            .await
            .map_err(bus_status)?
            .ok_or_else(|| Status::not_found(format!("no job {id}; it may have expired")))
    }

    async fn submit(&self, r: SubmitJobRequest, tenant: String) -> Result<Job, Status> {
        let inner = &self.inner;
        let mut rc = r.config.ok_or_else(|| invalid("config is required"))?;
        self.check_config(&mut rc).await?;
        let now = now_unix_ms();
        if r.deadline_unix_ms != 0 && r.deadline_unix_ms <= now {
            return Err(invalid(format!(
                "deadline_unix_ms {} has passed (now is {now}); give a later time or 0 for none",
                r.deadline_unix_ms
            )));
        }
        let mut formats = Vec::new();
        for f in &r.output_formats {
            match OutputFormat::try_from(*f) {
                Ok(OutputFormat::Unspecified) | Err(_) => {
                    return Err(invalid(format!(
                        "output_formats holds {f}, which is not a format; use TEXT, JSON, VERBOSE_JSON, SRT or VTT"
                    )));
                }
                Ok(f) => {
                    if !formats.contains(&(f as i32)) {
                        formats.push(f as i32);
                    }
                }
            }
        }
        if formats.is_empty() {
            formats.push(OutputFormat::Json as i32);
        }
        let (uri, content) = match r.source {
            Some(Source::Uri(u)) => {
                // Checked now, read when the job runs.
                self.check_uri(&u).await?;
                (u, None)
            }
            Some(Source::Content(c)) if c.is_empty() => {
                return Err(invalid("content is empty; send the audio file's bytes"));
            }
            Some(Source::Content(c)) => {
                inner
                    .limits
                    .check_bytes(c.len() as u64)
                    .map_err(|e| invalid(e.to_string()))?;
                (String::new(), Some(c))
            }
            None => return Err(invalid("no audio: set content (the file's bytes) or uri")),
        };
        if !(0..=1).contains(&r.priority) {
            return Err(invalid(format!(
                "priority is {}; use 0 (normal) or 1 (urgent: runs before every normal job)",
                r.priority
            )));
        }
        if r.labels.len() > MAX_LABELS {
            return Err(invalid(format!(
                "labels has {} entries; the limit is {MAX_LABELS}",
                r.labels.len()
            )));
        }
        if let Some((k, v)) = r
            .labels
            .iter()
            .find(|(k, v)| k.len() > MAX_LABEL_KEY || v.len() > MAX_LABEL_VALUE)
        {
            return Err(invalid(format!(
                "label {:?} is {} bytes with a value of {} bytes; the limits are {MAX_LABEL_KEY} and {MAX_LABEL_VALUE}",
                k.chars().take(40).collect::<String>(),
                k.len(),
                v.len()
            )));
        }
        if r.idempotency_key.len() > MAX_IDEMPOTENCY_KEY {
            return Err(invalid(format!(
                "idempotency_key is {} bytes; the limit is {MAX_IDEMPOTENCY_KEY}",
                r.idempotency_key.len()
            )));
        }
        let id = SessionId::parse(&uuid::Uuid::new_v4().to_string())
            .map_err(|e| Status::internal(e.to_string()))?;
        let ttl = inner.jobs.ttl();
        let bus = &inner.bus;
        let idempotency = (!r.idempotency_key.is_empty()).then(|| {
            inner
                .cfg
                .fleet
                .keys
                .job_idempotency(&tenant, &r.idempotency_key)
        });
        // The key lasts as long as the job's records do: pending (a minute)
        // until the queue holds the job, then the job's full time. So a key
        // whose submitter died before queueing lapses within the minute.
        if let Some(key) = &idempotency
            && let Some(existing) = bus
                .put_new(
                    key,
                    id.as_str().as_bytes().to_vec(),
                    nexus_bus::jobs::PENDING_TTL.min(ttl),
                )
                .await
                .map_err(bus_status)?
        {
            let named = Self::job_id(&String::from_utf8_lossy(&existing))?;
            return match self.load_job(&named, &tenant).await {
                // Its records are not there: another call with this key is
                // writing them, or its submitter died before it could.
                Err(e) if e.code() == tonic::Code::NotFound => Err(Status::unavailable(format!(
                    "idempotency_key {:?} names job {named}, whose submission is in progress or was abandoned; retry (an abandoned key lapses within {} s)",
                    r.idempotency_key,
                    nexus_bus::jobs::PENDING_TTL.as_secs()
                ))),
                found => found,
            };
        }
        let spec = JobSpec {
            job_id: id.to_string(),
            tenant,
            config: Some(rc),
            uri,
            output_formats: formats,
            deadline_unix_ms: r.deadline_unix_ms,
        };
        let job = Job {
            job_id: id.to_string(),
            state: JobState::Queued as i32,
            created_unix_ms: now,
            updated_unix_ms: now,
            labels: r.labels,
            ..Default::default()
        };
        let failed = match self
            .job_store()
            .submit(&spec, &job, content.map(|c| c.to_vec()), r.priority > 0)
            .await
        {
            Ok(Submitted::Queued) => None,
            Ok(Submitted::Exists) => {
                Some(Status::internal(format!("job id {id} was taken; retry")))
            }
            Err(BusError::Full { backlog, .. }) => Some(Status::resource_exhausted(format!(
                "{backlog} jobs are queued already; retry later"
            ))),
            Err(e) => Some(bus_status(e)),
        };
        if let Some(status) = failed {
            // The key names no job: a retry with it must submit afresh, not
            // find a job that never was.
            if let Some(key) = &idempotency
                && let Err(e) = bus.delete_if(key, id.as_str().as_bytes()).await
            {
                tracing::warn!(error = %e, "releasing an idempotency key failed; it expires with its TTL");
            }
            return Err(status);
        }
        if let Some(key) = &idempotency
            && let Err(e) = bus.keep(key, ttl).await
        {
            tracing::warn!(job = %id, error = %e, "keeping an idempotency key failed; it lapses within a minute");
        }
        tracing::info!(job = %id, priority = r.priority, "job queued");
        Ok(job)
    }

    async fn cancel(&self, id: &SessionId, tenant: &str) -> Result<Job, Status> {
        let job = self.load_job(id, tenant).await?;
        if terminal(job.state) && job.state != JobState::Cancelled as i32 {
            return Err(Status::failed_precondition(format!(
                "job {id} is {} already; only queued or running jobs can be cancelled",
                state_name(job.state)
            )));
        }
        self.job_store().cancel(id).await.map_err(bus_status)?;
        self.load_job(id, tenant).await
    }

    async fn result(
        &self,
        r: GetJobResultRequest,
        tenant: &str,
    ) -> Result<GetJobResultResponse, Status> {
        let id = Self::job_id(&r.job_id)?;
        let job = self.load_job(&id, tenant).await?;
        if job.state != JobState::Succeeded as i32 {
            return Err(Status::failed_precondition(format!(
                "job {id} is {} ({:.0} %); its transcript is ready once it SUCCEEDED{}",
                state_name(job.state),
                job.progress * 100.0,
                if job.error.is_empty() {
                    String::new()
                } else {
                    format!(" (error: {})", job.error)
                }
            )));
        }
        let format = OutputFormat::try_from(r.format).unwrap_or(OutputFormat::Unspecified);
        let format = if format == OutputFormat::Unspecified {
            OutputFormat::Json
        } else {
            format
        };
        let fmt = nexus_transcript::Format::from(format);
        let stored = self
            .job_store()
            .result(&id)
            .await
            .map_err(bus_status)?
            .ok_or_else(|| Status::not_found(format!("the transcript of job {id} has expired")))?;
        let t: nexus_transcript::Transcript = serde_json::from_slice(&stored)
            .map_err(|e| Status::internal(format!("stored transcript unreadable: {e}")))?;
        Ok(GetJobResultResponse {
            format: format as i32,
            content: t.render(fmt).into_bytes().into(),
            content_type: fmt.content_type().to_owned(),
        })
    }
}

type JobStream = std::pin::Pin<Box<dyn Stream<Item = Result<Job, Status>> + Send>>;

#[tonic::async_trait]
impl<B: Bus> TranscriptionJobs for JobsService<B> {
    async fn submit_job(
        &self,
        request: Request<SubmitJobRequest>,
    ) -> Result<Response<Job>, Status> {
        let grant = self.0.inner.access.admit_grpc(request.metadata())?;
        let job = self
            .0
            .submit(request.into_inner(), grant.tenant.clone())
            .await?;
        Ok(Response::new(job))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let grant = self.0.inner.access.admit_grpc(request.metadata())?;
        let id = Ingest::<B>::job_id(&request.get_ref().job_id)?;
        Ok(Response::new(self.0.load_job(&id, &grant.tenant).await?))
    }

    type WatchJobStream = JobStream;

    async fn watch_job(
        &self,
        request: Request<GetJobRequest>,
    ) -> Result<Response<JobStream>, Status> {
        let grant = self.0.inner.access.admit_grpc(request.metadata())?;
        let id = Ingest::<B>::job_id(&request.get_ref().job_id)?;
        let first = self.0.load_job(&id, &grant.tenant).await?;
        let (tx, rx) = mpsc::channel(16);
        let ingest = self.0.clone();
        tokio::spawn(async move {
            let _grant = grant;
            let mut last = first;
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            while !terminal(last.state) {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = tx.closed() => return,
                }
                match ingest.job_status(&id).await {
                    Ok(j) if j != last => {
                        last = j.clone();
                        if tx.send(Ok(j)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<Job>, Status> {
        let grant = self.0.inner.access.admit_grpc(request.metadata())?;
        let id = Ingest::<B>::job_id(&request.get_ref().job_id)?;
        Ok(Response::new(self.0.cancel(&id, &grant.tenant).await?))
    }

    async fn get_job_result(
        &self,
        request: Request<GetJobResultRequest>,
    ) -> Result<Response<GetJobResultResponse>, Status> {
        let grant = self.0.inner.access.admit_grpc(request.metadata())?;
        Ok(Response::new(
            self.0.result(request.into_inner(), &grant.tenant).await?,
        ))
    }
}

/// How one attempt at a job ended.
enum Outcome {
    Done,
    Cancelled,
    /// Worth another attempt (the fleet failed midway).
    Retry(String),
    /// The decoder pool was full or absent: wait without spending an attempt.
    Busy(String),
    /// Not worth another attempt (bad audio, deadline passed).
    Fail(String),
}

/// Runs queued jobs until `shutdown`; `workers` at once.
pub(crate) async fn run_jobs<B: Bus>(ingest: Ingest<B>, shutdown: CancellationToken) {
    let args = ingest.inner.jobs.clone();
    if args.job_workers == 0 {
        return;
    }
    let keys = ingest.inner.cfg.fleet.keys.clone();
    let node = ingest.inner.cfg.fleet.node.clone();
    let reader = |stage: &str| {
        StageReader::new(
            ingest.inner.bus.clone(),
            stages::stream(&keys, stage),
            stages::JOB_GROUP,
            &node,
            keys.dead_letter(stage),
            args.limits(),
            args.lease(),
        )
    };
    let (mut urgent, mut normal) = (reader(stages::JOBS_URGENT), reader(stages::JOBS));
    for r in [&urgent, &normal] {
        if let Err(e) = r.join(&shutdown).await {
            tracing::error!(error = %e, "joining the job streams failed; no jobs run here");
            return;
        }
    }
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(args.job_workers));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.cancelled() => break,
        };
        let mut batch = urgent
            .next(1, Duration::from_millis(10), &shutdown)
            .await
            .unwrap_or_default();
        let mut from_urgent = true;
        if batch.is_empty() {
            from_urgent = false;
            match normal.next(1, Duration::from_secs(1), &shutdown).await {
                Some(b) => batch = b,
                None => break,
            }
        }
        let Some(entry) = batch.into_iter().next() else {
            continue;
        };
        let acker = if from_urgent {
            urgent.acker()
        } else {
            normal.acker()
        };
        let ingest = ingest.clone();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let Some(id) = entry
                .fields
                .get(FIELD_JOB)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|s| SessionId::parse(s).ok())
            else {
                tracing::error!(entry = %entry.id, "job entry without a job id dropped");
                acker.ack(&[entry.id]).await;
                return;
            };
            if ingest.run_job(&id, &stop).await {
                acker.ack(&[entry.id]).await;
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    // Running jobs stop with the service; their entries stay pending and
    // another runner takes them over once their leases lapse.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

impl<B: Bus> Ingest<B> {
    /// Runs one job to a final state; false when another runner holds it or
    /// this replica stops first (the entry stays pending).
    async fn run_job(&self, id: &SessionId, shutdown: &CancellationToken) -> bool {
        let inner = &self.inner;
        let bus = &inner.bus;
        let lease_key = self.key(id, "runner");
        let lease = inner.jobs.lease();
        let me = format!("{}:{}", inner.cfg.fleet.node, uuid::Uuid::new_v4());
        match bus.put_new(&lease_key, me.as_bytes().to_vec(), lease).await {
            Ok(None) => {}
            Ok(Some(_)) => {
                tracing::debug!(job = %id, "job held by a live runner; left to it");
                return false;
            }
            Err(e) => {
                tracing::warn!(job = %id, error = %e, "job store unreachable; the job waits");
                return false;
            }
        }
        let stop = CancellationToken::new();
        let lost = CancellationToken::new();
        let renew = {
            let (bus, key, me, stop, lost) = (
                bus.clone(),
                lease_key.clone(),
                me.clone(),
                stop.clone(),
                lost.clone(),
            );
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(lease / 3) => {}
                        _ = stop.cancelled() => return,
                    }
                    match bus
                        .put_if(&key, me.as_bytes(), me.as_bytes().to_vec(), lease)
                        .await
                    {
                        Ok(true) => {}
                        Ok(false) => {
                            // Another runner holds the job now (this one was
                            // silent past the lease): stop, never run it twice.
                            tracing::warn!(
                                "the job's runner lease went to another runner; stopping"
                            );
                            lost.cancel();
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "renewing a job's runner lease failed")
                        }
                    }
                }
            })
        };
        // One trace per job: its windows and the stages' work are children.
        let span = tracing::info_span!("job", job.id = %id);
        let finished = tokio::select! {
            f = tracing::Instrument::instrument(self.attempts(id), span) => f,
            _ = shutdown.cancelled() => false,
            _ = lost.cancelled() => false,
        };
        stop.cancel();
        let _ = renew.await;
        if finished {
            // Only our own lease: a runner that lost it leaves the new holder's.
            let _ = bus.delete_if(&lease_key, me.as_bytes()).await;
        }
        finished
    }

    /// Attempts a job until it ends; false when the job store could not be read.
    async fn attempts(&self, id: &SessionId) -> bool {
        let inner = &self.inner;
        let bus = &inner.bus;
        let (spec, mut job) = match (
            bus.get(&self.key(id, "spec")).await,
            bus.get(&self.key(id, "status")).await,
        ) {
            (Ok(Some(s)), Ok(Some(j))) => {
                match (JobSpec::decode(s.as_slice()), Job::decode(j.as_slice())) {
                    (Ok(s), Ok(j)) => (s, j),
                    _ => {
                        tracing::error!(job = %id, "unreadable job records; dropped");
                        return true;
                    }
                }
            }
            (Ok(_), Ok(_)) => {
                tracing::warn!(job = %id, "job records expired; dropped");
                return true;
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(job = %id, error = %e, "job store unreachable");
                return false;
            }
        };
        if terminal(job.state) {
            return true;
        }
        // While the job waits for a decoder slot it stays queued in its
        // status; it shows as running once an attempt is admitted.
        let mut waiting = false;
        loop {
            if self.cancelled(id).await {
                return self
                    .finish(&mut job, JobState::Cancelled, "cancelled by request")
                    .await;
            }
            if spec.deadline_unix_ms != 0 && now_unix_ms() > spec.deadline_unix_ms {
                return self
                    .finish(
                        &mut job,
                        JobState::Failed,
                        "the deadline passed before the job finished",
                    )
                    .await;
            }
            if job.attempts >= inner.jobs.job_attempts {
                let why = format!("failed {} times; last error: {}", job.attempts, job.error);
                return self.finish(&mut job, JobState::Failed, &why).await;
            }
            job.attempts += 1;
            job.state = JobState::Running as i32;
            job.processed_ms = 0;
            job.progress = 0.0;
            job.updated_unix_ms = now_unix_ms();
            if waiting {
                job.error.clear();
            } else if self.put_job(&job).await.is_err() {
                return false;
            }
            tracing::info!(job = %id, attempt = job.attempts, "job started");
            match self.attempt(id, &spec, &mut job).await {
                Outcome::Done => return true,
                Outcome::Cancelled => {
                    return self
                        .finish(&mut job, JobState::Cancelled, "cancelled by request")
                        .await;
                }
                Outcome::Fail(why) => return self.finish(&mut job, JobState::Failed, &why).await,
                Outcome::Busy(why) => {
                    // Live sessions come first; a batch job waits for a slot.
                    if !waiting {
                        tracing::info!(job = %id, reason = %why, "no decoder capacity; the job waits");
                    }
                    waiting = true;
                    job.attempts -= 1;
                    job.error = format!("waiting for decoder capacity: {why}");
                    job.state = JobState::Queued as i32;
                    job.updated_unix_ms = now_unix_ms();
                    let _ = self.put_job(&job).await;
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Outcome::Retry(why) => {
                    waiting = false;
                    tracing::warn!(job = %id, error = %why, "job attempt failed; retrying");
                    job.error = why;
                    job.state = JobState::Queued as i32;
                    job.updated_unix_ms = now_unix_ms();
                    let _ = self.put_job(&job).await;
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    }

    async fn cancelled(&self, id: &SessionId) -> bool {
        matches!(self.job_store().cancel_requested(id).await, Ok(true))
    }

    async fn finish(&self, job: &mut Job, state: JobState, error: &str) -> bool {
        job.state = state as i32;
        job.error = error.to_owned();
        job.updated_unix_ms = now_unix_ms();
        tracing::info!(job = %job.job_id, state = state.as_str_name(), error, "job ended");
        let ok = self.put_job(job).await.is_ok();
        if let Ok(id) = SessionId::parse(&job.job_id) {
            let _ = self.inner.bus.delete(&self.key(&id, "audio")).await;
        }
        ok
    }

    async fn attempt(&self, id: &SessionId, spec: &JobSpec, job: &mut Job) -> Outcome {
        let inner = &self.inner;
        let bytes = if spec.uri.is_empty() {
            match inner.bus.get(&self.key(id, "audio")).await {
                Ok(Some(b)) => b,
                Ok(None) => return Outcome::Fail("the uploaded audio has expired".into()),
                Err(e) => return Outcome::Retry(format!("reading the audio: {e}")),
            }
        } else {
            match self.read_uri(&spec.uri).await {
                Ok(b) => b,
                Err(s) => return Outcome::Fail(s.message().to_owned()),
            }
        };
        // Jobs may come from elsewhere than this API (the Kubernetes
        // operator writes them to the bus directly): check them here too.
        let mut rc = spec.config.clone().unwrap_or_default();
        if let Err(s) = self.check_config(&mut rc).await {
            return Outcome::Fail(s.message().to_owned());
        }
        let prepared = match self.prepare_bytes(rc.clone(), bytes).await {
            Ok(p) => p,
            Err(s) => return Outcome::Fail(s.message().to_owned()),
        };
        job.audio_duration_ms = prepared.duration_ms;
        let (tx, mut rx) = mpsc::unbounded_channel::<Progress>();
        let run = self.recognize_prepared(prepared, &spec.tenant, Some(tx));
        tokio::pin!(run);
        let mut check = tokio::time::interval(Duration::from_secs(1));
        let resp = loop {
            tokio::select! {
                r = &mut run => break r,
                Some(p) = rx.recv() => {
                    job.processed_ms = p.processed_ms;
                    job.progress = if p.duration_ms == 0 { 1.0 } else { p.processed_ms as f32 / p.duration_ms as f32 };
                    job.updated_unix_ms = now_unix_ms();
                    let _ = self.put_job(job).await;
                }
                _ = check.tick() => {
                    if self.cancelled(id).await {
                        return Outcome::Cancelled;
                    }
                    if spec.deadline_unix_ms != 0 && now_unix_ms() > spec.deadline_unix_ms {
                        return Outcome::Fail("the deadline passed before the job finished".into());
                    }
                }
            }
        };
        let resp = match resp {
            Ok(r) => r,
            Err(s) => {
                return match s.code() {
                    tonic::Code::InvalidArgument => Outcome::Fail(s.message().to_owned()),
                    tonic::Code::ResourceExhausted | tonic::Code::Unavailable
                        if job.processed_ms == 0 =>
                    {
                        Outcome::Busy(s.message().to_owned())
                    }
                    _ => Outcome::Retry(s.message().to_owned()),
                };
            }
        };
        if self.cancelled(id).await {
            return Outcome::Cancelled;
        }
        let task = Task::try_from(rc.task).unwrap_or(Task::Transcribe);
        let target = rc.translation.as_ref().map(|t| t.target_language.as_str());
        let t = crate::transcript::transcript(&resp, task, target);
        let stored = match serde_json::to_vec(&t) {
            Ok(v) => v,
            Err(e) => return Outcome::Fail(format!("the transcript could not be stored: {e}")),
        };
        if let Err(e) = self.job_store().put_result(id, stored).await {
            return Outcome::Retry(format!("storing the transcript: {e}"));
        }
        job.outputs = spec
            .output_formats
            .iter()
            .filter_map(|f| {
                let of = OutputFormat::try_from(*f).ok()?;
                Some(JobOutput {
                    format: *f,
                    uri: String::new(),
                    size_bytes: t.render(of.into()).len() as u64,
                })
            })
            .collect();
        job.processed_ms = resp.audio_duration_ms;
        job.progress = 1.0;
        if self.finish(job, JobState::Succeeded, "").await {
            Outcome::Done
        } else {
            Outcome::Retry("the job's final state could not be stored".into())
        }
    }
}
