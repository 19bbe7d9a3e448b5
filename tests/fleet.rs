//! The fleet end to end, as separate processes on a real Redis: live sessions
//! over gRPC at real-time pace, replicas killed mid-stream, Redis restarted
//! mid-stream, and admission when the decoder pool is full.
//!
//! Needs the tiny.en and silero-vad weights (`nexus models pull tiny.en
//! silero-vad`), the LibriVox test speech (`scripts/fetch-testdata.sh`) and a
//! Redis on 127.0.0.1 (`NEXUS_TEST_REDIS`); `scripts/test.sh` provides all three.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use nexus_tests::fleet::{
    Proc, RedisServer, SessionOutcome, assert_complete, pcm16_config, prefix, redis_url, speech,
    stage, stream,
};
use tonic::Code;

use nexus_tests::fleet::MODEL;

/// `nexus transcribe` on `samples` with the same model and greedy search.
fn offline(samples: &[f32]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("speech.wav");
    std::fs::write(
        &wav,
        nexus_audio::wav::encode_pcm16(&[samples.to_vec()], 16_000),
    )
    .unwrap();
    nexus_tests::fleet::transcribe_file(&wav, &["--beam-size", "1"])
}

/// Every final equals `nexus transcribe` on exactly the audio of its span, and
/// the finals together hold every word of the whole file's offline transcript
/// up to a few per cent of words (each utterance is decoded without the audio
/// around it, which Whisper sometimes hears differently).
fn matches_offline(out: &SessionOutcome, samples: &[f32]) {
    let mut finals = out.finals();
    finals.sort_by_key(|r| r.segment_id);
    for f in &finals {
        let span = f.span.unwrap();
        let (a, b) = (
            span.start_ms as usize * 16,
            (span.end_ms as usize * 16).min(samples.len()),
        );
        let reference = offline(&samples[a..b]);
        let live = f.alternatives.first().map_or("", |x| x.transcript.as_str());
        assert_eq!(
            live,
            reference.replace('\n', " "),
            "segment {} ({span:?})",
            f.segment_id
        );
    }
    let whole = offline(samples);
    let wer = nexus_eval::wer(&whole, &out.text());
    println!(
        "live:    {}\noffline: {}\nlive vs whole-file offline: {wer:?}",
        out.text(),
        whole.replace('\n', " ")
    );
    assert!(wer.rate() <= 0.1, "live drifted from offline: {wer:?}");
}

async fn all_serving(procs: &mut [&mut Proc]) {
    for p in procs.iter_mut() {
        p.wait_serving(Duration::from_secs(120)).await;
    }
}

async fn pending(redis: &str, stream: &str, group: &str) -> i64 {
    let client = redis::Client::open(redis).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let v: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(&mut c)
        .await
        .unwrap();
    match v {
        redis::Value::Array(a) => match a.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => 0,
        },
        _ => 0,
    }
}

