//! The `TranscriptionJob` custom resource: one recording to transcribe (or
//! translate) in batch, and what became of it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use nexus_proto::pipeline::JobSpec;
use nexus_proto::speech::{
    OutputFormat, RecognitionConfig, SpeakerDiarizationConfig, Task, TranslationConfig,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the operator's resources.
pub const GROUP: &str = "speech.nexus-fleet.dev";

/// What to transcribe and where the transcript goes.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "speech.nexus-fleet.dev",
    version = "v1alpha1",
    kind = "TranscriptionJob",
    plural = "transcriptionjobs",
    shortname = "tj",
    namespaced,
    status = "TranscriptionJobStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Percent","type":"number","jsonPath":".status.percent"}"#,
    printcolumn = r#"{"name":"Attempt","type":"integer","jsonPath":".status.attempt"}"#,
    printcolumn = r#"{"name":"Result","type":"string","jsonPath":".status.result"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TranscriptionJobSpec {
    /// The recording: a `file://` path relative to the ingest replicas'
    /// `--file-root` (a volume they share), e.g. `file:///meetings/2026-11-24.opus`.
    pub input: String,
    /// Speech model; empty picks the fleet's default.
    #[serde(default)]
    pub model: String,
    /// Spoken language (ISO 639-1); empty detects it.
    #[serde(default)]
    pub language: String,
    /// Transcribe in the spoken language, or translate.
    #[serde(default)]
    pub task: JobTask,
    /// Target language of `Translate` (ISO 639-1).
    #[serde(default)]
    pub target_language: String,
    /// Transcript formats to produce; JSON when empty.
    #[serde(default)]
    pub formats: Vec<Format>,
    /// Where the transcript goes besides the fleet's job store.
    #[serde(default)]
    pub output: Option<JobOutputTarget>,
    /// Jobs with a positive priority are taken before all others.
    #[serde(default)]
    pub priority: i32,
    /// The job fails if it has not finished by then (RFC 3339).
    #[serde(default)]
    pub deadline: Option<Time>,
    /// How many times a failed run is submitted again before the job fails.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Labels copied onto the fleet's job record.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Say who spoke when: segments and words labelled `Speaker 1`, ...
    /// (WebVTT voices, `Speaker N:` prefixes in text and SubRip). Present
    /// (even `{}`) turns it on; the counts bound the speakers found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diarization: Option<JobDiarization>,
}

/// Speaker counts of a diarized job; unset counts are found from the audio.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobDiarization {
    /// At least this many speakers (1 to 32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_speakers: Option<u32>,
    /// At most this many speakers (1 to 32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_speakers: Option<u32>,
}

fn default_retries() -> u32 {
    1
}

/// Transcribe or translate.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum JobTask {
    /// Text in the spoken language.
    #[default]
    Transcribe,
    /// Text in `targetLanguage`.
    Translate,
}

/// A transcript format (`text`, `json`, `verboseJson`, `srt`, `vtt`).
pub use nexus_transcript::Format;

/// Where a finished transcript is written.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobOutputTarget {
    /// A ConfigMap in the job's namespace, owned by the job (deleted with it),
    /// one key per format. Transcripts over 900 kB stay in the job store only.
    #[serde(default)]
    pub config_map: Option<String>,
}

/// What became of a job.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TranscriptionJobStatus {
    /// Where the job is.
    #[serde(default)]
    pub phase: Phase,
    /// The fleet's id of the current run (`GetJob`/`GetJobResult` take it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Runs submitted so far (1 for the first).
    #[serde(default)]
    pub attempt: u32,
    /// Audio processed, 0–100.
    #[serde(default)]
    pub percent: f64,
    /// Length of the recording in seconds, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio_seconds: Option<f64>,
    /// Where the transcript is: `configmap/NAME` or `job/JOB_ID` (the fleet's job store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// Machine-readable reason of the last change (`InvalidSpec`, `Retrying`, `RunFailed` ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail of the last change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `Accepted`, `Running`, `Complete` and `Failed`, Kubernetes-style.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Where a job is.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Seen, not yet submitted.
    #[default]
    Pending,
    /// Submitted, waiting for a job runner or decoder capacity.
    Queued,
    /// Being transcribed.
    Running,
    /// Done; the transcript is at `result`.
    Succeeded,
    /// Given up; `reason` and `message` say why.
    Failed,
    /// Cancelled through the fleet's API.
    Cancelled,
}

