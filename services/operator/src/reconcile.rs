//! The controller's reconcile step: from a `TranscriptionJob` and the fleet's
//! job records to the next action, mirroring the run's state into `.status`.
//!
//! The fleet's job id of run `n` of a resource is `{uid}-{n}`, so submitting
//! is idempotent: a reconcile that submitted and then failed to write the
//! status submits the same id again, which the job store takes as done.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event, finalizer};
use kube::{Api, Resource, ResourceExt};
use nexus_bus::jobs::Submitted;
use nexus_bus::{Bus, BusError, SessionId};
use nexus_proto::speech::{Job, JobState};
use serde_json::json;

use crate::crd::{Phase, TranscriptionJob, TranscriptionJobStatus};
use crate::{Context, Error, Result};

/// Finalizer that lets a deleted job cancel its run first.
pub const FINALIZER: &str = "speech.nexus-fleet.dev/cancel-run";
/// Field manager of the operator's writes.
pub const MANAGER: &str = "nexus-operator";
/// ConfigMap data larger than this is not written (the API limit is 1 MiB).
pub const CONFIGMAP_LIMIT: usize = 900_000;

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Reconciles one job: adds the finalizer, then drives the job (or cancels
/// its run when the resource is being deleted).
pub async fn reconcile<B: Bus>(job: Arc<TranscriptionJob>, ctx: Arc<Context<B>>) -> Result<Action> {
    let started = std::time::Instant::now();
    let ns = job
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<TranscriptionJob> = Api::namespaced(ctx.client.clone(), &ns);
    let out = finalizer(&api, FINALIZER, job, |event| async {
        match event {
            Event::Apply(job) => apply(&job, &ctx).await,
            Event::Cleanup(job) => cleanup(&job, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .reconciled(if out.is_ok() { "ok" } else { "error" }, started.elapsed());
    out
}

/// What the controller does after a failed reconcile: try again soon.
pub fn error_policy<B: Bus>(
    job: Arc<TranscriptionJob>,
    error: &Error,
    _ctx: Arc<Context<B>>,
) -> Action {
    tracing::warn!(job = %job.name_any(), %error, "reconcile failed; retrying in 5 s");
    Action::requeue(Duration::from_secs(5))
}

fn tenant(job: &TranscriptionJob) -> String {
    format!("k8s:{}", job.namespace().unwrap_or_default())
}

fn run_id(job: &TranscriptionJob, attempt: u32) -> Result<SessionId> {
    let uid = job.uid().ok_or(Error::MissingField("metadata.uid"))?;
    Ok(SessionId::parse(&format!("{uid}-{attempt}"))?)
}

async fn apply<B: Bus>(job: &TranscriptionJob, ctx: &Context<B>) -> Result<Action> {
    let old = job.status.clone().unwrap_or_default();
    if old.phase.is_final() {
        return Ok(Action::await_change());
    }
    let mut st = old.clone();
    st.observed_generation = job.metadata.generation;
    if let Err(why) = job.spec.validate(now_ms()) {
        st.phase = Phase::Failed;
        set_reason(&mut st, "InvalidSpec", &why);
        condition(&mut st, "Failed", true, "InvalidSpec", &why);
        condition(&mut st, "Accepted", false, "InvalidSpec", &why);
        ctx.metrics.finished(Phase::Failed);
        write_status(job, ctx, &old, &st).await?;
        return Ok(Action::await_change());
    }
    let Some(id) = old.job_id.clone() else {
        submit(job, ctx, &mut st, 1).await?;
        condition(
            &mut st,
            "Accepted",
            true,
            "Submitted",
            "queued on the fleet's job stream",
        );
        write_status(job, ctx, &old, &st).await?;
        return Ok(Action::requeue(ctx.poll));
    };
    let id = SessionId::parse(&id)?;
    let Some(run) = ctx.jobs.status(&id).await? else {
        // The records expired or the store lost them (a Redis without
        // persistence restarted): the run cannot be followed, so it starts over.
        let attempt = st.attempt.max(1);
        submit(job, ctx, &mut st, attempt).await?;
        set_reason(
            &mut st,
            "Resubmitted",
            &format!("the fleet had no record of run {id}; submitted it again"),
        );
        write_status(job, ctx, &old, &st).await?;
        return Ok(Action::requeue(ctx.poll));
    };
    follow(job, ctx, &mut st, &id, &run).await?;
    write_status(job, ctx, &old, &st).await?;
    Ok(if st.phase.is_final() {
        Action::await_change()
    } else {
        Action::requeue(ctx.poll)
    })
}

/// Mirrors the fleet's record of the current run into `st`, and acts on its end.
async fn follow<B: Bus>(
    job: &TranscriptionJob,
    ctx: &Context<B>,
    st: &mut TranscriptionJobStatus,
    id: &SessionId,
    run: &Job,
) -> Result<()> {
    st.percent = (f64::from(run.progress) * 100.0).clamp(0.0, 100.0).round();
    if run.audio_duration_ms > 0 {
        st.audio_seconds = Some(run.audio_duration_ms as f64 / 1000.0);
    }
    match JobState::try_from(run.state).unwrap_or(JobState::Unspecified) {
        JobState::Queued | JobState::Unspecified => {
            st.phase = Phase::Queued;
            if !run.error.is_empty() {
                set_reason(st, "Waiting", &run.error);
            }
        }
        JobState::Running => {
            if st.phase != Phase::Running {
                set_reason(st, "Running", "a job runner is transcribing it");
            }
            st.phase = Phase::Running;
            condition(
                st,
                "Running",
                true,
                "Running",
                "a job runner is transcribing it",
            );
        }
        JobState::Succeeded => {
            st.percent = 100.0;
            st.phase = Phase::Succeeded;
            condition(st, "Running", false, "Finished", "the run ended");
            match write_outputs(job, ctx, id).await? {
                Output::Written(at) => {
                    st.result = Some(at);
                    set_reason(st, "Succeeded", "the transcript is ready");
                    condition(st, "Complete", true, "Succeeded", "the transcript is ready");
                }
                Output::NotOwned { name, stored } => {
                    let why = format!(
                        "ConfigMap {name} exists and was not made by this job, so it is left as it is; the transcript is in the job store ({stored})"
                    );
                    st.result = Some(stored);
                    set_reason(st, "OutputConfigMapNotOwned", &why);
                    condition(st, "Complete", true, "OutputConfigMapNotOwned", &why);
                }
            }
            ctx.metrics.finished(Phase::Succeeded);
        }
        JobState::Cancelled => {
            st.phase = Phase::Cancelled;
            let why = if run.error.is_empty() {
                "cancelled"
            } else {
                &run.error
            };
            set_reason(st, "Cancelled", why);
            condition(st, "Running", false, "Cancelled", why);
            condition(st, "Failed", true, "Cancelled", why);
            ctx.metrics.finished(Phase::Cancelled);
        }
        JobState::Failed => {
            let why = format!("run {} failed: {}", st.attempt, run.error);
            if st.attempt <= job.spec.retries {
                let next = st.attempt + 1;
                submit(job, ctx, st, next).await?;
                set_reason(st, "Retrying", &why);
                condition(st, "Running", false, "Retrying", &why);
                ctx.metrics.retried();
            } else {
                st.phase = Phase::Failed;
                set_reason(st, "RunFailed", &why);
                condition(st, "Running", false, "RunFailed", &why);
                condition(st, "Failed", true, "RunFailed", &why);
                ctx.metrics.finished(Phase::Failed);
            }
        }
    }
    Ok(())
}

/// Submits run `attempt` and records it in `st`.
async fn submit<B: Bus>(
    job: &TranscriptionJob,
    ctx: &Context<B>,
    st: &mut TranscriptionJobStatus,
    attempt: u32,
) -> Result<()> {
    let id = run_id(job, attempt)?;
    let spec = job.spec.job_spec(id.as_str(), &tenant(job));
    let now = now_ms();
    let record = Job {
        job_id: id.to_string(),
        state: JobState::Queued as i32,
        created_unix_ms: now,
        updated_unix_ms: now,
        labels: job
            .spec
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .chain([
                (
                    "k8s.namespace".to_owned(),
                    job.namespace().unwrap_or_default(),
                ),
                ("k8s.name".to_owned(), job.name_any()),
            ])
            .collect(),
        ..Default::default()
    };
    match ctx
        .jobs
        .submit(&spec, &record, None, job.spec.priority > 0)
        .await
    {
        Ok(Submitted::Queued) => {
            ctx.metrics.submitted();
            tracing::info!(job = %job.name_any(), run = %id, attempt, "run submitted");
        }
        Ok(Submitted::Exists) => {}
        // A full queue is back-pressure, not a failure of the job: wait.
        Err(BusError::Full { backlog, .. }) => return Err(Error::QueueFull(backlog)),
        Err(e) => return Err(e.into()),
    }
    st.job_id = Some(id.to_string());
    st.attempt = attempt;
    st.phase = Phase::Queued;
    st.percent = 0.0;
    st.result = None;
    Ok(())
}

/// Where a finished job's transcript went.
enum Output {
    /// `configmap/NAME`, or `job/ID` in the job store.
    Written(String),
    /// The named ConfigMap belongs to someone else; the transcript stays in the store.
    NotOwned { name: String, stored: String },
}

/// Renders the transcript into the job's output ConfigMap, and says where it
/// is. Only a ConfigMap this job created (and controls) is written: one that
/// exists without that owner is left untouched, so deleting a job never
/// deletes a ConfigMap it did not make.
async fn write_outputs<B: Bus>(
    job: &TranscriptionJob,
    ctx: &Context<B>,
    id: &SessionId,
) -> Result<Output> {
    let in_store = format!("job/{id}");
    let Some(name) = job.spec.output.as_ref().and_then(|o| o.config_map.clone()) else {
        return Ok(Output::Written(in_store));
    };
    let api: Api<ConfigMap> =
        Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    let uid = job.uid().ok_or(Error::MissingField("metadata.uid"))?;
    if let Some(existing) = api.get_opt(&name).await? {
        let ours = existing
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == uid && o.controller == Some(true));
        if !ours {
            tracing::warn!(job = %job.name_any(), configmap = %name, "output ConfigMap exists and is not this job's; left as it is");
            return Ok(Output::NotOwned {
                name,
                stored: in_store,
            });
        }
    }
    let stored = ctx
        .jobs
        .result(id)
        .await?
        .ok_or_else(|| Error::Result(format!("the transcript of run {id} has expired")))?;
    let t: nexus_transcript::Transcript =
        serde_json::from_slice(&stored).map_err(|e| Error::Result(e.to_string()))?;
    let data: std::collections::BTreeMap<String, String> = job
        .spec
        .formats()
        .into_iter()
        .map(|f| (f.file_name().to_owned(), t.render(f)))
        .collect();
    let size: usize = data.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > CONFIGMAP_LIMIT {
        tracing::warn!(job = %job.name_any(), size, "transcript too large for a ConfigMap; left in the job store");
        return Ok(Output::Written(in_store));
    }
    let owner = job
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))?;
    let cm = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            namespace: job.namespace(),
            owner_references: Some(vec![owner]),
            labels: Some(
                [
                    (
                        "app.kubernetes.io/managed-by".to_owned(),
                        MANAGER.to_owned(),
                    ),
                    (format!("{}/job", crate::crd::GROUP), job.name_any()),
                ]
                .into(),
            ),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    };
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&cm),
    )
    .await?;
    Ok(Output::Written(format!("configmap/{name}")))
}

