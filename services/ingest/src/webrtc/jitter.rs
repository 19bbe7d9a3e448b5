//! The reordering buffer between RTP packets and the Opus decoder.

use axum::body::Bytes;
use std::collections::BTreeMap;

/// What to decode next.
#[derive(Debug, PartialEq)]
pub(crate) enum Frame {
    Packet(Bytes),
    /// A lost packet, recovered from the in-band FEC of the one after it.
    Recover(Bytes),
    /// A lost packet with nothing to recover it from: concealed.
    Conceal,
}

/// Packets held back for reordering (20 ms each: 60 ms of jitter).
const JITTER_DEPTH: usize = 3;
/// The longest gap concealed; longer ones (a stalled network) are skipped.
const MAX_CONCEAL: u64 = 25;

/// A small reordering buffer of RTP packets by sequence number: packets come
/// out in order; a gap still open when [`JITTER_DEPTH`] later packets have
/// arrived counts as lost.
#[derive(Debug, Default)]
pub(crate) struct Jitter {
    /// Next sequence number to play, extended past 16 bits.
    next: Option<u64>,
    highest: u64,
    held: BTreeMap<u64, Bytes>,
}

impl Jitter {
    fn extend(&self, seq: u16) -> u64 {
        let Some(_) = self.next else {
            return u64::from(seq) + (1 << 16);
        };
        // The extended number nearest the highest one seen.
        let base = self.highest & !0xffff;
        let cands = [
            base.wrapping_sub(1 << 16) | u64::from(seq),
            base | u64::from(seq),
            (base + (1 << 16)) | u64::from(seq),
        ];
        cands
            .into_iter()
            .min_by_key(|c| c.abs_diff(self.highest))
            .unwrap_or(base | u64::from(seq))
    }

    pub(crate) fn push(&mut self, seq: u16, payload: Bytes) -> Vec<Frame> {
        let ext = self.extend(seq);
        let next = *self.next.get_or_insert(ext);
        if ext < next {
            return Vec::new(); // too late: already played or concealed
        }
        self.highest = self.highest.max(ext);
        self.held.insert(ext, payload);
        let mut out = Vec::new();
        while let Some((&first, _)) = self.held.first_key_value() {
            let next = self.next.unwrap_or(first);
            if first == next {
                if let Some(p) = self.held.remove(&first) {
                    out.push(Frame::Packet(p));
                }
                self.next = Some(first + 1);
            } else if self.held.len() > JITTER_DEPTH {
                let gap = first - next;
                if gap > MAX_CONCEAL {
                    self.next = Some(first);
                    continue;
                }
                for _ in 0..gap - 1 {
                    out.push(Frame::Conceal);
                }
                out.push(Frame::Recover(self.held[&first].clone()));
                self.next = Some(first);
            } else {
                break;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(n: u8) -> Bytes {
        Bytes::from(vec![n])
    }

    #[test]
    fn jitter_reorders_recovers_and_conceals() {
        let mut j = Jitter::default();
        assert_eq!(j.push(10, b(10)), vec![Frame::Packet(b(10))]);
        // 12 before 11: held, then both in order.
        assert_eq!(j.push(12, b(12)), vec![]);
        assert_eq!(
            j.push(11, b(11)),
            vec![Frame::Packet(b(11)), Frame::Packet(b(12))]
        );
        // 13 and 14 lost: once three later packets wait, 13 is concealed and
        // 14 recovered from 15's FEC.
        assert_eq!(j.push(15, b(15)), vec![]);
        assert_eq!(j.push(16, b(16)), vec![]);
        assert_eq!(j.push(17, b(17)), vec![]);
        assert_eq!(
            j.push(18, b(18)),
            vec![
                Frame::Conceal,
                Frame::Recover(b(15)),
                Frame::Packet(b(15)),
                Frame::Packet(b(16)),
                Frame::Packet(b(17)),
                Frame::Packet(b(18)),
            ]
        );
        // A packet that comes after its gap was concealed is dropped.
        assert_eq!(j.push(13, b(13)), vec![]);
        // Sequence numbers wrap.
        let mut j = Jitter::default();
        assert_eq!(j.push(65_535, b(1)), vec![Frame::Packet(b(1))]);
        assert_eq!(j.push(0, b(2)), vec![Frame::Packet(b(2))]);
        assert_eq!(j.push(1, b(3)), vec![Frame::Packet(b(3))]);
    }
}
