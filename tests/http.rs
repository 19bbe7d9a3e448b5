//! The OpenAI-compatible HTTP API driven by OpenAI's own Python client, API
//! keys and tenant limits on gRPC and HTTP, TranslateText, and the refusal to
//! serve an open API beyond loopback.
//!
//! Needs the tiny.en, Qwen2.5-0.5B and silero-vad weights, the LibriVox test
//! speech, the Python clients in `.venv` and a Redis on 127.0.0.1;
//! `scripts/test.sh` provides them all.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use nexus_proto::speech::recognize_request::AudioSource;
use nexus_proto::speech::speech_recognition_client::SpeechRecognitionClient;
use nexus_proto::speech::streaming_recognize_request::StreamingRequest;
use nexus_proto::speech::translation_client::TranslationClient;
use nexus_proto::speech::{
    RecognitionConfig, RecognizeRequest, StreamingRecognizeRequest, TranslateTextRequest,
};
use nexus_tests::fleet::{MODEL, bin, free_addr, pcm16_config, prefix, python, redis_url, speech};
use tonic::Code;

const TRANSLATOR: &str = "qwen2.5-0.5b-instruct";

fn sha256_hex(key: &str) -> String {
    let out = Command::new(bin("nexus"))
        .args(["keys", "hash", key])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn keys_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("keys.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[[keys]]
tenant = "acme"
sha256 = "{}"

[[keys]]
tenant = "solo"
sha256 = "{}"

[tenants.solo]
max_concurrent = 1
requests_per_minute = 3
"#,
            sha256_hex("acme-key"),
            sha256_hex("solo-key"),
        ),
    )
    .unwrap();
    path
}

