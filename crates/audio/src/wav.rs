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
