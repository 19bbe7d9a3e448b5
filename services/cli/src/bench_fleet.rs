//! `nexus bench fleet`: how many live sessions one machine carries. For each
//! model and bus it starts `nexus serve` (every stage in one process, on the
//! in-memory bus or on Redis), then opens N concurrent StreamingRecognize
//! sessions that send real speech at real-time pace, and measures when each
//! final caption arrives:
//!
//! - after the endpoint: from the END_OF_UTTERANCE event (the moment the server
//!   decided the utterance is over) to the final result; this is the fleet's
//!   own work (encode, decode, deliver);
//! - after the end of speech: from the moment the last voiced sample of the
//!   utterance was captured (the client sends audio as if from a microphone) to
//!   the final result; this adds the endpointer's trailing-silence wait.
//!
//! N grows until p95 after the endpoint passes the target; the largest N that
//! kept it is the capacity.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use nexus_proto::speech::speech_recognition_client::SpeechRecognitionClient;
use nexus_proto::speech::streaming_recognize_request::StreamingRequest;
use nexus_proto::speech::{
    AudioEncoding, AudioFormat, EndpointingConfig, RecognitionConfig, SpeechEvent,
    StreamingRecognitionConfig, StreamingRecognizeRequest,
};
use tokio::time::Instant;

use crate::transcribe::load_audio;

/// Fleet capacity benchmark settings.
#[derive(Debug, Args)]
pub struct FleetArgs {
    /// Models to measure.
    #[arg(long = "model", value_delimiter = ',', default_value = "tiny.en,base")]
    models: Vec<String>,
    /// Buses to measure: `memory` (embedded) and/or `redis`.
    #[arg(long = "bus", value_delimiter = ',', default_value = "memory,redis")]
    buses: Vec<String>,
    /// Redis for the `redis` bus.
    #[arg(long, env = "NEXUS_REDIS", default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Concurrent session counts to try, in order; stops after the first that
    /// misses the target.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,6,8,12,16")]
    streams: Vec<usize>,
    /// Seconds of audio each session sends.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Final-caption p95 after the endpoint that a level must keep, in ms.
    #[arg(long, default_value_t = 1500.0)]
    target_ms: f64,
    /// Interim-result intervals to measure, in ms; 0 measures sessions that
    /// ask for final results only.
    #[arg(long = "interim-ms", value_delimiter = ',', default_value = "1000,0")]
    interim_ms: Vec<u32>,
    /// Folder of 16 kHz speech WAVs; sessions play them in rotated orders
    /// with pauses between (default: LibriVox clips from `scripts/fetch-testdata.sh`).
    #[arg(long, default_value = ".cache/testdata/librivox")]
    speech: PathBuf,
    /// Extra arguments for `nexus serve`, e.g. `--frame-budget=3000`.
    #[arg(long = "serve-arg", allow_hyphen_values = true)]
    serve_args: Vec<String>,
    /// Where weights are kept.
    #[arg(long, env = "NEXUS_HOME")]
    home: Option<PathBuf>,
}

/// Timings of one level.
#[derive(Debug, Default)]
struct Level {
    after_endpoint_ms: Vec<f64>,
    after_speech_ms: Vec<f64>,
    utterances: usize,
    failed: Vec<String>,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// A `nexus serve` child, stopped on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(args: &FleetArgs, model: &str, bus: &str) -> anyhow::Result<Server> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args([
        "serve",
        "--listen",
        &addr.to_string(),
        "--http-listen",
        "none",
        "--model",
        model,
    ])
    // Admission must not be what limits a level: the benchmark finds the
    // number to configure.
    .args(["--decoder-sessions", "256", "--drain-grace-s", "5"])
    .args(&args.serve_args)
    .env(
        "NEXUS_LOG",
        std::env::var("NEXUS_LOG").unwrap_or_else(|_| "warn".into()),
    )
    .stdout(Stdio::null())
    .stderr(Stdio::inherit());
    if let Some(home) = &args.home {
        cmd.arg("--home").arg(home);
    }
    match bus {
        "memory" => {}
        "redis" => {
            cmd.args([
                "--redis",
                &args.redis,
                "--key-prefix",
                &format!("bench-fleet-{}-{port}", std::process::id()),
            ]);
        }
        other => bail!("unknown bus {other:?}; use memory or redis"),
    }
    let child = cmd.spawn().context("starting nexus serve")?;
    Ok(Server { child, addr })
}

