//! Reconcile scenarios against a scripted Kubernetes API server (kube's
//! tower-test pattern: no API server can run here) and the fleet's job
//! store: in memory, and on the real Redis for the enqueueing itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::client::Body;
use kube::{Client, Resource};
use nexus_bus::jobs::{JOB_GROUP, JOBS};
use nexus_bus::{Bus, JobStore, Keys, MemoryBus, RedisBus, SessionId, StreamLimits};
use nexus_proto::speech::{Job, JobState, OutputFormat, Task};
use serde_json::{Value, json};
use tower_test::mock::{Handle, SendResponse};

use crate::crd::{Format, JobOutputTarget, TranscriptionJob, TranscriptionJobSpec};
use crate::reconcile::{FINALIZER, reconcile};
use crate::{Context, Metrics};

const NS: &str = "team";
const UID: &str = "6f1c2a9e-0b7d-4c55-9a57-1d1e0f3b2c11";
const JOBS_PATH: &str = "/apis/speech.nexus-fleet.dev/v1alpha1/namespaces/team/transcriptionjobs";

/// The scripted API server: each call names the request it expects next.
struct ApiServer(Handle<Request<Body>, Response<Body>>);

impl ApiServer {
    /// The next request, which must be `method` on `path`; its JSON body.
    async fn expect(
        &mut self,
        method: Method,
        path: &str,
    ) -> (Value, String, SendResponse<Response<Body>>) {
        let (req, send) = tokio::time::timeout(Duration::from_secs(5), self.0.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request came; expected {method} {path}"))
            .expect("the client is gone");
        assert_eq!(req.method(), method, "{}", req.uri());
        assert_eq!(req.uri().path(), path, "{}", req.uri());
        let query = req.uri().query().unwrap_or_default().to_owned();
        let body = req.into_body().collect_bytes().await.unwrap();
        let body = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).unwrap()
        };
        (body, query, send)
    }

    /// Asserts that the reconcile made no further request.
    fn no_more(&mut self) {
        assert!(
            self.0.poll_request().is_pending(),
            "an unexpected request was made"
        );
    }
}

fn reply(send: SendResponse<Response<Body>>, value: &impl serde::Serialize) {
    send.send_response(
        Response::builder()
            .body(Body::from(serde_json::to_vec(value).unwrap()))
            .unwrap(),
    );
}

fn not_found(send: SendResponse<Response<Body>>, what: &str) {
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{what} not found"), "reason": "NotFound", "code": 404
    });
    send.send_response(
        Response::builder()
            .status(404)
            .body(Body::from(serde_json::to_vec(&status).unwrap()))
            .unwrap(),
    );
}

const CM_PATH: &str = "/api/v1/namespaces/team/configmaps/standup-transcript";

fn context<B: Bus>(bus: B, keys: Keys) -> (Arc<Context<B>>, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = Context {
        client: Client::new(service, "default"),
        jobs: JobStore::new(
            bus,
            keys,
            Duration::from_secs(600),
            StreamLimits {
                max_backlog: 100,
                max_deliveries: u32::MAX,
            },
        ),
        metrics: Arc::new(Metrics::default()),
        poll: Duration::from_millis(500),
    };
    (Arc::new(ctx), ApiServer(handle))
}

fn job(spec: TranscriptionJobSpec) -> TranscriptionJob {
    let mut j = TranscriptionJob::new("meeting", spec);
    let m = j.meta_mut();
    m.namespace = Some(NS.into());
    m.uid = Some(UID.into());
    m.generation = Some(1);
    m.resource_version = Some("1".into());
    j
}

fn with_finalizer(mut j: TranscriptionJob) -> TranscriptionJob {
    j.meta_mut().finalizers = Some(vec![FINALIZER.into()]);
    j
}

fn spec() -> TranscriptionJobSpec {
    TranscriptionJobSpec {
        input: "file:///meetings/standup.wav".into(),
        language: "en".into(),
        formats: vec![Format::Text, Format::Srt],
        output: Some(JobOutputTarget {
            config_map: Some("standup-transcript".into()),
        }),
        retries: 1,
        ..Default::default()
    }
}

/// Runs one reconcile while `script` plays the API server; returns the
/// status the reconcile wrote (the last status patch), if any.
async fn step<B: Bus, F, Fut>(
    ctx: &Arc<Context<B>>,
    server: &mut ApiServer,
    obj: &TranscriptionJob,
    script: F,
) -> TranscriptionJob
where
    F: FnOnce(ApiServer, TranscriptionJob) -> Fut,
    Fut: std::future::Future<Output = (ApiServer, TranscriptionJob)> + Send + 'static,
{
    let handle = std::mem::replace(server, ApiServer(tower_test::mock::pair().1));
    let played = tokio::spawn(script(handle, obj.clone()));
    reconcile(Arc::new(obj.clone()), ctx.clone())
        .await
        .expect("reconcile");
    let (mut handle, next) = tokio::time::timeout(Duration::from_secs(5), played)
        .await
        .expect("the script ended")
        .expect("the script passed");
    handle.no_more();
    *server = handle;
    next
}

