//! The fleet's wire contract.
//!
//! `speech` is the public API (`nexus.speech.v1`): recognition, speech and text
//! translation, synthesis, batch jobs and the model list. `pipeline` holds the
//! internal messages that stages exchange over Redis Streams
//! (`nexus.pipeline.v1`). Both are generated at build time from `proto/nexus`
//! by protox, so a fresh machine needs no protoc.

#![allow(missing_docs, clippy::all)]

/// Generated modules, nested as the proto packages are so cross-package paths resolve.
pub mod nexus {
    /// `nexus.speech.*`
    pub mod speech {
        /// `nexus.speech.v1`
        pub mod v1 {
            tonic::include_proto!("nexus.speech.v1");
        }
    }
    /// `nexus.pipeline.*`
    pub mod pipeline {
        /// `nexus.pipeline.v1`
        pub mod v1 {
            tonic::include_proto!("nexus.pipeline.v1");
        }
    }
}

/// `nexus.pipeline.v1`: messages carried between stages.
pub use nexus::pipeline::v1 as pipeline;
/// `nexus.speech.v1`: the public gRPC API.
pub use nexus::speech::v1 as speech;

/// Encoded `FileDescriptorSet` of every file above, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/nexus_descriptor.bin"));

/// Fully qualified names of the public services, as reflection lists them.
pub const PUBLIC_SERVICES: &[&str] = &[
    "nexus.speech.v1.SpeechRecognition",
    "nexus.speech.v1.Translation",
    "nexus.speech.v1.SpeechSynthesis",
    "nexus.speech.v1.TranscriptionJobs",
    "nexus.speech.v1.Models",
];

/// Transcript formats on the wire: `OutputFormat` is the gRPC spelling of
/// [`nexus_transcript::Format`]; unspecified means JSON.
mod format {
    use super::speech::OutputFormat;
    use nexus_transcript::Format;

    impl From<Format> for OutputFormat {
        fn from(f: Format) -> Self {
            match f {
                Format::Text => Self::Text,
                Format::Json => Self::Json,
                Format::VerboseJson => Self::VerboseJson,
                Format::Srt => Self::Srt,
                Format::Vtt => Self::Vtt,
            }
        }
    }

    impl From<OutputFormat> for Format {
        fn from(f: OutputFormat) -> Self {
            match f {
                OutputFormat::Text => Self::Text,
                OutputFormat::Json | OutputFormat::Unspecified => Self::Json,
                OutputFormat::VerboseJson => Self::VerboseJson,
                OutputFormat::Srt => Self::Srt,
                OutputFormat::Vtt => Self::Vtt,
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn every_format_crosses_the_wire_and_back() {
            use Format::*;
            for f in [Text, Json, VerboseJson, Srt, Vtt] {
                assert_eq!(Format::from(OutputFormat::from(f)), f);
            }
            assert_eq!(Format::from(OutputFormat::Unspecified), Json);
        }
    }
}

/// A recognition config's task, set from an optional target language.
mod task {
    use super::speech::{RecognitionConfig, Task, TranslationConfig};

    impl RecognitionConfig {
        /// Translation into `target` (with the fleet's default text model)
        /// when one is given and not empty; transcription otherwise.
        pub fn translated_into(self, target: Option<&str>) -> Self {
            let target = target.filter(|t| !t.is_empty());
            Self {
                task: match target {
                    Some(_) => Task::Translate as i32,
                    None => Task::Transcribe as i32,
                },
                translation: target.map(|t| TranslationConfig {
                    target_language: t.to_owned(),
                    ..Default::default()
                }),
                ..self
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_target_makes_a_translation_and_none_or_empty_a_transcription() {
            let c = RecognitionConfig::default().translated_into(Some("de"));
            assert_eq!(c.task, Task::Translate as i32);
            assert_eq!(c.translation.unwrap().target_language, "de");
            for t in [None, Some("")] {
                let c = RecognitionConfig::default().translated_into(t);
                assert_eq!(c.task, Task::Transcribe as i32);
                assert_eq!(c.translation, None);
            }
        }
    }
}
