//! Endpointing for live streams: turns per-frame voice probabilities into
//! utterances. Speech starts when enough of a short history is voiced (Riva's
//! start history/threshold), ends after a run of trailing silence (Deepgram's
//! endpointing ms), and is cut at a maximum length; while an utterance runs,
//! interim ticks tell the decoder when to refresh its rolling hypothesis.
//! Times are in samples of the stream, so callers can cut audio exactly.

use std::collections::VecDeque;

/// Endpointing settings. Durations are milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointConfig {
    /// Duration of one VAD frame (Silero: 32 ms at 16 kHz).
    pub frame_ms: u32,
    /// Window over which speech onset is judged.
    pub start_history_ms: u32,
    /// Fraction of voiced frames in that window that opens an utterance (0..1).
    pub start_threshold: f32,
    /// A frame is voiced when its probability is at least this.
    pub speech_probability: f32,
    /// A frame is silent when its probability is below this (hysteresis).
    pub silence_probability: f32,
    /// Trailing silence that closes an utterance.
    pub stop_history_ms: u32,
    /// Utterances are cut at this length even without silence.
    pub max_utterance_ms: u32,
    /// Audio kept before the detected onset, so first syllables are not clipped.
    pub pre_roll_ms: u32,
    /// Interval between interim ticks while speaking; 0 disables them.
    pub interim_interval_ms: u32,
    /// Turn detection off: an utterance starts with the first audio after
    /// the previous one and ends only at [`Endpointer::commit`] (or at
    /// `max_utterance_ms`), whatever the voice probabilities say.
    pub manual: bool,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            frame_ms: 32,
            start_history_ms: 256,
            start_threshold: 0.5,
            speech_probability: 0.5,
            silence_probability: 0.35,
            stop_history_ms: 800,
            max_utterance_ms: 30_000,
            pre_roll_ms: 320,
            interim_interval_ms: 1_000,
            manual: false,
        }
    }
}

/// Why an utterance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Trailing silence reached `stop_history_ms`.
    Silence,
    /// The utterance reached `max_utterance_ms`.
    MaxLength,
    /// The stream ended while speaking.
    StreamEnd,
    /// The client committed its audio so far.
    Committed,
}

/// What happened at a frame. Positions are sample offsets in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointEvent {
    /// An utterance began; its audio starts at `start` (pre-roll included).
    Started {
        /// Utterance number from 0.
        segment: u64,
        /// First sample of the utterance's audio.
        start: u64,
    },
    /// Time to refresh the interim hypothesis over `start..end`.
    Interim {
        /// Utterance number.
        segment: u64,
        /// First sample of the utterance.
        start: u64,
        /// Samples seen so far.
        end: u64,
    },
    /// The utterance is complete over `start..end` (trailing silence trimmed
    /// to what the pre-roll would keep).
    Ended {
        /// Utterance number.
        segment: u64,
        /// First sample.
        start: u64,
        /// One past the last sample.
        end: u64,
        /// Why.
        reason: EndReason,
    },
}

#[derive(Debug, Clone, Copy)]
enum State {
    Idle,
    Speaking {
        start: u64,
        last_voiced: u64,
        last_interim: u64,
    },
}

/// The endpointer of one stream.
#[derive(Debug, Clone)]
pub struct Endpointer {
    cfg: EndpointConfig,
    samples_per_frame: u64,
    history: VecDeque<bool>,
    history_len: usize,
    state: State,
    segment: u64,
    pos: u64,
}

impl Endpointer {
    /// An endpointer for a stream at `sample_rate`.
    pub fn new(cfg: EndpointConfig, sample_rate: u32) -> Self {
        let samples_per_frame = u64::from(sample_rate) * u64::from(cfg.frame_ms) / 1000;
        let history_len = (cfg.start_history_ms / cfg.frame_ms.max(1)).max(1) as usize;
        Self {
            cfg,
            samples_per_frame,
            history: VecDeque::with_capacity(history_len),
            history_len,
            state: State::Idle,
            segment: 0,
            pos: 0,
        }
    }

    fn ms(&self, ms: u32) -> u64 {
        self.samples_per_frame * u64::from(ms) / u64::from(self.cfg.frame_ms.max(1))
    }

    /// Whether an utterance is in progress.
    pub fn in_speech(&self) -> bool {
        matches!(self.state, State::Speaking { .. })
    }