#[tokio::test]
#[ignore = "needs tiny.en + silero-vad weights, LibriVox test speech and Redis; scripts/test.sh"]
async fn three_processes_match_offline_transcription() {
    let redis = redis_url();
    let p = prefix("e2e");
    let common = [
        "--redis",
        redis.as_str(),
        "--model",
        MODEL,
        "--key-prefix",
        p.as_str(),
    ];
    let mut enc = Proc::start("encoder", "nexus-encoder", &common);
    // The decoder's admin port: its slot gauges are the autoscaler's signal.
    let admin = nexus_tests::fleet::free_addr();
    let admin_arg = admin.to_string();
    let dec_args = [&common[..], &["--admin-listen", admin_arg.as_str()]].concat();
    let mut dec = Proc::start("decoder", "nexus-decoder", &dec_args);
    let ingest_args = [&common[..], &["--http-listen", "none"]].concat();
    let mut ing = Proc::start("ingest", "nexus-ingest", &ingest_args);
    all_serving(&mut [&mut enc, &mut dec, &mut ing]).await;
    let scrape = move || async move {
        let (status, body) = nexus_tests::http_client::Client::new(admin)
            .get("/metrics", None)
            .await;
        assert_eq!(status, 200, "{body}");
        let gauge = |name: &str| -> u64 {
            body.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("no {name} in {body}"))
                .trim()
                .parse()
                .unwrap()
        };
        (
            gauge("nexus_decoder_slots"),
            gauge("nexus_decoder_slots_free"),
            gauge("nexus_decoder_slots_used"),
        )
    };
    assert_eq!(scrape().await, (16, 16, 0), "an idle decoder's slots");
    let busiest = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let busiest = busiest.clone();
        tokio::spawn(async move {
            loop {
                let (_, _, used) = scrape().await;
                busiest.fetch_max(used, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let samples = speech();
    let mut cfg = pcm16_config(MODEL);
    if let Some(c) = cfg.config.as_mut() {
        c.enable_word_time_offsets = true;
    }
    cfg.speaker_label = "reader".into();
    let t0 = Instant::now();
    let out = stream(ing.addr, cfg, &samples, 1.0, |_| {}).await.unwrap();
    let wall = t0.elapsed();
    sampler.abort();
    assert_complete(&out);
    assert!(
        busiest.load(std::sync::atomic::Ordering::Relaxed) >= 1,
        "the decoder's used-slot gauge never moved during a session"
    );
    // A slot is freed once its last write is acknowledged, which may follow
    // the session's end by a moment.
    let t_free = Instant::now();
    loop {
        let free = scrape().await.1;
        if free == 16 {
            break;
        }
        assert!(
            t_free.elapsed() < Duration::from_secs(10),
            "slots are not free again after the session: {free} of 16"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "final latency after endpoint (ms): {:?}",
        out.final_latency_ms
    );
    matches_offline(&out, &samples);
    assert!(
        wall >= Duration::from_secs_f64(samples.len() as f64 / 16_000.0 * 0.95),
        "the audio was not sent at real-time pace"
    );

    let interims = out.interims();
    assert!(!interims.is_empty(), "no interim results");
    for r in &interims {
        assert!((0.0..=1.0).contains(&r.stability), "{}", r.stability);
    }
    for f in out.finals() {
        assert_eq!(f.stability, 1.0);
        assert_eq!(f.speaker, "reader");
        let span = f.span.unwrap();
        let words = &f.alternatives[0].words;
        assert!(!words.is_empty(), "final without word timings");
        for w in words {
            assert!(
                w.start_ms <= w.end_ms
                    && w.start_ms + 1 >= span.start_ms
                    && w.end_ms <= span.end_ms + 1,
                "{w:?} outside {span:?}"
            );
        }
    }
    // Interim text of a segment never rewrites words already marked stable:
    // the stable share of one interim is a prefix of every later one.
    let mut by_segment: std::collections::HashMap<u64, Vec<(&str, f32)>> = Default::default();
    for r in &interims {
        by_segment
            .entry(r.segment_id)
            .or_default()
            .push((&r.alternatives[0].transcript, r.stability));
    }
    for (seg, shown) in by_segment {
        for w in shown.windows(2) {
            let words: Vec<&str> = w[0].0.split_whitespace().collect();
            let stable = (w[0].1 * words.len() as f32).round() as usize;
            let next: Vec<&str> = w[1].0.split_whitespace().collect();
            assert!(
                next.len() >= stable && next[..stable] == words[..stable],
                "segment {seg}: stable words of {:?} rewritten in {:?}",
                w[0].0,
                w[1].0
            );
        }
    }
    // Nothing is left unacknowledged behind the session.
    let keys = nexus_bus::Keys::new(&p).unwrap();
    for (stage, group) in [("audio", "encoder"), ("encoded", "decoder")] {
        assert_eq!(
            pending(&redis, &keys.stage_stream(stage, 0), group).await,
            0,
            "{stage}"
        );
    }
    // Serving processes run candle's element-wise kernels on the calling
    // thread: no pool of spinning workers beside the stages' own threads
    // (crates/models/src/threads.rs). Every stage has run a model by now.
    for proc in [&enc, &dec, &ing] {
        let names = proc.thread_names();
        assert!(!names.is_empty());
        assert!(
            !names.iter().any(|n| n.starts_with("candle-bp")),
            "{}: {names:?}",
            proc.name
        );
    }
    // SIGTERM drains: health flips, the process exits cleanly.
    assert!(dec.terminate().success(), "{}", dec.log().join("\n"));
}

#[tokio::test]
#[ignore = "needs tiny.en + silero-vad weights, LibriVox test speech and Redis; scripts/test.sh"]
async fn killed_replicas_lose_and_duplicate_nothing() {
    let redis = redis_url();
    let p = prefix("kill");
    let fast = ["--claim-idle-ms", "1500"];
    let mut enc1 = stage("encoder-1", "encoder", &redis, &p, &fast);
    let mut enc2 = stage("encoder-2", "encoder", &redis, &p, &fast);
    let mut dec1 = stage("decoder-1", "decoder", &redis, &p, &fast);
    let mut dec2 = stage("decoder-2", "decoder", &redis, &p, &fast);
    let mut ing = stage("ingest", "ingest", &redis, &p, &fast);
    all_serving(&mut [&mut enc1, &mut enc2, &mut dec1, &mut dec2, &mut ing]).await;

    let samples = speech();
    let out = {
        let (e1, d1) = (&mut enc1, &mut dec1);
        stream(ing.addr, pcm16_config(MODEL), &samples, 1.0, move |i| {
            // Mid-utterance, while windows are in flight.
            if i == 45 {
                e1.kill9();
            }
            if i == 85 {
                d1.kill9();
            }
        })
        .await
        .unwrap()
    };
    assert_complete(&out);
    matches_offline(&out, &samples);
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
        "live: {}\nsurvivors took over unacknowledged work {took_over} times",
        out.text()
    );
    let keys = nexus_bus::Keys::new(&p).unwrap();
    for (stage, group) in [("audio", "encoder"), ("encoded", "decoder")] {
        assert_eq!(
            pending(&redis, &keys.stage_stream(stage, 0), group).await,
            0,
            "{stage}"
        );
    }
}

#[tokio::test]
#[ignore = "needs tiny.en + silero-vad weights, LibriVox test speech and Redis; scripts/test.sh"]
async fn redis_restart_mid_stream_drops_nothing_silently() {
    let port = nexus_tests::fleet::free_addr().port();
    let server = RedisServer::start(port, tempfile::tempdir().unwrap());
    let url = format!("redis://127.0.0.1:{}", server.port);
    let p = prefix("restart");
    let fast = ["--claim-idle-ms", "3000"];
    let mut enc = stage("encoder", "encoder", &url, &p, &fast);
    let mut dec = stage("decoder", "decoder", &url, &p, &fast);
    let mut ing = stage("ingest", "ingest", &url, &p, &fast);
    all_serving(&mut [&mut enc, &mut dec, &mut ing]).await;

    let samples = speech();
    let mut server = Some(server);
    let mut dir = None;
    let out = stream(ing.addr, pcm16_config(MODEL), &samples, 1.0, |i| {
        if i == 60 {
            dir = server.take().map(RedisServer::kill9);
            std::thread::sleep(Duration::from_millis(1_500));
            server = dir.take().map(|d| RedisServer::start(port, d));
        }
    })
    .await
    .unwrap();
    match &out.status {
        None => {
            assert_complete(&out);
            matches_offline(&out, &samples);
            println!("the session rode out the restart: {}", out.text());
        }
        Some(s) => {
            // Failing is allowed, silently losing speech is not: the error says so and is retryable.
            assert_eq!(s.code(), Code::Unavailable, "{s:?}");
            assert!(s.message().contains("retry"), "{s:?}");
            println!("the session failed with a retryable error: {}", s.message());
        }
    }
    drop(server);
}

#[tokio::test]
#[ignore = "needs tiny.en + silero-vad weights, LibriVox test speech and Redis; scripts/test.sh"]
async fn a_full_decoder_pool_refuses_new_sessions_at_once() {
    let redis = redis_url();
    let p = prefix("full");
    let mut fleet = stage("fleet", "all", &redis, &p, &["--decoder-sessions", "1"]);
    fleet.wait_serving(Duration::from_secs(120)).await;
    let addr = fleet.addr;
    let samples = speech();
    let running = tokio::spawn({
        let samples = samples.clone();
        async move { stream(addr, pcm16_config(MODEL), &samples, 1.0, |_| {}).await }
    });
    // Once the first session holds the only slot:
    let t0 = Instant::now();
    while !fleet.log().iter().any(|l| l.contains("session admitted")) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the first session was not admitted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t0 = Instant::now();
    let refused = stream(addr, pcm16_config(MODEL), &samples[..16_000], 1.0, |_| {}).await;
    let waited = t0.elapsed();
    let status = refused
        .err()
        .or_else(|| None)
        .expect("the second session was admitted");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("slots"), "{}", status.message());
    assert!(waited < Duration::from_secs(2), "refusal took {waited:?}");

    let out = running.await.unwrap().unwrap();
    assert_complete(&out);
    matches_offline(&out, &samples);
    // The finished session gave its slot back: a new one is admitted.
    let again = stream(addr, pcm16_config(MODEL), &samples[..8_000], 4.0, |_| {})
        .await
        .unwrap();
    assert!(again.status.is_none(), "{:?}", again.status);
}

/// Ingest learns what each model can do from the decoders that loaded it,
/// not from its name or its own flags: an English-only model served from a
/// folder whose name does not say so is refused other languages, and the
/// decoders' text translation model is offered and used though ingest was
/// never told of it.
#[tokio::test]
#[ignore = "needs tiny.en, qwen2.5-0.5b-instruct and silero-vad weights, LibriVox test speech and Redis; scripts/test.sh"]
async fn ingest_learns_what_models_can_do_from_the_decoders() {
    use nexus_proto::speech::models_client::ModelsClient;
    use nexus_proto::speech::recognize_request::AudioSource;
    use nexus_proto::speech::{
        Capability, ListModelsRequest, RecognitionConfig, Task, TranslationConfig,
    };

    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("meeting-model");
    std::os::unix::fs::symlink(
        nexus_weights::resolve::resolve_model(MODEL, None).unwrap(),
        &folder,
    )
    .unwrap();
    let folder = folder.to_str().unwrap().to_owned();
    let (redis, p) = (redis_url(), prefix("catalog"));
    let common = [
        "--redis",
        redis.as_str(),
        "--model",
        folder.as_str(),
        "--key-prefix",
        p.as_str(),
    ];
    let mut enc = Proc::start("encoder", "nexus-encoder", &common);
    let dec_args = [
        &common[..],
        &["--translation-model", "qwen2.5-0.5b-instruct"],
    ]
    .concat();
    let mut dec = Proc::start("decoder", "nexus-decoder", &dec_args);
    let ingest_args = [&common[..], &["--http-listen", "none"]].concat();
    let mut ing = Proc::start("ingest", "nexus-ingest", &ingest_args);
    all_serving(&mut [&mut enc, &mut dec, &mut ing]).await;

    let ch = nexus_tests::connect(ing.addr).await.unwrap();
    let models = ModelsClient::new(ch)
        .list_models(ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models;
    let whisper = models.iter().find(|m| m.name == folder).unwrap();
    assert_eq!(whisper.family, "whisper", "{whisper:?}");
    assert_eq!(whisper.languages, ["en"], "{whisper:?}");
    assert!(
        whisper.translation_targets.iter().any(|t| t == "de"),
        "{whisper:?}"
    );
    let text = models
        .iter()
        .find(|m| m.capabilities == [Capability::TextTranslation as i32])
        .unwrap_or_else(|| panic!("no text translation model in {models:?}"));
    assert_eq!(
        (text.name.as_str(), text.family.as_str()),
        ("qwen2.5-0.5b-instruct", "qwen2")
    );

    let clip = std::fs::read(
        nexus_tests::fleet::testdata()
            .join("librivox/sense_and_sensibility_01_austen_64kb-0870.wav"),
    )
    .unwrap();
    let german = nexus_tests::fleet::recognize(
        &ing,
        RecognitionConfig {
            language: "de".into(),
            ..Default::default()
        },
        AudioSource::Content(clip.clone().into()),
    )
    .await
    .unwrap_err();
    assert_eq!(german.code(), Code::InvalidArgument, "{german:?}");
    assert!(german.message().contains("English-only"), "{german:?}");

    let translated = nexus_tests::fleet::recognize(
        &ing,
        RecognitionConfig {
            language: "en".into(),
            task: Task::Translate as i32,
            translation: Some(TranslationConfig {
                target_language: "de".into(),
                model: String::new(),
            }),
            ..Default::default()
        },
        AudioSource::Content(clip.into()),
    )
    .await
    .unwrap();
    let tr = translated
        .results
        .iter()
        .find_map(|r| r.translation.as_ref())
        .unwrap_or_else(|| panic!("no translation in {translated:?}"));
    assert_eq!(tr.target_language, "de", "{tr:?}");
    assert!(!tr.text.trim().is_empty(), "{tr:?}");
}
