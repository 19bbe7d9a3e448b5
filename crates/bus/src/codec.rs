//! Pipeline messages as stream entries: a type field and the protobuf payload.
//! The type travels with the entry so a stage that reads the wrong stream, or an
//! old entry after an upgrade, fails loudly instead of decoding garbage.

use std::collections::HashMap;

use nexus_proto::pipeline;

/// Entry field naming the message type.
pub const FIELD_TYPE: &str = "t";
/// Entry field holding the encoded message.
pub const FIELD_PAYLOAD: &str = "p";

/// Transport errors.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// An id or prefix with characters that keys cannot hold.
    #[error("invalid id {0:?}: use 1-64 letters, digits, '-' or '_'")]
    InvalidId(String),
    /// A key prefix with characters or length that keys cannot hold.
    #[error("invalid key prefix {0:?}: use 1-32 letters, digits, '-', '_' or '.'")]
    InvalidPrefix(String),
    /// A stream id that is not `ms-seq`.
    #[error("invalid stream entry id {0:?}; expected MS-SEQ")]
    InvalidEntryId(String),
    /// A work stream's consumers are too far behind: retry later.
    #[error("stream {stream} is full: group {group} has {backlog} entries not yet acknowledged")]
    Full {
        /// The stream.
        stream: String,
        /// The slowest group.
        group: String,
        /// Its backlog.
        backlog: usize,
    },
    /// The transport is unreachable or failed; retry later.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// The consumer group does not exist.
    #[error("no consumer group {0}")]
    NoGroup(String),
    /// An entry lacks a field.
    #[error("stream entry has no {0:?} field")]
    MissingField(&'static str),
    /// An entry holds another message type than the reader expects.
    #[error("stream entry holds {found:?}, expected {expected:?}")]
    WrongType {
        /// What the reader wanted.
        expected: &'static str,
        /// What the entry says it is.
        found: String,
    },
    /// The payload does not decode.
    #[error("stream entry payload of {ty} is corrupt: {source}")]
    Corrupt {
        /// Declared type.
        ty: &'static str,
        /// Decoder's complaint.
        source: prost::DecodeError,
    },
}

/// A message that travels on a stream, with its stable type name.
pub trait StreamMessage: prost::Message + Default {
    /// Type name written into every entry.
    const TYPE: &'static str;
}

macro_rules! stream_message {
    ($($ty:ident),* $(,)?) => {
        $(impl StreamMessage for pipeline::$ty {
            const TYPE: &'static str = concat!("nexus.pipeline.v1.", stringify!($ty));
        })*
    };
}
stream_message!(
    SessionEvent,
    AudioSegment,
    EncodedSegment,
    DecodeResult,
    SpeechCodes,
    TranslateTask,
    TranslateDone,
    SynthesisTask,
    SynthesisChunk,
);

/// The fields of an entry carrying `msg`.
pub fn encode<M: StreamMessage>(msg: &M) -> [(&'static str, Vec<u8>); 2] {
    [
        (FIELD_TYPE, M::TYPE.as_bytes().to_vec()),
        (FIELD_PAYLOAD, msg.encode_to_vec()),
    ]
}

/// The message in an entry's fields.
pub fn decode<M: StreamMessage>(fields: &HashMap<String, Vec<u8>>) -> Result<M, BusError> {
    let ty = fields
        .get(FIELD_TYPE)
        .ok_or(BusError::MissingField(FIELD_TYPE))?;
    if ty.as_slice() != M::TYPE.as_bytes() {
        return Err(BusError::WrongType {
            expected: M::TYPE,
            found: String::from_utf8_lossy(ty).into_owned(),
        });
    }
    let payload = fields
        .get(FIELD_PAYLOAD)
        .ok_or(BusError::MissingField(FIELD_PAYLOAD))?;
    M::decode(payload.as_slice()).map_err(|source| BusError::Corrupt {
        ty: M::TYPE,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_proto::pipeline::{AudioSegment, DecodeResult, Envelope, TraceContext};

    fn fields<M: StreamMessage>(m: &M) -> HashMap<String, Vec<u8>> {
        encode(m)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
    }

    fn segment() -> AudioSegment {
        AudioSegment {
            envelope: Some(Envelope {
                session_id: "s1".into(),
                segment_id: 3,
                sequence: 17,
                revision: 2,
                trace: Some(TraceContext {
                    traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
                    tracestate: String::new(),
                }),
                emitted_unix_ms: 1_700_000_000_000,
                tenant: "acme".into(),
                live: true,
            }),
            start_ms: 1000,
            end_ms: 2500,
            sample_rate_hz: 16_000,
            pcm_f32le: vec![0u8, 0, 128, 63].into(),
            is_final: true,
            ..Default::default()
        }
    }

    #[test]
    fn roundtrip_keeps_ids_and_trace() {
        let m = segment();
        let back: AudioSegment = decode(&fields(&m)).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn wrong_type_missing_and_corrupt_fail_loudly() {
        let f = fields(&segment());
        let e = decode::<DecodeResult>(&f).unwrap_err();
        assert_eq!(
            e.to_string(),
            "stream entry holds \"nexus.pipeline.v1.AudioSegment\", expected \"nexus.pipeline.v1.DecodeResult\""
        );
        let mut g = f.clone();
        g.remove(FIELD_PAYLOAD);
        assert!(matches!(
            decode::<AudioSegment>(&g),
            Err(BusError::MissingField("p"))
        ));
        let mut g = f.clone();
        g.remove(FIELD_TYPE);
        assert!(matches!(
            decode::<AudioSegment>(&g),
            Err(BusError::MissingField("t"))
        ));
        let mut g = f;
        g.insert(FIELD_PAYLOAD.into(), vec![0x0a, 0xff, 0xff]);
        assert!(matches!(
            decode::<AudioSegment>(&g),
            Err(BusError::Corrupt { .. })
        ));
    }
}
