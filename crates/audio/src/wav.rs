//! Writing 16-bit PCM WAV, for synthesised speech, test fixtures and benchmarks.

/// One sample as 16-bit PCM: clamped to [-1, 1], scaled by 32767, rounded.
pub fn to_i16(x: f32) -> i16 {
    (x.clamp(-1.0, 1.0) * 32767.0).round() as i16
}

/// Mono samples as 16-bit little-endian PCM (no header).
pub fn pcm16_le(samples: &[f32]) -> Vec<u8> {
    samples
        .iter()
        .flat_map(|x| to_i16(*x).to_le_bytes())
        .collect()
}

/// A 16-bit PCM WAV file of planar `channels` (all the same length) at `rate`.
/// Samples are clamped to [-1, 1] and scaled by 32767.
pub fn encode_pcm16(channels: &[Vec<f32>], rate: u32) -> Vec<u8> {
    let n = channels.first().map_or(0, Vec::len);
    let ch = channels.len().max(1) as u16;
    let data = (n * usize::from(ch) * 2) as u32;
    let mut b = Vec::with_capacity(data as usize + 44);
    b.extend(b"RIFF");
    b.extend((36 + data).to_le_bytes());
    b.extend(b"WAVEfmt ");
    b.extend(16u32.to_le_bytes());
    b.extend(1u16.to_le_bytes());
    b.extend(ch.to_le_bytes());
    b.extend(rate.to_le_bytes());
    b.extend((rate * u32::from(ch) * 2).to_le_bytes());
    b.extend((ch * 2).to_le_bytes());
    b.extend(16u16.to_le_bytes());
    b.extend(b"data");
    b.extend(data.to_le_bytes());
    for i in 0..n {
        for c in channels {
            b.extend(to_i16(c[i]).to_le_bytes());
        }
    }
    b
}

/// Reads a little-endian `u32` at `pos`, if the bytes are there.
fn u32_at(b: &[u8], pos: usize) -> Option<u32> {
    let s = b.get(pos..pos.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Whether four bytes can be a RIFF chunk id (printable ASCII).
fn chunk_id(b: &[u8], pos: usize) -> bool {
    b.get(pos..pos + 4)
        .is_some_and(|id| id.iter().all(|c| (0x20..0x7f).contains(c)))
}

/// A RIFF/WAVE file as recorders and streaming writers really produce it,
/// rewritten into the canonical layout (`fmt ` then `data`, lengths that agree
/// with the bytes) when its header disagrees with the file: a RIFF length a
/// few bytes off, `0` or `0xFFFFFFFF` placeholders left by a writer that never
/// came back to fill them in, a data length past the end of a half-written
/// file, a missing pad byte after an odd-sized chunk. ffmpeg and Python's
/// `wave` read such files; a strict demuxer refuses them. A file that is
/// consistent, or not a WAV at all, is returned as it came.
pub fn repair_riff(bytes: Vec<u8>) -> Vec<u8> {
    if bytes.len() < 12 || &bytes[..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return bytes;
    }
    let len = bytes.len();
    let mut fmt: Option<(usize, usize)> = None;
    let mut data: Option<(usize, usize)> = None;
    let riff_end = u32_at(&bytes, 4).map_or(0, |s| s as usize + 8);
    let mut consistent = riff_end <= len;
    let mut pos = 12;
    while pos + 8 <= len && data.is_none() {
        if !chunk_id(&bytes, pos) {
            // A writer that dropped the pad byte after an odd chunk: its next id
            // starts one byte early.
            if pos > 12 && chunk_id(&bytes, pos - 1) {
                pos -= 1;
                consistent = false;
            } else {
                break;
            }
        }
        let declared = u32_at(&bytes, pos + 4).unwrap_or(0) as usize;
        let body = pos + 8;
        let left = len - body;
        match &bytes[pos..pos + 4] {
            b"fmt " => fmt = Some((body, declared.min(left))),
            b"data" => {
                let size = if declared == 0 || declared > left {
                    consistent = false;
                    left
                } else {
                    declared
                };
                data = Some((body, size));
            }
            _ => {}
        }
        if declared > left {
            consistent = false;
        }
        pos = body.saturating_add(declared).saturating_add(declared & 1);
    }
    let (Some((fmt_at, fmt_len)), Some((data_at, mut data_len))) = (fmt, data) else {
        return bytes;
    };
    if consistent && data_at + data_len <= riff_end {
        return bytes;
    }
    // Whole frames only: a half-written last frame is dropped.
    let block = bytes
        .get(fmt_at + 12..fmt_at + 14)
        .map_or(1, |b| usize::from(u16::from_le_bytes([b[0], b[1]])).max(1));
    if fmt_len >= 14 {
        data_len -= data_len % block;
    }
    let fmt_pad = fmt_len & 1;
    let total = 4 + 8 + fmt_len + fmt_pad + 8 + data_len;
    let mut out = Vec::with_capacity(total + 8);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(total.min(u32::MAX as usize) as u32).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&(fmt_len as u32).to_le_bytes());
    out.extend_from_slice(&bytes[fmt_at..fmt_at + fmt_len]);
    out.extend(std::iter::repeat_n(0u8, fmt_pad));
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(data_len.min(u32::MAX as usize) as u32).to_le_bytes());
    out.extend_from_slice(&bytes[data_at..data_at + data_len]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> Vec<u8> {
        let s: Vec<f32> = (0..1_001).map(|i| (i as f32 * 0.01).sin() * 0.5).collect();
        encode_pcm16(&[s], 16_000)
    }

    #[test]
    fn a_consistent_file_is_left_alone() {
        let f = file();
        assert_eq!(repair_riff(f.clone()), f);
        let not_wav = b"OggS and then some bytes".to_vec();
        assert_eq!(repair_riff(not_wav.clone()), not_wav);
    }

    #[test]
    fn lengths_that_disagree_with_the_file_are_rewritten() {
        let good = file();
        let data_len = good.len() - 44;
        for (riff, data) in [
            (good.len() as u32 - 8 - 3, data_len as u32), // RIFF length a few bytes short
            (0, 0),                                       // never filled in
            (u32::MAX, u32::MAX),                         // streaming placeholders
            (good.len() as u32 - 8, data_len as u32 + 4000), // data past the end
        ] {
            let mut f = good.clone();
            f[4..8].copy_from_slice(&riff.to_le_bytes());
            f[40..44].copy_from_slice(&data.to_le_bytes());
            let r = repair_riff(f);
            assert_eq!(u32_at(&r, 4), Some(r.len() as u32 - 8), "{riff} {data}");
            assert_eq!(u32_at(&r, 40), Some(data_len as u32), "{riff} {data}");
            assert_eq!(&r[44..], &good[44..]);
        }
        // Half a frame at the end of a half-written stereo file is dropped.
        let mut f = encode_pcm16(&[vec![0.1; 10], vec![0.2; 10]], 16_000);
        f.push(7);
        f[40..44].copy_from_slice(&0u32.to_le_bytes());
        let r = repair_riff(f);
        assert_eq!(u32_at(&r, 40), Some(40));
    }

    #[test]
    fn unknown_and_unpadded_chunks_are_skipped() {
        let good = file();
        let mut f = good[..12].to_vec();
        f.extend_from_slice(b"LIST");
        f.extend_from_slice(&3u32.to_le_bytes());
        f.extend_from_slice(b"abc"); // odd size, pad byte missing
        f.extend_from_slice(&good[12..]);
        let r = repair_riff(f);
        assert_eq!(&r[12..16], b"fmt ");
        assert_eq!(&r[44..], &good[44..]);
    }
}