    /// Feeds the voice probability of the next frame.
    pub fn push(&mut self, probability: f32) -> Option<EndpointEvent> {
        let frame_start = self.pos;
        self.pos += self.samples_per_frame;
        let voiced = probability >= self.cfg.speech_probability;
        if self.history.len() == self.history_len {
            self.history.pop_front();
        }
        self.history.push_back(voiced);
        match self.state {
            State::Idle => {
                if self.cfg.manual {
                    self.state = State::Speaking {
                        start: frame_start,
                        last_voiced: self.pos,
                        last_interim: self.pos,
                    };
                    return Some(EndpointEvent::Started {
                        segment: self.segment,
                        start: frame_start,
                    });
                }
                let n = self.history.iter().filter(|v| **v).count();
                let full = self.history.len() == self.history_len;
                if full && n as f32 >= self.cfg.start_threshold * self.history_len as f32 && voiced
                {
                    // Onset: the first voiced frame of the window that confirmed speech.
                    let first = self.history.iter().position(|v| *v).unwrap_or(0);
                    let onset =
                        self.pos - self.samples_per_frame * (self.history.len() - first) as u64;
                    let start = onset.saturating_sub(self.ms(self.cfg.pre_roll_ms));
                    self.state = State::Speaking {
                        start,
                        last_voiced: self.pos,
                        last_interim: self.pos,
                    };
                    return Some(EndpointEvent::Started {
                        segment: self.segment,
                        start,
                    });
                }
                None
            }
            State::Speaking {
                start,
                mut last_voiced,
                mut last_interim,
            } => {
                if probability >= self.cfg.silence_probability || self.cfg.manual {
                    last_voiced = self.pos;
                }
                let segment = self.segment;
                if self.pos - start >= self.ms(self.cfg.max_utterance_ms) {
                    return Some(self.end(start, self.pos, EndReason::MaxLength));
                }
                if self.pos - last_voiced >= self.ms(self.cfg.stop_history_ms) {
                    let end = (last_voiced + self.ms(self.cfg.pre_roll_ms))
                        .min(frame_start + self.samples_per_frame);
                    return Some(self.end(start, end, EndReason::Silence));
                }
                let mut event = None;
                if self.cfg.interim_interval_ms > 0
                    && self.pos - last_interim >= self.ms(self.cfg.interim_interval_ms)
                {
                    last_interim = self.pos;
                    event = Some(EndpointEvent::Interim {
                        segment,
                        start,
                        end: self.pos,
                    });
                }
                self.state = State::Speaking {
                    start,
                    last_voiced,
                    last_interim,
                };
                event
            }
        }
    }

    fn end(&mut self, start: u64, end: u64, reason: EndReason) -> EndpointEvent {
        let segment = self.segment;
        self.segment += 1;
        self.state = State::Idle;
        self.history.clear();
        EndpointEvent::Ended {
            segment,
            start,
            end,
            reason,
        }
    }

    /// Ends the stream, closing an utterance in progress.
    pub fn finish(&mut self) -> Option<EndpointEvent> {
        match self.state {
            State::Speaking { start, .. } => Some(self.end(start, self.pos, EndReason::StreamEnd)),
            State::Idle => None,
        }
    }

    /// Closes the utterance in progress at the audio seen so far; the
    /// stream goes on.
    pub fn commit(&mut self) -> Option<EndpointEvent> {
        match self.state {
            State::Speaking { start, .. } => Some(self.end(start, self.pos, EndReason::Committed)),
            State::Idle => None,
        }
    }