fn with_key<T>(msg: T, key: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(k) = key {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    r
}

fn recognize_request() -> RecognizeRequest {
    RecognizeRequest {
        config: Some(RecognitionConfig {
            model: MODEL.into(),
            ..Default::default()
        }),
        audio_source: Some(AudioSource::Content(
            nexus_audio::wav::encode_pcm16(&[vec![0.0; 16_000]], 16_000).into(),
        )),
    }
}

#[tokio::test]
#[ignore = "needs tiny.en, qwen2.5-0.5b-instruct, silero-vad, LibriVox speech, .venv and Redis; scripts/test.sh"]
async fn openai_client_auth_limits_and_text_translation() {
    let dir = tempfile::tempdir().unwrap();
    let keys = keys_file(dir.path());
    let wav_path = dir.path().join("speech.wav");
    std::fs::write(
        &wav_path,
        nexus_audio::wav::encode_pcm16(&[speech()], 16_000),
    )
    .unwrap();
    // "Go forward ten meters": short, so the debug build's Qwen translates it in seconds.
    let raw = std::fs::read(nexus_tests::fleet::testdata().join("goforward.raw")).unwrap();
    let short: Vec<f32> = raw
        .chunks_exact(2)
        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
        .collect();
    let short_path = dir.path().join("goforward.wav");
    std::fs::write(
        &short_path,
        nexus_audio::wav::encode_pcm16(std::slice::from_ref(&short), 16_000),
    )
    .unwrap();
    let http = free_addr();
    let p = prefix("http");
    let mut fleet = nexus_tests::fleet::stage(
        "fleet",
        "all",
        &redis_url(),
        &p,
        &[
            "--http-listen",
            &http.to_string(),
            "--api-keys",
            keys.to_str().unwrap(),
            "--translation-model",
            TRANSLATOR,
            // The test reads what is translated, not how fast: no time
            // budget marks a caption on a machine busy with other tests.
            "--translation-time-budget-ms",
            "600000",
            "--translation-live-wait-ms",
            "600000",
            "--max-audio-mb",
            "2",
            // Below a debug build's Qwen time per final: entries in
            // translation must stay with their decoder all the same.
            "--claim-idle-ms",
            "6000",
        ],
    );
    fleet.wait_serving(Duration::from_secs(180)).await;
    let ch = nexus_tests::connect(fleet.addr).await.unwrap();

    // gRPC without a key, with a bad key, and with a malformed header.
    let mut asr = SpeechRecognitionClient::new(ch.clone());
    let e = asr
        .recognize(with_key(recognize_request(), None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("API key is required"), "{e:?}");
    let e = asr
        .recognize(with_key(recognize_request(), Some("wrong")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("not valid"), "{e:?}");
    let mut basic = tonic::Request::new(recognize_request());
    basic
        .metadata_mut()
        .insert("authorization", "Basic abc".parse().unwrap());
    let e = asr.recognize(basic).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("Bearer"), "{e:?}");
    // A good key: one second of silence has no results.
    let r = asr
        .recognize(with_key(recognize_request(), Some("acme-key")))
        .await
        .unwrap()
        .into_inner();
    assert!(r.results.is_empty(), "{r:?}");

    // Tenant "solo": one call at a time. A live stream holds its place ...
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(StreamingRecognizeRequest {
        streaming_request: Some(StreamingRequest::StreamingConfig(pcm16_config(MODEL))),
    })
    .await
    .unwrap();
    let mut live = asr
        .streaming_recognize(with_key(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            Some("solo-key"),
        ))
        .await
        .unwrap()
        .into_inner();
    let first = live.message().await.unwrap().unwrap();
    assert!(!first.session_id.is_empty());
    let e = asr
        .recognize(with_key(recognize_request(), Some("solo-key")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("maximum of 1 calls"), "{e:?}");
    // ... while other tenants go on.
    asr.recognize(with_key(recognize_request(), Some("acme-key")))
        .await
        .unwrap();
    drop(tx);
    while let Ok(Some(_)) = live.message().await {}
    // Three calls a minute: the stream and the refused call took two.
    tokio::time::sleep(Duration::from_millis(300)).await;
    asr.recognize(with_key(recognize_request(), Some("solo-key")))
        .await
        .unwrap();
    let e = asr
        .recognize(with_key(recognize_request(), Some("solo-key")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("3 requests per minute"), "{e:?}");
    // Over HTTP too, with OpenAI's error body.
    let client = nexus_tests::http_client::Client::new(http);
    let (status, body) = client.get("/v1/models", Some("solo-key")).await;
    assert_eq!(status, 429, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert!(body.contains("requests per minute"), "{body}");

    // TranslateText through the decoders' Qwen.
    let mut tr = TranslationClient::new(ch.clone());
    let out = tr
        .translate_text(with_key(
            TranslateTextRequest {
                texts: vec![
                    "Go forward ten meters.".into(),
                    "Thank you very much.".into(),
                ],
                source_language: "en".into(),
                target_language: "de".into(),
                model: String::new(),
            },
            Some("acme-key"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.model, TRANSLATOR);
    assert_eq!(out.translations.len(), 2);
    // The 0.5B model is no great translator ("Go forward ten meters." came out
    // as "Zwei Meter weiter."), but it writes German.
    let german = |i: usize| out.translations[i].text.to_lowercase();
    assert!(german(0).contains("meter"), "{out:?}");
    assert!(german(1).contains("dank"), "{out:?}");
    assert_eq!(out.translations[0].source_language, "en");
    for (req, code, msg) in [
        (
            TranslateTextRequest {
                target_language: "de".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "texts is empty",
        ),
        (
            TranslateTextRequest {
                texts: vec!["hi".into()],
                ..Default::default()
            },
            Code::InvalidArgument,
            "target_language is required",
        ),
        (
            TranslateTextRequest {
                texts: vec!["hi".into()],
                target_language: "klingon".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "not supported",
        ),
        (
            TranslateTextRequest {
                texts: vec!["hi".into()],
                target_language: "de".into(),
                model: "gpt-9".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "not served here",
        ),
        (
            TranslateTextRequest {
                texts: vec!["x".repeat(5_000)],
                target_language: "de".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "at most 4000",
        ),
        (
            // 4,000 characters, 16,000 bytes: as many tokens as bytes.
            TranslateTextRequest {
                texts: vec!["😀".repeat(4_000)],
                target_language: "de".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "at most 12000 bytes",
        ),
    ] {
        let e = tr
            .translate_text(with_key(req, Some("acme-key")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().contains(msg), "{msg}: {e:?}");
    }
    let e = tr
        .translate_text(with_key(TranslateTextRequest::default(), None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    // Speech translation on a live stream: finals carry the German text.
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut cfg = pcm16_config(MODEL);
    if let Some(c) = cfg.config.as_mut() {
        c.task = nexus_proto::speech::Task::Translate as i32;
        c.translation = Some(nexus_proto::speech::TranslationConfig {
            target_language: "de".into(),
            model: String::new(),
        });
    }
    tx.send(StreamingRecognizeRequest {
        streaming_request: Some(StreamingRequest::StreamingConfig(cfg)),
    })
    .await
    .unwrap();
    let mut padded = short.clone();
    padded.extend(std::iter::repeat_n(0.0, 16_000));
    for bytes in nexus_tests::fleet::pcm16_chunks(&padded, 3_200) {
        tx.send(StreamingRecognizeRequest {
            streaming_request: Some(StreamingRequest::AudioContent(bytes.into())),
        })
        .await
        .unwrap();
    }
    drop(tx);
    let mut live = asr
        .streaming_recognize(with_key(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            Some("acme-key"),
        ))
        .await
        .unwrap()
        .into_inner();
    let mut finals = Vec::new();
    while let Some(r) = live.message().await.unwrap() {
        finals.extend(r.results.into_iter().filter(|r| r.is_final));
    }
    assert_eq!(finals.len(), 1, "{finals:?}");
    let t = finals[0]
        .translation
        .clone()
        .expect("a translation on the final");
    assert_eq!(t.target_language, "de");
    assert_eq!(t.model, TRANSLATOR);
    assert!(t.text.to_lowercase().contains("meter"), "{t:?}");
    assert!(
        finals[0].alternatives[0]
            .transcript
            .to_lowercase()
            .contains("forward"),
        "{finals:?}"
    );

    // OpenAI's Python client against the HTTP API.
    let base = format!("http://{http}/v1");
    let out = tokio::task::spawn_blocking({
        let (base, wav, short) = (base.clone(), wav_path.clone(), short_path.clone());
        move || {
            Command::new(python())
                .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/openai_client.py"))
                .args([
                    base.as_str(),
                    "acme-key",
                    wav.to_str().unwrap(),
                    short.to_str().unwrap(),
                ])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "openai client failed:\n{}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        fleet.log().join("\n")
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reference = tokio::task::spawn_blocking({
        let wav = wav_path.clone();
        move || nexus_tests::fleet::transcribe_file(&wav, &[])
    })
    .await
    .unwrap();
    for field in ["json", "text", "verbose_text", "stream"] {
        let got = report[field].as_str().unwrap();
        let wer = nexus_eval::wer(&reference, got);
        assert!(
            wer.rate() <= 0.10,
            "{field}: WER {:.3}\n{reference}\n{got}",
            wer.rate()
        );
    }
    let translation = report["translation"].as_str().unwrap();
    assert!(
        translation.to_lowercase().contains("meter")
            && nexus_eval::wer("go forward ten meters", translation).rate() > 0.5,
        "not German: {translation}"
    );
    assert_eq!(report["translation_language"], "de");

    // Nothing in translation (live finals, uploads, TranslateText) was taken
    // over as if its decoder had died.
    let log = fleet.log();
    assert!(
        !log.iter().any(|l| l.contains("took over work")),
        "{}",
        log.join("\n")
    );

    // HTTP status codes and OpenAI's error body, without the client.
    let (status, body) = client.get("/v1/models", None).await;
    assert_eq!(status, 401, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");
    let (status, body) = client.get("/v1/models", Some("acme-key")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = client.get("/v1/models/nope", Some("acme-key")).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("not served here"), "{body}");
    let (status, body) = client
        .post_form(
            "/v1/audio/transcriptions",
            Some("acme-key"),
            "model",
            "whisper-1",
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("no `file` field"), "{body}");
    // Audio over the limit: 400 naming it while the upload fits the body
    // limit (audio limit + 1 MiB), 413 beyond.
    let wav = |bytes: usize| nexus_audio::wav::encode_pcm16(&[vec![0.1; bytes / 2]], 16_000);
    for (size, code, msg) in [
        (2_500_000, 400, "the limit is 2097152 bytes"),
        (4_000_000, 413, "audio limit of 2 MiB"),
    ] {
        let (status, body) = client
            .post_file(
                "/v1/audio/transcriptions",
                Some("acme-key"),
                &[],
                &wav(size),
            )
            .await;
        assert_eq!(status, code, "{body}");
        assert!(body.contains(msg), "{msg}: {body}");
    }
    for (fields, msg) in [
        (&[("language", "xx")][..], "not one Whisper knows"),
        (&[("language", "de")][..], "English-only"),
        (&[("temperature", "3")][..], "from 0 to 1"),
        (&[("stream", "maybe")][..], "true or false"),
        (
            &[("timestamp_granularities[]", "char")][..],
            "segment or word",
        ),
        (
            &[("target_language", "de")][..],
            "belongs to /v1/audio/translations",
        ),
    ] {
        let (status, body) = client
            .post_file(
                "/v1/audio/transcriptions",
                Some("acme-key"),
                fields,
                &wav(32_000),
            )
            .await;
        assert_eq!(status, 400, "{fields:?}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{body}");
        assert!(body.contains(msg), "{msg}: {body}");
    }
}

#[tokio::test]
#[ignore = "needs the silero-vad and tiny.en weights; scripts/test.sh"]
async fn an_open_api_is_refused_beyond_loopback() {
    let port = free_addr().port();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin("nexus"))
            .args([
                "serve",
                "--model",
                MODEL,
                "--http-listen",
                "none",
                "--listen",
                &format!("0.0.0.0:{port}"),
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to serve the API without keys") && err.contains("--api-keys"),
        "{err}"
    );
}

/// A few lines of HTTP/1.1 over a TCP stream: enough to read status codes and
/// bodies without pulling a client library into the tests.
#[tokio::test]
#[ignore = "needs the tiny.en and silero-vad weights, openssl, .venv and Redis; scripts/test.sh"]
async fn tls_serves_grpc_and_http() {
    use nexus_proto::speech::ListModelsRequest;
    use nexus_proto::speech::models_client::ModelsClient;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};

    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let http = free_addr();
    let mut fleet = nexus_tests::fleet::stage(
        "fleet",
        "all",
        &redis_url(),
        &prefix("tls"),
        &[
            "--http-listen",
            &http.to_string(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&cert).unwrap()))
        .domain_name("localhost");
    let endpoint = Channel::from_shared(format!("https://localhost:{}", fleet.addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap();
    let t0 = std::time::Instant::now();
    let models = loop {
        let last = match endpoint.connect().await {
            Ok(ch) => match ModelsClient::new(ch)
                .list_models(ListModelsRequest::default())
                .await
            {
                Ok(r) if r.get_ref().models.iter().any(|m| m.ready) => break r.into_inner(),
                other => format!("{other:?}"),
            },
            Err(e) => format!("{e:?}"),
        };
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no TLS answer: {last}\n{}",
            fleet.log().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(models.models.iter().any(|m| m.name == MODEL));
    // Plaintext gRPC gets no answer from a TLS port.
    let plain = nexus_tests::connect(fleet.addr).await;
    if let Ok(ch) = plain {
        assert!(
            ModelsClient::new(ch)
                .list_models(ListModelsRequest::default())
                .await
                .is_err()
        );
    }
    // HTTPS with the certificate as the only trusted root.
    let script = format!(
        "import ssl, urllib.request, json\n\
         ctx = ssl.create_default_context(cafile={cert:?})\n\
         r = urllib.request.urlopen('https://localhost:{port}/v1/models', context=ctx)\n\
         print(json.dumps([m['id'] for m in json.load(r)['data']]))\n",
        cert = cert.to_str().unwrap(),
        port = http.port()
    );
    let out = Command::new(python())
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        fleet.log().join("\n")
    );
    let ids: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(ids.contains(&MODEL.to_owned()), "{ids:?}");
    fleet.terminate();
}