impl Phase {
    /// Whether nothing more will happen to the job.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// The name the status shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Queued => "Queued",
            Self::Running => "Running",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::Cancelled => "Cancelled",
        }
    }
}

impl TranscriptionJobSpec {
    /// Checks what can be checked without the fleet (the runner checks models
    /// and languages against what it serves, and fails the job naming them).
    pub fn validate(&self, now_ms: u64) -> Result<(), String> {
        let path = self.input.strip_prefix("file://").ok_or_else(|| {
            format!(
                "input {:?} is not a file:// location; give a path under the ingest replicas' file root, e.g. file:///meetings/a.wav",
                self.input
            )
        })?;
        if path.trim_matches('/').is_empty() {
            return Err(format!("input {:?} names no file", self.input));
        }
        if path.split('/').any(|p| p == "..") {
            return Err(format!(
                "input {:?} climbs out of the file root with '..'",
                self.input
            ));
        }
        match self.task {
            JobTask::Translate if self.target_language.is_empty() => {
                return Err("task Translate needs targetLanguage".into());
            }
            JobTask::Transcribe if !self.target_language.is_empty() => {
                return Err(format!(
                    "targetLanguage {:?} is set but task is Transcribe; set task: Translate",
                    self.target_language
                ));
            }
            _ => {}
        }
        for (what, code) in [
            ("language", &self.language),
            ("targetLanguage", &self.target_language),
        ] {
            let ok = code.is_empty()
                || code == "auto"
                || (code.len() <= 3 && code.chars().all(|c| c.is_ascii_lowercase()));
            if !ok {
                return Err(format!(
                    "{what} {code:?} is not an ISO 639-1 code such as en, de, zh"
                ));
            }
        }
        if let Some(d) = self.deadline_ms()
            && d <= now_ms
        {
            return Err(format!(
                "deadline {} has passed",
                self.deadline
                    .as_ref()
                    .map(|t| t.0.to_string())
                    .unwrap_or_default()
            ));
        }
        if let Some(d) = &self.diarization {
            let (lo, hi) = (d.min_speakers.unwrap_or(1), d.max_speakers.unwrap_or(32));
            for (what, v) in [
                ("minSpeakers", d.min_speakers),
                ("maxSpeakers", d.max_speakers),
            ] {
                if let Some(v) = v
                    && !(1..=32).contains(&v)
                {
                    return Err(format!("diarization.{what} is {v}; it must be 1 to 32"));
                }
            }
            if lo > hi {
                return Err(format!(
                    "diarization.minSpeakers ({lo}) is above diarization.maxSpeakers ({hi})"
                ));
            }
        }
        if let Some(name) = self.output.as_ref().and_then(|o| o.config_map.as_deref())
            && !dns_subdomain(name)
        {
            return Err(format!(
                "output.configMap {name:?} is not a valid ConfigMap name (lower-case letters, digits, '-' and '.', at most 253)"
            ));
        }
        Ok(())
    }

    fn deadline_ms(&self) -> Option<u64> {
        self.deadline
            .as_ref()
            .map(|t| u64::try_from(t.0.as_millisecond()).unwrap_or(0))
    }

    /// The formats asked for, JSON when none.
    pub fn formats(&self) -> Vec<Format> {
        let mut out: Vec<Format> = Vec::new();
        for f in &self.formats {
            if !out.contains(f) {
                out.push(*f);
            }
        }
        if out.is_empty() {
            out.push(Format::Json);
        }
        out
    }

    /// The fleet's job spec for one run.
    pub fn job_spec(&self, job_id: &str, tenant: &str) -> JobSpec {
        JobSpec {
            job_id: job_id.to_owned(),
            tenant: tenant.to_owned(),
            config: Some(RecognitionConfig {
                model: self.model.clone(),
                language: self.language.clone(),
                task: match self.task {
                    JobTask::Transcribe => Task::Transcribe,
                    JobTask::Translate => Task::Translate,
                } as i32,
                translation: (!self.target_language.is_empty()).then(|| TranslationConfig {
                    target_language: self.target_language.clone(),
                    model: String::new(),
                }),
                enable_word_time_offsets: true,
                diarization: self.diarization.map(|d| SpeakerDiarizationConfig {
                    enable: true,
                    min_speakers: d.min_speakers.unwrap_or(0),
                    max_speakers: d.max_speakers.unwrap_or(0),
                }),
                ..Default::default()
            }),
            uri: self.input.clone(),
            output_formats: self
                .formats()
                .into_iter()
                .map(|f| OutputFormat::from(f) as i32)
                .collect(),
            deadline_unix_ms: self.deadline_ms().unwrap_or(0),
        }
    }
}