/// The speech a session plays: every clip, starting at clip `rotate`, with
/// `gap_s` of silence after each.
fn program(clips: &[Vec<f32>], rotate: usize, seconds: f64, gap_s: f64) -> Vec<f32> {
    let total = (seconds * 16_000.0) as usize;
    let gap = vec![0.0f32; (gap_s * 16_000.0) as usize];
    let mut out = Vec::with_capacity(total);
    let mut i = rotate;
    while out.len() < total {
        out.extend_from_slice(&clips[i % clips.len()]);
        out.extend_from_slice(&gap);
        i += 1;
    }
    out.truncate(total);
    out
}

struct SessionTimings {
    after_endpoint_ms: Vec<f64>,
    after_speech_ms: Vec<f64>,
    utterances: usize,
}

async fn session(
    addr: SocketAddr,
    model: String,
    interim: Option<u32>,
    samples: Vec<f32>,
    lead: Duration,
) -> Result<SessionTimings, tonic::Status> {
    tokio::time::sleep(lead).await;
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .map_err(|e| tonic::Status::internal(e.to_string()))?
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = SpeechRecognitionClient::new(ch);
    let cfg = StreamingRecognitionConfig {
        config: Some(RecognitionConfig {
            model,
            language: "en".into(),
            audio_format: Some(AudioFormat {
                encoding: AudioEncoding::LinearPcmS16le as i32,
                sample_rate_hz: 16_000,
                channels: 1,
            }),
            ..Default::default()
        }),
        interim_results: interim.is_some(),
        endpointing: Some(EndpointingConfig {
            interim_interval_ms: interim.unwrap_or(0),
            ..Default::default()
        }),
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tx.send(StreamingRecognizeRequest {
        streaming_request: Some(StreamingRequest::StreamingConfig(cfg)),
    })
    .await
    .map_err(|_| tonic::Status::internal("request channel closed"))?;
    let mut inbound = client
        .streaming_recognize(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    // Audio is sent as a microphone would deliver it: each 100 ms chunk once
    // its last sample has been captured.
    let chunk = 1600;
    let start = Instant::now();
    let sender = async move {
        for (i, c) in samples.chunks(chunk).enumerate() {
            tokio::time::sleep_until(start + Duration::from_millis(100 * (i as u64 + 1))).await;
            let bytes: Vec<u8> = c
                .iter()
                .flat_map(|s| ((s.clamp(-1.0, 1.0) * 32767.0) as i16).to_le_bytes())
                .collect();
            let msg = StreamingRecognizeRequest {
                streaming_request: Some(StreamingRequest::AudioContent(bytes.into())),
            };
            if tx.send(msg).await.is_err() {
                break;
            }
        }
    };
    let receiver = async move {
        // Utterance k ends with the k-th END_OF_UTTERANCE; its final carries segment_id k.
        let mut endpoints: Vec<(Instant, u64)> = Vec::new();
        let mut finals: HashMap<u64, Instant> = HashMap::new();
        while let Some(r) = inbound.message().await? {
            let now = Instant::now();
            if r.speech_event == SpeechEvent::EndOfUtterance as i32 {
                endpoints.push((now, r.speech_event_ms));
            }
            for res in r.results.iter().filter(|r| r.is_final) {
                finals.entry(res.segment_id).or_insert(now);
            }
        }
        let mut t = SessionTimings {
            after_endpoint_ms: Vec::new(),
            after_speech_ms: Vec::new(),
            utterances: endpoints.len(),
        };
        // An utterance without a final is one the decoder found no words in.
        for (k, (at, speech_end_ms)) in endpoints.into_iter().enumerate() {
            if let Some(f) = finals.get(&(k as u64)) {
                t.after_endpoint_ms
                    .push(f.saturating_duration_since(at).as_secs_f64() * 1e3);
                let spoken = start + Duration::from_millis(speech_end_ms);
                t.after_speech_ms
                    .push(f.saturating_duration_since(spoken).as_secs_f64() * 1e3);
            }
        }
        Ok::<_, tonic::Status>(t)
    };
    let ((), t) = tokio::join!(sender, receiver);
    t
}

async fn level(
    addr: SocketAddr,
    model: &str,
    args: &FleetArgs,
    clips: &[Vec<f32>],
    n: usize,
    interim_ms: u32,
) -> Level {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let samples = program(clips, i, args.seconds, 1.0);
        // Staggered starts, so endpoints of different sessions do not coincide.
        let lead = Duration::from_millis((i as u64 * 1000 / n as u64) + 37 * i as u64 % 400);
        tasks.spawn(session(
            addr,
            model.to_owned(),
            (interim_ms > 0).then_some(interim_ms),
            samples,
            lead,
        ));
    }
    let mut out = Level::default();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(t)) => {
                out.after_endpoint_ms.extend(t.after_endpoint_ms);
                out.after_speech_ms.extend(t.after_speech_ms);
                out.utterances += t.utterances;
            }
            Ok(Err(s)) => out.failed.push(format!("{:?}: {}", s.code(), s.message())),
            Err(e) => out.failed.push(e.to_string()),
        }
    }
    out
}

