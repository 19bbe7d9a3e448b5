//! One session's work does not hold up another's on the same fleet: a live
//! finals-only stream's caption arrives while a long recording is still
//! being encoded and decoded with beam search and word times beside it.
//! Shown by order, not by a clock: the live caption comes before the
//! recording's answer and before the encoder has encoded every window of
//! the recording. (How much later a live final comes beside a recording is
//! measured, not asserted: `loadtest/scenarios/live-tiny-beside-batch.toml`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use nexus_proto::speech::{DecodingOptions, RecognitionConfig, recognize_request};
use nexus_tests::fleet::{MODEL, Proc, free_addr, model_rate, pcm16_chunks, testdata};
use tokio::time::Instant;

/// The LibriVox clips, in name order.
fn clips() -> Vec<Vec<f32>> {
    let dir = testdata().join("librivox");
    let mut wavs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wav"))
        .collect();
    wavs.sort();
    wavs.into_iter()
        .map(|w| model_rate(std::fs::read(w).unwrap()))
        .collect()
}

/// The value of `series` on the metrics page at `admin` (0 when absent).
async fn gauge(admin: &str, series: &str) -> f64 {
    let (status, text) = nexus_tests::http_client::Client::new(admin.parse().unwrap())
        .get("/metrics", None)
        .await;
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(k, _)| *k == series)
        .map_or(0.0, |(_, v)| v.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs tiny.en + silero-vad weights and the LibriVox test speech; scripts/test.sh"]
async fn a_live_final_does_not_wait_for_a_long_beam_search_file() {
    let admin = free_addr().to_string();
    let mut serve = Proc::serve(&admin, &[]);
    serve.wait_serving(Duration::from_secs(120)).await;
    let clips = clips();

    // The recording: every clip over and over, 8 minutes, beam 5, word times.
    let mut long = Vec::new();
    for c in clips.iter().cycle() {
        if long.len() >= 480 * 16_000 {
            break;
        }
        long.extend_from_slice(c);
        long.extend(std::iter::repeat_n(0.0, 8_000));
    }
    let config = RecognitionConfig {
        enable_word_time_offsets: true,
        decoding: Some(DecodingOptions {
            beam_size: 5,
            ..Default::default()
        }),
        ..nexus_tests::fleet::pcm16_config(MODEL)
            .config
            .expect("a recognition config")
    };
    let content: Vec<u8> = pcm16_chunks(&long, long.len()).concat();
    let batch = {
        let serve_addr = serve.addr;
        tokio::spawn(async move {
            let ch = nexus_tests::connect(serve_addr).await.unwrap();
            let r =
                nexus_proto::speech::speech_recognition_client::SpeechRecognitionClient::new(ch)
                    .max_encoding_message_size(256 << 20)
                    .recognize(nexus_proto::speech::RecognizeRequest {
                        config: Some(config),
                        audio_source: Some(recognize_request::AudioSource::Content(content.into())),
                    })
                    .await;
            (r, Instant::now())
        })
    };
    // Wait until the file's windows are in the decoder.
    let t0 = Instant::now();
    while gauge(&admin, "nexus_decoder_slots_used").await < 1.0 {
        assert!(
            !batch.is_finished(),
            "the file was answered before it was seen decoding"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the file never reached the decoder:\n{}",
            serve.log().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The encoder's count of final windows, sampled while the live session
    // runs (a recording's windows count as finals).
    const ENCODED: &str = r#"nexus_encoder_segments_total{kind="final",outcome="ok"}"#;
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let sampler = {
        let admin = admin.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while !*stopped.borrow_and_update() {
                samples.push((Instant::now(), gauge(&admin, ENCODED).await));
                let _ = tokio::time::timeout(Duration::from_millis(20), stopped.changed()).await;
            }
            samples
        })
    };

    // A live stream, finals only: one utterance, then silence to end it.
    let mut utterance = clips[0].clone();
    utterance.extend(std::iter::repeat_n(0.0, 2 * 16_000));
    let mut cfg = nexus_tests::fleet::pcm16_config(MODEL);
    cfg.interim_results = false;
    let live = nexus_tests::fleet::stream(serve.addr, cfg, &utterance, 1.0, |_| {})
        .await
        .unwrap();
    let live_done = Instant::now();
    let _ = stop.send(true);
    let samples = sampler.await.unwrap();
    nexus_tests::fleet::assert_complete(&live);
    assert!(
        !live.text().trim().is_empty(),
        "no words in the live final: {:?}",
        live.responses
    );

    let (answer, batch_done) = batch.await.unwrap();
    let answer = answer
        .unwrap_or_else(|s| panic!("the file failed: {s:?}"))
        .into_inner();
    // The file was decoded as asked: several windows, words timed.
    assert!(
        answer.results.len() >= 4,
        "{} results",
        answer.results.len()
    );
    assert!(
        answer
            .results
            .iter()
            .all(|r| !r.alternatives[0].words.is_empty()),
        "a segment without word times"
    );
    assert!(
        live_done < batch_done,
        "the live session ended {:?} after the file's answer: its final waited for the file",
        live_done - batch_done
    );
    // When the live final arrived, the encoder had not yet encoded every
    // window of the recording: the live one went ahead of the rest.
    let final_at = Instant::from_std(live.final_at[0]);
    let encoded_then = samples
        .iter()
        .take_while(|(t, _)| *t <= final_at)
        .last()
        .map_or(0.0, |(_, n)| *n);
    let windows = gauge(&admin, ENCODED).await;
    assert!(
        encoded_then < windows,
        "all {windows} final windows were encoded when the live final arrived: it waited for the recording"
    );
    eprintln!(
        "live final {:?} after its endpoint, with {encoded_then} of {windows} final windows encoded; the file answered {:?} after the live session ended",
        live.final_latency_ms,
        batch_done - live_done
    );
    assert!(serve.terminate().success());
}
