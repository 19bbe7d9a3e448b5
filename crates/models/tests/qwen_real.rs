//! Text translation with the Qwen2.5-0.5B GGUF. The real-weights tests need
//! `nexus models pull qwen2.5-0.5b-instruct` (the test script does it).

use std::path::PathBuf;

use candle_core::Device;
use nexus_models::qwen::{Translator, language_name};

fn gguf() -> PathBuf {
    nexus_weights::Store::new(nexus_weights::Store::default_root())
        .source_dir("qwen2.5-0.5b-instruct")
        .join("model.gguf")
}

#[test]
#[ignore = "needs the qwen2.5-0.5b-instruct GGUF"]
fn translates_both_ways_and_tokenizes_losslessly() {
    let mut t =
        Translator::load(&gguf(), &Device::Cpu).expect("nexus models pull qwen2.5-0.5b-instruct");
    let text = "Go forward ten meters, then turn left.";
    // Byte-level BPE rebuilt from GGUF metadata must round-trip any text, and
    // ChatML control tokens must stay whole.
    for s in [text, "向前走十米。", "naïve café — 100% ✓"] {
        let ids = t.encode(s).unwrap();
        assert!(!ids.is_empty());
    }
    assert_eq!(t.encode("<|im_start|>").unwrap().len(), 1);
    let zh = t.translate(text, Some("en"), "zh").unwrap();
    assert!(zh.contains('十') && zh.contains('米'), "{zh}");
    assert!(!zh.contains("Go forward"), "{zh}");
    let en = t
        .translate("我们明天早上九点开会。", Some("zh"), "en")
        .unwrap();
    let norm = nexus_eval::normalize_english(&en);
    assert!(norm.contains("meeting") || norm.contains("meet"), "{en}");
    assert!(norm.contains('9') || norm.contains("nine"), "{en}");
}

#[test]
fn translator_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("model.gguf");
    std::fs::write(&p, b"RIFF....WAVEfmt ").unwrap();
    let e = Translator::load(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("model.gguf: not a GGUF file"), "{e}");
    let e = Translator::load(&tmp.path().join("absent.gguf"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("absent.gguf"), "{e}");
    assert_eq!(language_name("zh"), Some("Simplified Chinese"));
    assert_eq!(language_name("xx"), None);
}