/// Waits until the server admits and transcribes a short session.
async fn warm_up(addr: SocketAddr, model: &str, clip: &[f32]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut audio = clip[..clip.len().min(5 * 16_000)].to_vec();
    audio.extend(std::iter::repeat_n(0.0, 16_000));
    loop {
        match session(addr, model.to_owned(), None, audio.clone(), Duration::ZERO).await {
            Ok(t) if !t.after_endpoint_ms.is_empty() => return Ok(()),
            Ok(_) => {}
            Err(s) if Instant::now() > deadline => {
                bail!("the fleet did not come up: {:?} {}", s.code(), s.message())
            }
            Err(_) => {}
        }
        if Instant::now() > deadline {
            bail!("the fleet came up but produced no final caption");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs the benchmark and prints a table.
pub fn run(args: FleetArgs) -> anyhow::Result<()> {
    let mut clips = Vec::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&args.speech)
        .with_context(|| {
            format!(
                "reading {} (run scripts/fetch-testdata.sh)",
                args.speech.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "wav"))
        .collect();
    paths.sort();
    for p in &paths {
        clips.push(load_audio(p, None)?);
    }
    anyhow::ensure!(
        !clips.is_empty(),
        "no .wav files in {}",
        args.speech.display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "live sessions of {:.0} s real speech each at real-time pace; final-caption latency in ms; \
         capacity = most sessions with p95 after endpoint < {:.0} ms",
        args.seconds, args.target_ms
    );
    println!(
        "| model | bus | interims | sessions | finals | after endpoint p50 | p95 | after speech end p50 | p95 | failed |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut capacity = Vec::new();
    for model in &args.models {
        for bus in &args.buses {
            let server = start_server(&args, model, bus)?;
            rt.block_on(warm_up(server.addr, model, &clips[0]))?;
            for &interim in &args.interim_ms {
                let mode = if interim > 0 {
                    format!("every {interim} ms")
                } else {
                    "off".into()
                };
                let mut best = 0;
                for &n in &args.streams {
                    let mut l = rt.block_on(level(server.addr, model, &args, &clips, n, interim));
                    let finals = l.after_endpoint_ms.len();
                    let (e50, e95) = (
                        percentile(&mut l.after_endpoint_ms, 0.5),
                        percentile(&mut l.after_endpoint_ms, 0.95),
                    );
                    let (s50, s95) = (
                        percentile(&mut l.after_speech_ms, 0.5),
                        percentile(&mut l.after_speech_ms, 0.95),
                    );
                    println!(
                        "| {model} | {bus} | {mode} | {n} | {finals}/{} | {e50:.0} | {e95:.0} | {s50:.0} | {s95:.0} | {} |",
                        l.utterances,
                        if l.failed.is_empty() {
                            "0".to_string()
                        } else {
                            format!("{}: {}", l.failed.len(), l.failed[0])
                        }
                    );
                    let kept = l.failed.is_empty() && finals > 0 && e95 < args.target_ms;
                    if !kept {
                        break;
                    }
                    best = n;
                }
                capacity.push(format!("{model} on {bus}, interims {mode}: {best}"));
            }
            drop(server);
        }
    }
    println!(
        "capacity (sessions at p95 < {:.0} ms after endpoint): {}",
        args.target_ms,
        capacity.join(", ")
    );
    Ok(())
}
