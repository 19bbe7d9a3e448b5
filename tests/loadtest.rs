//! The load generator end to end: a short scenario against `nexus serve`
//! (which it starts) over gRPC and the Realtime WebSocket, its report read back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use nexus_tests::fleet::{bin, testdata};

#[test]
#[ignore = "needs tiny.en + silero-vad weights and the LibriVox test speech; scripts/test.sh"]
fn a_smoke_scenario_reports_latency_wer_and_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let scenario =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../loadtest/scenarios/smoke.toml");
    let out = Command::new(bin("nexus-loadtest"))
        .arg(&scenario)
        .args([
            "--spawn",
            "serve",
            "--all-levels",
            "--protocol",
            "grpc,websocket",
            "--streams",
            "1,2",
            "--report",
        ])
        .arg(&report)
        .arg("--testdata")
        .arg(testdata())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("sustainable:"), "{stdout}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let all = r["levels"].as_array().unwrap();
    assert_eq!(all.len(), 4, "two levels over two protocols: {r}");
    for protocol in ["grpc", "websocket"] {
        let n = all.iter().filter(|l| l["protocol"] == protocol).count();
        assert_eq!(n, 2, "{protocol}: {r}");
    }
    let levels: Vec<&serde_json::Value> = all.iter().filter(|l| l["protocol"] == "grpc").collect();
    for l in all {
        assert!(l["errors"].as_object().unwrap().is_empty(), "{l}");
        assert!(
            l["final_after_endpoint_ms"]["n"].as_u64().unwrap() >= 1,
            "{l}"
        );
        assert!(l["interim_ms"]["n"].as_u64().unwrap() >= 1, "{l}");
        // The interim rate is what arrived per second of audio sent.
        let rate = l["interims_per_s"].as_f64().unwrap();
        let expected = l["interim_ms"]["n"].as_f64().unwrap() / l["audio_s"].as_f64().unwrap();
        assert!(rate > 0.0 && (rate - expected).abs() < 1e-9, "{l}");
        let wer = l["wer"].as_f64().unwrap();
        assert!(wer < 0.3, "WER {wer} of tiny.en on LibriVox clips: {l}");
        // The embedded server's admin port gave the model time per audio second.
        assert!(l["rtf_encoder"].as_f64().unwrap() > 0.0, "{l}");
        assert!(l["rtf_decoder"].as_f64().unwrap() > 0.0, "{l}");
        // A level is within budget exactly when it missed nothing, and says
        // what it missed otherwise.
        let missed = l["missed"].as_array().unwrap();
        assert_eq!(
            l["within_budget"].as_bool().unwrap(),
            missed.is_empty(),
            "{l}"
        );
    }
    // A level's WER is held to its sessions run alone: the single stream is
    // its own; for two streams, the order from clip 1 ran alone first.
    for protocol in ["grpc", "websocket"] {
        let alone: Vec<Option<f64>> = all
            .iter()
            .filter(|l| l["protocol"] == protocol)
            .map(|l| l["alone_wer"].as_f64())
            .collect();
        assert!(alone[0].is_none() && alone[1].is_some(), "{protocol}: {r}");
        assert!(
            stdout.contains(&format!("{protocol} | alone, from clip 1: WER")),
            "{stdout}"
        );
    }
    assert_eq!(r["interim_budget_ms"].as_f64(), Some(5000.0), "{r}");
    assert_eq!(r["wer_margin_points"].as_f64(), Some(30.0), "{r}");
    // Capacity is the last level of the unbroken run within budget (timing
    // here depends on the machine, so only its consistency is checked).
    let within: Vec<bool> = levels
        .iter()
        .map(|l| l["within_budget"].as_bool().unwrap())
        .collect();
    let sustainable = within
        .iter()
        .zip(&levels)
        .take_while(|(ok, _)| **ok)
        .last()
        .map_or(0, |(_, l)| l["streams"].as_u64().unwrap());
    assert_eq!(
        r["sustainable_streams"].as_u64().unwrap(),
        sustainable,
        "{r}"
    );
    assert_eq!(r["breaks_at"].is_null(), within.iter().all(|ok| *ok), "{r}");
    let by: Vec<&str> = r["by_protocol"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["protocol"].as_str().unwrap())
        .collect();
    assert_eq!(by, ["grpc", "websocket"], "{r}");
    assert!(stdout.contains("over websocket"), "{stdout}");
}
