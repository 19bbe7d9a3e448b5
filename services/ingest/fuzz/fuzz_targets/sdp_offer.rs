//! SDP offers as `POST /v1/webrtc/sessions` takes them: at most 64 KiB of
//! UTF-8 with an audio section, then the parser the offer goes through.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() > 64 << 10 {
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else { return };
    if !text.lines().any(|l| l.starts_with("m=audio")) {
        return;
    }
    let mut reader = std::io::Cursor::new(text.as_bytes());
    if let Ok(d) = rtc_sdp::description::session::SessionDescription::unmarshal(&mut reader) {
        // What the answerer reads of it next.
        for m in &d.media_descriptions {
            let _ = m.attribute("mid");
            let _ = m.attribute("ice-ufrag");
        }
        let _ = d.marshal();
    }
});