    /// Drops the utterance in progress: it never ends, and the next one
    /// gets the next number. Returns the dropped utterance's number.
    pub fn clear(&mut self) -> Option<u64> {
        match self.state {
            State::Speaking { .. } => {
                let segment = self.segment;
                self.segment += 1;
                self.state = State::Idle;
                self.history.clear();
                Some(segment)
            }
            State::Idle => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPF: u64 = 512; // samples per 32 ms frame at 16 kHz

    fn run(probs: &[f32], cfg: EndpointConfig) -> Vec<EndpointEvent> {
        let mut e = Endpointer::new(cfg, 16_000);
        let mut out: Vec<_> = probs.iter().filter_map(|p| e.push(*p)).collect();
        out.extend(e.finish());
        out
    }

    fn quiet() -> EndpointConfig {
        EndpointConfig {
            interim_interval_ms: 0,
            ..EndpointConfig::default()
        }
    }

    #[test]
    fn commit_ends_the_utterance_and_clear_drops_it() {
        let mut e = Endpointer::new(quiet(), 16_000);
        let mut ev: Vec<_> = (0..40).filter_map(|_| e.push(0.9)).collect();
        assert!(
            matches!(ev[..], [EndpointEvent::Started { segment: 0, .. }]),
            "{ev:?}"
        );
        assert_eq!(
            e.commit(),
            Some(EndpointEvent::Ended {
                segment: 0,
                start: ev
                    .pop()
                    .map(|x| match x {
                        EndpointEvent::Started { start, .. } => start,
                        _ => 0,
                    })
                    .unwrap(),
                end: 40 * SPF,
                reason: EndReason::Committed
            })
        );
        assert_eq!(e.commit(), None, "nothing in progress");
        let ev: Vec<_> = (0..40).filter_map(|_| e.push(0.9)).collect();
        assert!(
            matches!(ev[..], [EndpointEvent::Started { segment: 1, .. }]),
            "{ev:?}"
        );
        assert_eq!(e.clear(), Some(1));
        assert!(!e.in_speech());
        let ev: Vec<_> = (0..40).filter_map(|_| e.push(0.9)).collect();
        assert!(
            matches!(ev[..], [EndpointEvent::Started { segment: 2, .. }]),
            "{ev:?}"
        );
    }

    #[test]
    fn manual_turns_span_silence_and_end_at_commit() {
        let cfg = EndpointConfig {
            manual: true,
            ..quiet()
        };
        let mut e = Endpointer::new(cfg, 16_000);
        // Silence first, then speech, then 3 s of silence: one utterance from the first frame.
        let mut p = vec![0.0; 10];
        p.extend(vec![0.9; 30]);
        p.extend(vec![0.0; 94]);
        let ev: Vec<_> = p.iter().filter_map(|x| e.push(*x)).collect();
        assert_eq!(
            ev,
            vec![EndpointEvent::Started {
                segment: 0,
                start: 0
            }]
        );
        assert_eq!(
            e.commit(),
            Some(EndpointEvent::Ended {
                segment: 0,
                start: 0,
                end: 134 * SPF,
                reason: EndReason::Committed
            })
        );
        // The next utterance starts at the next frame, and length still cuts it.
        let ev: Vec<_> = (0..940).filter_map(|_| e.push(0.0)).collect();
        assert_eq!(
            ev[0],
            EndpointEvent::Started {
                segment: 1,
                start: 134 * SPF
            }
        );
        assert!(
            matches!(
                ev[1],
                EndpointEvent::Ended {
                    segment: 1,
                    reason: EndReason::MaxLength,
                    ..
                }
            ),
            "{ev:?}"
        );
    }

    #[test]
    fn one_utterance_between_silences() {
        // 1 s silence, 2 s speech, 1.5 s silence.
        let mut p = vec![0.05; 31];
        p.extend(vec![0.9; 62]);
        p.extend(vec![0.05; 47]);
        let ev = run(&p, quiet());
        assert_eq!(ev.len(), 2, "{ev:?}");
        let EndpointEvent::Started { segment: 0, start } = ev[0] else {
            panic!("{ev:?}")
        };
        // Onset at frame 31 (confirmed once half the 8-frame history is voiced); pre-roll 10 frames.
        assert_eq!(start, (31 - 10) * SPF);
        let EndpointEvent::Ended {
            segment: 0,
            start: s,
            end,
            reason,
        } = ev[1]
        else {
            panic!("{ev:?}")
        };
        assert_eq!((s, reason), (start, EndReason::Silence));
        // Speech ends at frame 93; the end keeps the pre-roll's worth of trailing audio.
        assert_eq!(end, (93 + 10) * SPF);
    }

    #[test]
    fn short_blips_do_not_start_speech() {
        let mut p = vec![0.05; 20];
        p.extend([0.9, 0.9, 0.05, 0.9, 0.05, 0.05, 0.05, 0.05, 0.05]);
        p.extend(vec![0.05; 20]);
        assert!(run(&p, quiet()).is_empty());
    }

    #[test]
    fn hysteresis_keeps_soft_speech_in_the_utterance() {
        // Probabilities that dip to 0.4 (above the 0.35 silence floor) do not end speech.
        let mut p = vec![0.9; 20];
        p.extend(vec![0.4; 40]);
        p.extend(vec![0.9; 10]);
        let ev = run(&p, quiet());
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert!(matches!(
            ev[1],
            EndpointEvent::Ended {
                reason: EndReason::StreamEnd,
                ..
            }
        ));
    }

    #[test]
    fn long_speech_is_cut_and_interims_tick() {
        let cfg = EndpointConfig {
            max_utterance_ms: 3_200,
            interim_interval_ms: 1_024,
            ..EndpointConfig::default()
        };
        let ev = run(&vec![0.9; 200], cfg);
        let ends: Vec<_> = ev
            .iter()
            .filter(|e| matches!(e, EndpointEvent::Ended { .. }))
            .collect();
        assert!(ends.len() >= 2, "{ev:?}");
        assert!(matches!(
            ends[0],
            EndpointEvent::Ended {
                reason: EndReason::MaxLength,
                ..
            }
        ));
        let interims = ev
            .iter()
            .filter(|e| matches!(e, EndpointEvent::Interim { segment: 0, .. }))
            .count();
        assert_eq!(interims, 2, "{ev:?}");
        // Segments are numbered in order.
        let ids: Vec<u64> = ev
            .iter()
            .filter_map(|e| match e {
                EndpointEvent::Started { segment, .. } => Some(*segment),
                _ => None,
            })
            .collect();
        assert_eq!(ids, (0..ids.len() as u64).collect::<Vec<_>>());
    }
}