/// The resource is being deleted: cancel its run if it is still going.
async fn cleanup<B: Bus>(job: &TranscriptionJob, ctx: &Context<B>) -> Result<Action> {
    let st = job.status.clone().unwrap_or_default();
    if let (Some(id), false) = (st.job_id.as_deref(), st.phase.is_final()) {
        let id = SessionId::parse(id)?;
        ctx.jobs.cancel(&id).await?;
        ctx.metrics.cancelled();
        tracing::info!(job = %job.name_any(), run = %id, "job deleted; its run was cancelled");
    }
    Ok(Action::await_change())
}

fn set_reason(st: &mut TranscriptionJobStatus, reason: &str, message: &str) {
    st.reason = Some(reason.to_owned());
    st.message = Some(message.to_owned());
}

/// Sets a condition; its transition time moves only when its status does.
fn condition(st: &mut TranscriptionJobStatus, kind: &str, on: bool, reason: &str, message: &str) {
    let status = if on { "True" } else { "False" }.to_owned();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    match st.conditions.iter_mut().find(|c| c.type_ == kind) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now;
            }
            c.status = status;
            c.reason = reason.to_owned();
            c.message = message.to_owned();
            c.observed_generation = st.observed_generation;
        }
        None => st.conditions.push(Condition {
            type_: kind.to_owned(),
            status,
            reason: reason.to_owned(),
            message: message.to_owned(),
            last_transition_time: now,
            observed_generation: st.observed_generation,
        }),
    }
}

async fn write_status<B: Bus>(
    job: &TranscriptionJob,
    ctx: &Context<B>,
    old: &TranscriptionJobStatus,
    new: &TranscriptionJobStatus,
) -> Result<()> {
    if old == new && job.status.is_some() {
        return Ok(());
    }
    let api: Api<TranscriptionJob> =
        Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": TranscriptionJob::api_version(&()),
        "kind": TranscriptionJob::kind(&()),
        "status": new,
    });
    api.patch_status(
        &job.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}
