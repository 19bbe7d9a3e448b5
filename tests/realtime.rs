//! Live captions over WebSocket (`/v1/realtime`, the OpenAI Realtime
//! transcription protocol), driven by clients the fleet did not write: the
//! official `openai` Python SDK's realtime client, unchanged, against the
//! gRPC stream's finals for the same audio; and the `websockets` library
//! plus a raw socket for every event type, bad input, keys, resume, the idle
//! timeout and a client that never reads (tests/realtime_client.py).
//!
//! Needs the tiny.en and silero-vad weights, the LibriVox test speech, the
//! Python clients in `.venv` and a Redis on 127.0.0.1; `scripts/test.sh`
//! provides them all.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use nexus_proto::speech::{AudioEncoding, AudioFormat};
use nexus_tests::fleet::{
    MODEL, free_addr, keys_file, pcm16_chunks, pcm16_config, prefix, python, redis_url, speech,
    stage, stream,
};

fn client(args: &[&str]) -> std::process::Output {
    Command::new(python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/realtime_client.py"))
        .args(args)
        .output()
        .expect("the Python client runs")
}

/// Words as compared across APIs: lower case, letters and digits.
fn words(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| {
            w.chars()
                .filter(|c| c.is_alphanumeric())
                .flat_map(char::to_lowercase)
                .collect::<String>()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

/// 16 kHz samples as one 16-bit PCM byte string at `rate`, converted as the
/// gRPC client's chunks are.
fn pcm16_at(samples: &[f32], rate: u32) -> (Vec<f32>, Vec<u8>) {
    let x = if rate == 16_000 {
        samples.to_vec()
    } else {
        nexus_audio::resample(&[samples.to_vec()], 16_000, rate)
            .unwrap()
            .remove(0)
    };
    let bytes = pcm16_chunks(&x, 1_600).concat();
    (x, bytes)
}

#[tokio::test]
#[ignore = "needs tiny.en, silero-vad, LibriVox speech, .venv and Redis; scripts/test.sh"]
async fn openai_sdk_realtime_transcribes_like_the_grpc_stream() {
    let dir = tempfile::tempdir().unwrap();
    // The protocol's own format: 16-bit PCM at 24 kHz, the same bytes on both APIs.
    let (x24, bytes24) = pcm16_at(&speech(), 24_000);
    let path = dir.path().join("speech24k.raw");
    std::fs::write(&path, &bytes24).unwrap();
    let http = free_addr();
    let p = prefix("realtime_sdk");
    let mut fleet = stage(
        "fleet",
        "all",
        &redis_url(),
        &p,
        &["--http-listen", &http.to_string()],
    );
    fleet.wait_serving(Duration::from_secs(180)).await;

    let mut cfg = pcm16_config(MODEL);
    cfg.config.as_mut().unwrap().audio_format = Some(AudioFormat {
        encoding: AudioEncoding::LinearPcmS16le as i32,
        sample_rate_hz: 24_000,
        channels: 1,
    });
    // Chunks of 1600 samples at 24 kHz: 1.5 per 100 ms is real time.
    let grpc = stream(fleet.addr, cfg, &x24, 1.5, |_| {}).await.unwrap();
    nexus_tests::fleet::assert_complete(&grpc);
    let grpc_text = grpc.text();

    let out = client(&["sdk", &http.port().to_string(), path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the SDK client failed:\n{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        fleet.log().join("\n")
    );
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    for k in [
        "transcription_session.created",
        "transcription_session.updated",
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.input_audio_transcription.delta",
        "conversation.item.input_audio_transcription.completed",
    ] {
        assert!(kinds.contains(&k), "no {k} among {kinds:?}");
    }
    assert!(!kinds.contains(&"error"), "{stdout}");
    let completed: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "conversation.item.input_audio_transcription.completed")
        .map(|e| e["transcript"].as_str().unwrap())
        .collect();
    let ws_text = completed.join(" ");
    assert_eq!(
        words(&ws_text),
        words(&grpc_text),
        "the WebSocket's completed transcripts differ from the gRPC stream's finals"
    );
    assert_eq!(
        completed.len(),
        grpc.finals().len(),
        "{completed:?} against {grpc_text:?}"
    );
    // Every delta of an item is a piece of what that item's words grew into.
    for d in events
        .iter()
        .filter(|e| e["type"] == "conversation.item.input_audio_transcription.delta")
    {
        assert!(!d["delta"].as_str().unwrap().is_empty(), "{d}");
    }
    assert!(
        words(&grpc_text).contains(&"dashwood".to_owned()),
        "{grpc_text}"
    );
}

#[tokio::test]
#[ignore = "needs tiny.en, silero-vad, LibriVox speech, .venv and Redis; scripts/test.sh"]
async fn raw_websocket_clients_events_errors_resume_and_stuck_readers() {
    let dir = tempfile::tempdir().unwrap();
    let key = "realtime-key";
    let keys = keys_file(dir.path(), &[("acme", key)]);
    let s = speech();
    let (_, b16) = pcm16_at(&s, 16_000);
    let (_, b24) = pcm16_at(&s, 24_000);
    let p16 = dir.path().join("speech16k.raw");
    let p24 = dir.path().join("speech24k.raw");
    std::fs::write(&p16, b16).unwrap();
    std::fs::write(&p24, b24).unwrap();
    let http = free_addr();
    let p = prefix("realtime_raw");
    let mut fleet = stage(
        "fleet",
        "all",
        &redis_url(),
        &p,
        &[
            "--http-listen",
            &http.to_string(),
            "--api-keys",
            keys.to_str().unwrap(),
            "--idle-timeout-ms",
            "4000",
            "--client-write-timeout-ms",
            "2000",
            "--resume-grace-ms",
            "10000",
        ],
    );
    fleet.wait_serving(Duration::from_secs(180)).await;
    let out = client(&[
        "raw",
        &http.port().to_string(),
        key,
        p16.to_str().unwrap(),
        p24.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the websockets client failed:\n{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        fleet.log().join("\n")
    );
    for case in [
        "auth",
        "bad-input",
        "vad-session",
        "defaults",
        "manual",
        "resume",
        "idle",
        "never-reads",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(&format!("ok {case}"))),
            "case {case} did not run:\n{stdout}"
        );
    }
    // The server stayed healthy throughout.
    fleet.wait_serving(Duration::from_secs(5)).await;
}

/// A Realtime session from Rust: `samples` (16 kHz) appended in 100 ms
/// pieces at real-time pace; `on_chunk(i)` runs before piece `i`. Returns
/// every server event, once each utterance that started has its transcript.
async fn websocket_session(
    http: std::net::SocketAddr,
    samples: &[f32],
    mut on_chunk: impl FnMut(usize),
) -> Vec<serde_json::Value> {
    use base64::Engine;
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let url = format!("ws://{http}/v1/realtime?intent=transcription");
    let (ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (mut sink, mut events) = ws.split();
    let update = serde_json::json!({"type": "transcription_session.update", "session": {
        "input_audio_format": {"type": "audio/pcm", "rate": 16_000},
        "input_audio_transcription": {"language": "en"},
    }});
    sink.send(Message::Text(update.to_string().into()))
        .await
        .unwrap();
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let reader = {
        let received = received.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = events.next().await {
                if let Message::Text(t) = m {
                    received
                        .lock()
                        .unwrap()
                        .push(serde_json::from_str(t.as_str()).unwrap());
                }
            }
        })
    };
    let start = tokio::time::Instant::now();
    for (i, c) in pcm16_chunks(samples, 1_600).into_iter().enumerate() {
        on_chunk(i);
        tokio::time::sleep_until(start + Duration::from_millis(100 * i as u64)).await;
        let ev = serde_json::json!({"type": "input_audio_buffer.append",
            "audio": base64::engine::general_purpose::STANDARD.encode(c)});
        sink.send(Message::Text(ev.to_string().into()))
            .await
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        {
            let ev = received.lock().unwrap();
            let of = |kind: &str| -> std::collections::BTreeSet<String> {
                ev.iter()
                    .filter(|e| e["type"] == kind)
                    .map(|e| e["item_id"].as_str().unwrap().to_owned())
                    .collect()
            };
            let started = of("input_audio_buffer.speech_started");
            assert!(
                !ev.iter().any(|e| e["type"] == "error"),
                "error event: {ev:?}"
            );
            if !started.is_empty()
                && started == of("conversation.item.input_audio_transcription.completed")
            {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no complete transcript: {:?}",
            received.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = sink.send(Message::Close(None)).await;
    reader.abort();
    received.lock().unwrap().clone()
}

#[tokio::test]
#[ignore = "needs tiny.en + silero-vad weights, LibriVox test speech and Redis; scripts/test.sh"]
async fn websocket_captions_survive_killed_replicas_of_the_three_processes() {
    let redis = redis_url();
    let p = prefix("wskill");
    let fast = ["--claim-idle-ms", "1500"];
    let mut enc1 = stage("encoder-1", "encoder", &redis, &p, &fast);
    let mut enc2 = stage("encoder-2", "encoder", &redis, &p, &fast);
    let mut dec1 = stage("decoder-1", "decoder", &redis, &p, &fast);
    let mut dec2 = stage("decoder-2", "decoder", &redis, &p, &fast);
    let http = free_addr();
    let mut ing = stage(
        "ingest",
        "ingest",
        &redis,
        &p,
        &[
            "--claim-idle-ms",
            "1500",
            "--http-listen",
            &http.to_string(),
        ],
    );
    for proc in [&mut enc1, &mut enc2, &mut dec1, &mut dec2, &mut ing] {
        proc.wait_serving(Duration::from_secs(120)).await;
    }
    let samples = speech();
    let events = {
        let (e1, d1) = (&mut enc1, &mut dec1);
        websocket_session(http, &samples, move |i| {
            // Mid-utterance, while windows are in flight.
            if i == 45 {
                e1.kill9();
            }
            if i == 85 {
                d1.kill9();
            }
        })
        .await
    };
    let completed: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["type"] == "conversation.item.input_audio_transcription.completed")
        .collect();
    assert!(completed.len() >= 3, "{events:?}");
    // Each caption is what the offline transcriber hears in its span.
    let dir = tempfile::tempdir().unwrap();
    for c in &completed {
        let (a, b) = (
            c["start_ms"].as_u64().unwrap() as usize * 16,
            (c["end_ms"].as_u64().unwrap() as usize * 16).min(samples.len()),
        );
        let wav = dir.path().join("span.wav");
        std::fs::write(
            &wav,
            nexus_audio::wav::encode_pcm16(&[samples[a..b].to_vec()], 16_000),
        )
        .unwrap();
        let offline = nexus_tests::fleet::transcribe_file(&wav, &["--beam-size", "1"]);
        assert_eq!(
            c["transcript"].as_str().unwrap(),
            offline.replace('\n', " "),
            "{c}"
        );
    }
    let took_over: usize = [&enc2, &dec2]
        .iter()
        .map(|p| {
            p.log()
                .iter()
                .filter(|l| l.contains("took over work"))
                .count()
        })
        .sum();
    println!(
        "websocket: {}\nsurvivors took over unacknowledged work {took_over} times",
        completed
            .iter()
            .map(|c| c["transcript"].as_str().unwrap())
            .collect::<Vec<_>>()
            .join(" ")
    );
}