/// Expects the status patch; answers it and returns the object with that status.
async fn status_patch(server: &mut ApiServer, obj: &TranscriptionJob) -> (Value, TranscriptionJob) {
    let (body, _, send) = server
        .expect(Method::PATCH, &format!("{JOBS_PATH}/meeting/status"))
        .await;
    let mut next = obj.clone();
    next.status = Some(serde_json::from_value(body["status"].clone()).unwrap());
    reply(send, &next);
    (body["status"].clone(), next)
}

fn condition<'a>(status: &'a Value, kind: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} condition in {status}"))
}

fn run(n: u32) -> SessionId {
    SessionId::parse(&format!("{UID}-{n}")).unwrap()
}

async fn runner_reports(
    ctx: &Context<impl Bus>,
    n: u32,
    state: JobState,
    progress: f32,
    error: &str,
) {
    ctx.jobs
        .put_status(&Job {
            job_id: run(n).to_string(),
            state: state as i32,
            progress,
            audio_duration_ms: 90_000,
            error: error.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn create_enqueue_progress_and_success_with_an_owned_configmap() {
    let (ctx, mut server) = context(MemoryBus::default(), Keys::default());
    // Created: the finalizer goes on first.
    let created = job(spec());
    let obj = step(&ctx, &mut server, &created, |mut s, obj| async move {
        let (body, _, send) = s
            .expect(Method::PATCH, &format!("{JOBS_PATH}/meeting"))
            .await;
        assert!(body.to_string().contains(FINALIZER), "{body}");
        let next = with_finalizer(obj);
        reply(send, &next);
        (s, next)
    })
    .await;

    // Enqueued: run 1 is on the job stream, the status says so.
    let obj = step(&ctx, &mut server, &obj, |mut s, obj| async move {
        let (status, next) = status_patch(&mut s, &obj).await;
        assert_eq!(status["phase"], "Queued");
        assert_eq!(status["jobId"], format!("{UID}-1"));
        assert_eq!(status["attempt"], 1);
        assert_eq!(condition(&status, "Accepted")["status"], "True");
        (s, next)
    })
    .await;
    let spec = ctx
        .jobs
        .spec(&run(1))
        .await
        .unwrap()
        .expect("run 1 submitted");
    assert_eq!(spec.uri, "file:///meetings/standup.wav");
    assert_eq!(spec.tenant, "k8s:team");
    let rc = spec.config.unwrap();
    assert_eq!(
        (rc.language.as_str(), rc.task),
        ("en", Task::Transcribe as i32)
    );
    assert_eq!(
        spec.output_formats,
        vec![OutputFormat::Text as i32, OutputFormat::Srt as i32]
    );
    let record = ctx.jobs.status(&run(1)).await.unwrap().unwrap();
    assert_eq!(record.state, JobState::Queued as i32);
    assert_eq!(record.labels["k8s.name"], "meeting");

    // Progress: a runner took it and is 40 % through.
    runner_reports(&ctx, 1, JobState::Running, 0.4, "").await;
    let obj = step(&ctx, &mut server, &obj, |mut s, obj| async move {
        let (status, next) = status_patch(&mut s, &obj).await;
        assert_eq!(status["phase"], "Running");
        assert_eq!(status["percent"], 40.0);
        assert_eq!(status["audioSeconds"], 90.0);
        assert_eq!(condition(&status, "Running")["status"], "True");
        (s, next)
    })
    .await;
    // Nothing changed: no write at all.
    let obj = step(&ctx, &mut server, &obj, |s, obj| async move { (s, obj) }).await;

    // Succeeded: the transcript lands in a ConfigMap the job owns.
    let transcript = json!({
        "task": "transcribe", "language": "en", "duration": 90.0,
        "segments": [
            {"id": 0, "start": 0.0, "end": 2.5, "text": " Good morning everyone."},
            {"id": 1, "start": 3.0, "end": 5.0, "text": " Let's start with the build."}
        ]
    });
    ctx.jobs
        .put_result(&run(1), serde_json::to_vec(&transcript).unwrap())
        .await
        .unwrap();
    runner_reports(&ctx, 1, JobState::Succeeded, 1.0, "").await;
    let obj = step(&ctx, &mut server, &obj, |mut s, obj| async move {
        // It looks first: only a ConfigMap of its own may be written.
        let (_, _, send) = s.expect(Method::GET, CM_PATH).await;
        not_found(send, "configmaps \"standup-transcript\"");
        let (cm, query, send) = s.expect(Method::PATCH, CM_PATH).await;
        assert!(query.contains("fieldManager=nexus-operator"), "{query}");
        let owner = &cm["metadata"]["ownerReferences"][0];
        assert_eq!(owner["uid"], UID);
        assert_eq!(owner["kind"], "TranscriptionJob");
        assert_eq!(owner["controller"], true);
        let text = cm["data"]["transcript.txt"].as_str().unwrap();
        assert!(text.contains("Good morning everyone."), "{text}");
        let srt = cm["data"]["transcript.srt"].as_str().unwrap();
        assert!(srt.contains("00:00:03,000 --> 00:00:05,000"), "{srt}");
        reply(send, &cm);
        let (status, next) = status_patch(&mut s, &obj).await;
        assert_eq!(status["phase"], "Succeeded");
        assert_eq!(status["percent"], 100.0);
        assert_eq!(status["result"], "configmap/standup-transcript");
        assert_eq!(condition(&status, "Complete")["status"], "True");
        assert_eq!(condition(&status, "Running")["status"], "False");
        (s, next)
    })
    .await;
    // Final: nothing more happens.
    step(&ctx, &mut server, &obj, |s, obj| async move { (s, obj) }).await;
    let m = ctx.metrics.render();
    assert!(m.contains("nexus_operator_runs_submitted_total 1"), "{m}");
    assert!(
        m.contains("nexus_operator_jobs_finished_total{phase=\"Succeeded\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn a_configmap_the_job_did_not_make_is_left_alone() {
    let (ctx, mut server) = context(MemoryBus::default(), Keys::default());
    let obj = with_finalizer(job(spec()));
    let obj = step(&ctx, &mut server, &obj, |mut s, obj| async move {
        let (status, next) = status_patch(&mut s, &obj).await;
        assert_eq!(status["phase"], "Queued");
        (s, next)
    })
    .await;
    ctx.jobs
        .put_result(
            &run(1),
            br#"{"task":"transcribe","language":"en","duration":1.0,"segments":[]}"#.to_vec(),
        )
        .await
        .unwrap();
    runner_reports(&ctx, 1, JobState::Succeeded, 1.0, "").await;
    step(&ctx, &mut server, &obj, |mut s, obj| async move {
        // Someone else's ConfigMap of that name (another job's, or a team's settings).
        let (_, _, send) = s.expect(Method::GET, CM_PATH).await;
        reply(
            send,
            &json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {
                    "name": "standup-transcript", "namespace": NS,
                    "ownerReferences": [{
                        "apiVersion": "speech.nexus-fleet.dev/v1alpha1", "kind": "TranscriptionJob",
                        "name": "other", "uid": "00000000-0000-0000-0000-000000000000",
                        "controller": true
                    }]
                },
                "data": {"keep": "me"}
            }),
        );
        // No write to it: the next request is the job's status.
        let (status, next) = status_patch(&mut s, &obj).await;
        assert_eq!(status["phase"], "Succeeded");
        assert_eq!(status["reason"], "OutputConfigMapNotOwned");
        assert_eq!(status["result"], format!("job/{UID}-1"));
        let msg = status["message"].as_str().unwrap();
        assert!(msg.contains("not made by this job"), "{msg}");
        (s, next)
    })
    .await;
}

#[tokio::test]
async fn a_failed_run_is_retried_then_the_job_fails_with_the_reason() {
    let (ctx, mut server) = context(MemoryBus::default(), Keys::default());
    let obj = with_finalizer(job(spec()));
    let obj = step(&ctx, &mut server, &obj, |mut s, obj| async move {
        let (status, next) = status_patch(&mut s, &obj).await;
        assert_eq!(status["attempt"], 1);
        (s, next)
    })
    .await;

    let why = "the audio could not be read: no supported audio track";
    runner_reports(&ctx, 1, JobState::Failed, 0.0, why).await;
    let obj = step(&ctx, &mut server, &obj, |mut s, obj| async move {
        let (status, next) = status_patch(&mut s, &obj).await;
        assert_eq!(status["phase"], "Queued");
        assert_eq!(status["attempt"], 2);
        assert_eq!(status["jobId"], format!("{UID}-2"));
        assert_eq!(status["reason"], "Retrying");
        assert!(
            status["message"].as_str().unwrap().contains(why),
            "{status}"
        );
        (s, next)
    })
    .await;
    assert!(
        ctx.jobs.spec(&run(2)).await.unwrap().is_some(),
        "run 2 submitted"
    );

    runner_reports(&ctx, 2, JobState::Failed, 0.0, why).await;
    let obj = step(&ctx, &mut server, &obj, |mut s, obj| async move {
        let (status, next) = status_patch(&mut s, &obj).await;
        assert_eq!(status["phase"], "Failed");
        assert_eq!(status["reason"], "RunFailed");
        let failed = condition(&status, "Failed");
        assert_eq!(failed["status"], "True");
        assert_eq!(failed["reason"], "RunFailed");
        assert!(
            failed["message"]
                .as_str()
                .unwrap()
                .contains(&format!("run 2 failed: {why}"))
        );
        (s, next)
    })
    .await;
    step(&ctx, &mut server, &obj, |s, obj| async move { (s, obj) }).await;
    assert!(
        ctx.jobs.spec(&run(3)).await.unwrap().is_none(),
        "no third run"
    );
    let m = ctx.metrics.render();
    assert!(m.contains("nexus_operator_runs_retried_total 1"), "{m}");
    assert!(
        m.contains("nexus_operator_jobs_finished_total{phase=\"Failed\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn deleting_a_running_job_cancels_its_run_then_releases_it() {
    let (ctx, mut server) = context(MemoryBus::default(), Keys::default());
    let obj = with_finalizer(job(spec()));
    let mut obj = step(&ctx, &mut server, &obj, |mut s, obj| async move {
        let (_, next) = status_patch(&mut s, &obj).await;
        (s, next)
    })
    .await;
    runner_reports(&ctx, 1, JobState::Running, 0.2, "").await;
    obj.meta_mut().deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    step(&ctx, &mut server, &obj, |mut s, obj| async move {
        let (patch, _, send) = s
            .expect(Method::PATCH, &format!("{JOBS_PATH}/meeting"))
            .await;
        assert!(
            patch.to_string().contains("remove"),
            "finalizer removal: {patch}"
        );
        let mut next = obj.clone();
        next.meta_mut().finalizers = None;
        reply(send, &next);
        (s, next)
    })
    .await;
    assert!(ctx.jobs.cancel_requested(&run(1)).await.unwrap());
    let record = ctx.jobs.status(&run(1)).await.unwrap().unwrap();
    assert_eq!(record.state, JobState::Cancelled as i32);
    assert!(
        ctx.metrics
            .render()
            .contains("nexus_operator_runs_cancelled_total 1")
    );
}

#[tokio::test]
async fn an_invalid_spec_fails_at_once_and_submits_nothing() {
    let (ctx, mut server) = context(MemoryBus::default(), Keys::default());
    let obj = with_finalizer(job(TranscriptionJobSpec {
        input: "https://example.invalid/a.wav".into(),
        ..spec()
    }));
    step(&ctx, &mut server, &obj, |mut s, obj| async move {
        let (status, next) = status_patch(&mut s, &obj).await;
        assert_eq!(status["phase"], "Failed");
        assert_eq!(status["reason"], "InvalidSpec");
        assert!(
            status["message"]
                .as_str()
                .unwrap()
                .contains("not a file:// location")
        );
        assert_eq!(condition(&status, "Accepted")["status"], "False");
        (s, next)
    })
    .await;
    assert!(ctx.jobs.spec(&run(1)).await.unwrap().is_none());
}

#[tokio::test]
#[ignore = "needs Redis on 127.0.0.1:6379 (NEXUS_TEST_REDIS)"]
async fn runs_are_enqueued_on_the_real_redis_job_stream_once() {
    let url = std::env::var("NEXUS_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let bus = RedisBus::connect(&url).await.expect("Redis answers");
    let prefix = format!("op{}", std::process::id());
    let keys = Keys::new(&prefix).unwrap();
    let stream = keys.stage_stream(JOBS, 0);
    bus.ensure_group(&stream, JOB_GROUP).await.unwrap();
    let (ctx, mut server) = context(bus.clone(), keys);
    let obj = with_finalizer(job(spec()));
    // Twice, as after a status write the API server refused: one entry.
    for _ in 0..2 {
        step(&ctx, &mut server, &obj, |mut s, obj| async move {
            let (status, next) = status_patch(&mut s, &obj).await;
            assert_eq!(status["jobId"], format!("{UID}-1"));
            (s, next)
        })
        .await;
    }
    let entries = bus
        .read_group(&stream, JOB_GROUP, "runner", 10, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(entries.len(), 1, "one entry for one run");
    assert_eq!(entries[0].fields["job"], format!("{UID}-1").into_bytes());
    let spec = ctx.jobs.spec(&run(1)).await.unwrap().unwrap();
    assert_eq!(spec.uri, "file:///meetings/standup.wav");
}
