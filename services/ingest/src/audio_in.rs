//! A live stream's bytes to 16 kHz mono, whatever the declared encoding.

use nexus_audio::{
    AudioLimits, MODEL_SAMPLE_RATE, OggOpusStream, OpusPacketDecoder, PcmDecoder, PcmSpec,
    SampleFormat, StreamResampler, downmix,
};
use nexus_proto::speech::{AudioEncoding, AudioFormat};

enum Source {
    Pcm(PcmDecoder, usize),
    Ogg(OggOpusStream),
    Opus(OpusPacketDecoder),
}

/// Decoder, downmixer and resampler of one stream.
pub struct AudioIn {
    source: Source,
    rate: u32,
    resampler: Option<StreamResampler>,
}

impl std::fmt::Debug for AudioIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AudioIn").field("rate", &self.rate).finish()
    }
}

fn interleaved_to_mono(x: &[f32], channels: usize) -> Vec<f32> {
    if channels <= 1 {
        return x.to_vec();
    }
    x.chunks_exact(channels)
        .map(|f| f.iter().sum::<f32>() / channels as f32)
        .collect()
}

/// The sample format and rate of raw-sample audio (LINEAR_PCM_*, G711_*);
/// the error names what is missing.
pub(crate) fn raw_samples(fmt: &AudioFormat) -> Result<(SampleFormat, u32), String> {
    let enc = AudioEncoding::try_from(fmt.encoding).unwrap_or(AudioEncoding::Unspecified);
    let format = match enc {
        AudioEncoding::LinearPcmS16le => SampleFormat::S16Le,
        AudioEncoding::LinearPcmF32le => SampleFormat::F32Le,
        AudioEncoding::G711Ulaw => SampleFormat::MuLaw,
        AudioEncoding::G711Alaw => SampleFormat::ALaw,
        _ => return Err(format!("{} is not raw samples", enc.as_str_name())),
    };
    let rate = match (fmt.sample_rate_hz, format) {
        (0, SampleFormat::MuLaw | SampleFormat::ALaw) => 8_000,
        (0, _) => {
            return Err(format!(
                "audio_format.sample_rate_hz is required for {} audio",
                enc.as_str_name()
            ));
        }
        (r, _) => r,
    };
    Ok((format, rate))
}

impl AudioIn {
    /// Checks a stream's declared format; the error says what to send instead.
    pub fn new(fmt: &AudioFormat, limits: &AudioLimits) -> Result<Self, String> {
        let channels = fmt.channels.max(1);
        let enc = AudioEncoding::try_from(fmt.encoding).unwrap_or(AudioEncoding::Unspecified);
        let (source, rate) = match enc {
            AudioEncoding::LinearPcmS16le
            | AudioEncoding::LinearPcmF32le
            | AudioEncoding::G711Ulaw
            | AudioEncoding::G711Alaw => {
                let (format, sample_rate) = raw_samples(fmt)?;
                let spec = PcmSpec {
                    format,
                    sample_rate,
                    channels,
                };
                let dec = PcmDecoder::new(spec, limits.clone()).map_err(|e| e.to_string())?;
                (Source::Pcm(dec, channels as usize), sample_rate)
            }
            AudioEncoding::OggOpus => (Source::Ogg(OggOpusStream::new()), 48_000),
            AudioEncoding::OpusPackets => {
                let dec = OpusPacketDecoder::new(channels).map_err(|e| e.to_string())?;
                (Source::Opus(dec), 48_000)
            }
            AudioEncoding::Container | AudioEncoding::Unspecified => {
                return Err(format!(
                    "audio_format.encoding {} cannot be streamed; use LINEAR_PCM_S16LE, LINEAR_PCM_F32LE, OGG_OPUS or OPUS_PACKETS (whole files go to Recognize)",
                    enc.as_str_name()
                ));
            }
        };
        let resampler = if rate == MODEL_SAMPLE_RATE {
            None
        } else {
            Some(StreamResampler::new(rate, MODEL_SAMPLE_RATE).map_err(|e| e.to_string())?)
        };
        Ok(Self {
            source,
            rate,
            resampler,
        })
    }

    /// 16 kHz mono samples completed by `bytes`.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<f32>, String> {
        let mono = match &mut self.source {
            Source::Pcm(dec, ch) => {
                let mut planar = vec![Vec::new(); *ch];
                dec.push(bytes, &mut planar).map_err(|e| e.to_string())?;
                if *ch == 1 {
                    planar.pop().unwrap_or_default()
                } else {
                    downmix(&planar)
                }
            }
            Source::Ogg(s) => {
                let x = s.push(bytes).map_err(|e| e.to_string())?;
                interleaved_to_mono(&x, s.channels().unwrap_or(1))
            }
            Source::Opus(d) => {
                let x = d.decode(bytes).map_err(|e| e.to_string())?;
                interleaved_to_mono(&x, d.channels())
            }
        };
        self.resample(&mono)
    }

    fn resample(&mut self, mono: &[f32]) -> Result<Vec<f32>, String> {
        match &mut self.resampler {
            None => Ok(mono.to_vec()),
            Some(r) => {
                let mut out = Vec::new();
                r.push(mono, &mut out).map_err(|e| e.to_string())?;
                Ok(out)
            }
        }
    }

    /// What the resampler still holds, at the end of the stream.
    pub fn finish(&mut self) -> Result<Vec<f32>, String> {
        match &mut self.resampler {
            None => Ok(Vec::new()),
            Some(r) => {
                let mut out = Vec::new();
                r.finish(&mut out).map_err(|e| e.to_string())?;
                Ok(out)
            }
        }
    }
}