fn dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(input: &str) -> TranscriptionJobSpec {
        TranscriptionJobSpec {
            input: input.into(),
            ..Default::default()
        }
    }

    #[test]
    fn validation_names_the_problem() {
        let cases: &[(TranscriptionJobSpec, Option<&str>)] = &[
            (spec("file:///m/a.wav"), None),
            (spec("s3://bucket/a.wav"), Some("not a file:// location")),
            (spec("file:///"), Some("names no file")),
            (spec("file:///../etc/passwd"), Some("'..'")),
            (
                TranscriptionJobSpec {
                    task: JobTask::Translate,
                    ..spec("file:///a.wav")
                },
                Some("needs targetLanguage"),
            ),
            (
                TranscriptionJobSpec {
                    target_language: "de".into(),
                    ..spec("file:///a.wav")
                },
                Some("set task: Translate"),
            ),
            (
                TranscriptionJobSpec {
                    language: "English".into(),
                    ..spec("file:///a.wav")
                },
                Some("language \"English\""),
            ),
            (
                TranscriptionJobSpec {
                    output: Some(JobOutputTarget {
                        config_map: Some("Bad_Name".into()),
                    }),
                    ..spec("file:///a.wav")
                },
                Some("output.configMap"),
            ),
        ];
        for (s, want) in cases {
            match (s.validate(0), want) {
                (Ok(()), None) => {}
                (Err(e), Some(w)) => assert!(e.contains(w), "{e:?} lacks {w:?}"),
                (got, want) => panic!("{s:?}: got {got:?}, wanted {want:?}"),
            }
        }
    }

    #[test]
    fn the_job_spec_carries_task_formats_and_deadline() {
        let s = TranscriptionJobSpec {
            input: "file:///a.wav".into(),
            task: JobTask::Translate,
            target_language: "de".into(),
            formats: vec![Format::Srt, Format::Srt, Format::Text],
            deadline: Some(Time("2030-01-01T00:00:00Z".parse().expect("a time"))),
            ..Default::default()
        };
        assert!(s.validate(0).is_ok());
        let j = s.job_spec("u-1", "k8s:ns");
        let rc = j.config.expect("a config");
        assert_eq!(rc.task, Task::Translate as i32);
        assert_eq!(rc.translation.expect("a translation").target_language, "de");
        assert_eq!(
            j.output_formats,
            vec![OutputFormat::Srt as i32, OutputFormat::Text as i32]
        );
        assert_eq!(j.deadline_unix_ms, 1_893_456_000_000);
        assert!(
            s.validate(1_893_456_000_001)
                .is_err_and(|e| e.contains("has passed"))
        );
    }

    #[test]
    fn diarization_is_checked_and_carried() {
        let with = |min, max| TranscriptionJobSpec {
            diarization: Some(JobDiarization {
                min_speakers: min,
                max_speakers: max,
            }),
            ..spec("file:///m/a.wav")
        };
        assert!(with(None, None).validate(0).is_ok());
        assert!(
            with(Some(0), None)
                .validate(0)
                .is_err_and(|e| e.contains("diarization.minSpeakers is 0; it must be 1 to 32"))
        );
        assert!(
            with(Some(3), Some(2))
                .validate(0)
                .is_err_and(|e| e.contains("is above diarization.maxSpeakers"))
        );
        let rc = with(Some(2), Some(4))
            .job_spec("u-1", "k8s:ns")
            .config
            .expect("a config");
        assert_eq!(
            rc.diarization,
            Some(SpeakerDiarizationConfig {
                enable: true,
                min_speakers: 2,
                max_speakers: 4
            })
        );
        let rc = spec("file:///m/a.wav")
            .job_spec("u", "t")
            .config
            .expect("a config");
        assert_eq!(rc.diarization, None);
        // The CRD's schema spells it the Kubernetes way.
        let v: serde_json::Value =
            serde_json::from_str(r#"{"input":"file:///a.wav","diarization":{"minSpeakers":2}}"#)
                .expect("json");
        let s: TranscriptionJobSpec = serde_json::from_value(v).expect("a spec");
        assert_eq!(s.diarization.and_then(|d| d.min_speakers), Some(2));
    }
}
