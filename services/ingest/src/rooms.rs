//! Caption rooms: the live captions of everyone publishing into a room (a
//! meeting, a broadcast), for the participants' data channels, for viewers on
//! server-sent events, and as WebVTT and SRT subtitles.
//!
//! A room lives on the ingest replica its participants signal to; its cue list
//! is kept in memory, bounded, for the subtitle endpoints, and dropped a while
//! after the last participant and viewer left.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nexus_transcript::{cue_text, cue_timestamp};
use serde::Serialize;
use tokio::sync::broadcast;

/// Events a room fans out; slow subscribers lose the oldest ones, not the
/// room its other subscribers.
const EVENTS: usize = 512;
/// Finals kept per room for the subtitle endpoints and late viewers.
const MAX_CUES: usize = 20_000;
/// Finals replayed to a viewer that joins late.
pub(crate) const REPLAY: usize = 50;

/// A word with its time in the room's clock, ms.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Word {
    pub(crate) word: String,
    pub(crate) start_ms: u64,
    pub(crate) end_ms: u64,
    /// Who of the participant's microphone said it, when diarized.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) speaker: Option<String>,
}

/// A translation of a caption.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Translated {
    pub(crate) language: String,
    /// Empty when the translation failed its checks.
    pub(crate) text: String,
    /// Why no translation passed the checks ("answered", "untranslated",
    /// ...), when none did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) failure: Option<String>,
}

/// One caption event, as the data channel and server-sent events carry it.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum CaptionEvent {
    /// Text still being revised (greyed on the page).
    Interim(Caption),
    /// The utterance's settled text.
    Final(Caption),
    /// A participant started publishing.
    Joined {
        participant: String,
        session: String,
    },
    /// A participant stopped publishing.
    Left {
        participant: String,
        session: String,
    },
    /// A participant's session failed.
    Error {
        participant: String,
        session: String,
        message: String,
    },
}

impl CaptionEvent {
    /// The event's type, as its JSON `type` field and the SSE event name.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            CaptionEvent::Interim(_) => "interim",
            CaptionEvent::Final(_) => "final",
            CaptionEvent::Joined { .. } => "joined",
            CaptionEvent::Left { .. } => "left",
            CaptionEvent::Error { .. } => "error",
        }
    }
}

/// The text of one utterance of one participant.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Caption {
    pub(crate) participant: String,
    pub(crate) session: String,
    /// The utterance's number within its session.
    pub(crate) segment: u64,
    pub(crate) revision: u32,
    /// Times in the room's clock (ms since the room opened).
    pub(crate) start_ms: u64,
    pub(crate) end_ms: u64,
    pub(crate) text: String,
    pub(crate) language: String,
    pub(crate) words: Vec<Word>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) translation: Option<Translated>,
    /// Who of the participant's microphone spoke (`Speaker 2`), when the
    /// participant joined with `diarize=true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) speaker: Option<String>,
}

impl Caption {
    /// The caption's speaker as shown: the participant, and which of the
    /// voices on their microphone when diarized (`Ada (Speaker 2)`).
    pub(crate) fn who(&self) -> String {
        match &self.speaker {
            Some(s) => format!("{} ({s})", self.participant),
            None => self.participant.clone(),
        }
    }
}

/// A room's state.
#[derive(Debug)]
pub(crate) struct Room {
    pub(crate) name: String,
    opened: Instant,
    events: broadcast::Sender<Arc<CaptionEvent>>,
    state: Mutex<RoomState>,
}

#[derive(Debug, Default)]
struct RoomState {
    cues: VecDeque<Caption>,
    /// Participants publishing now, by session id.
    publishers: HashMap<String, String>,
    last_active: Option<Instant>,
}

impl Room {
    fn new(name: String) -> Self {
        Self {
            name,
            opened: Instant::now(),
            events: broadcast::channel(EVENTS).0,
            state: Mutex::new(RoomState::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RoomState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Milliseconds since the room opened.
    pub(crate) fn clock_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    /// Publishes an event to every subscriber, keeping finals as cues.
    pub(crate) fn publish(&self, ev: CaptionEvent) {
        {
            let mut st = self.state();
            st.last_active = Some(Instant::now());
            match &ev {
                CaptionEvent::Final(c) if !c.text.trim().is_empty() => {
                    if st.cues.len() == MAX_CUES {
                        st.cues.pop_front();
                    }
                    st.cues.push_back(c.clone());
                }
                CaptionEvent::Joined {
                    participant,
                    session,
                } => {
                    st.publishers.insert(session.clone(), participant.clone());
                }
                CaptionEvent::Left { session, .. } => {
                    st.publishers.remove(session);
                }
                _ => {}
            }
        }
        // No subscriber is no error: the cues are kept all the same.
        let _ = self.events.send(Arc::new(ev));
    }

    /// A subscription to the room's events from now on, with the last
    /// [`REPLAY`] finals before it.
    /// Viewers following the room's events now (data channels and SSE).
    pub(crate) fn viewers(&self) -> usize {
        self.events.receiver_count()
    }

    pub(crate) fn subscribe(&self) -> (Vec<Caption>, broadcast::Receiver<Arc<CaptionEvent>>) {
        let st = self.state();
        let rx = self.events.subscribe();
        let skip = st.cues.len().saturating_sub(REPLAY);
        (st.cues.iter().skip(skip).cloned().collect(), rx)
    }

    /// Finals in time order, those ending after `since_ms` (room clock).
    pub(crate) fn cues(&self, since_ms: u64) -> Vec<Caption> {
        let mut v: Vec<Caption> = self
            .state()
            .cues
            .iter()
            .filter(|c| c.end_ms > since_ms)
            .cloned()
            .collect();
        v.sort_by_key(|c| (c.start_ms, c.end_ms));
        v
    }

    /// Participants publishing now.
    pub(crate) fn publishers(&self) -> Vec<String> {
        let mut v: Vec<String> = self.state().publishers.values().cloned().collect();
        v.sort();
        v
    }

    fn idle_for(&self) -> Duration {
        let st = self.state();
        if !st.publishers.is_empty() || self.events.receiver_count() > 0 {
            return Duration::ZERO;
        }
        st.last_active.unwrap_or(self.opened).elapsed()
    }
}

/// The rooms of one ingest replica, by tenant and name.
#[derive(Debug)]
pub(crate) struct Rooms {
    rooms: Mutex<HashMap<(String, String), Arc<Room>>>,
    max_rooms: usize,
    keep: Duration,
}

impl Rooms {
    pub(crate) fn new(max_rooms: usize, keep: Duration) -> Self {
        Self {
            rooms: Mutex::new(HashMap::new()),
            max_rooms,
            keep,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Arc<Room>>> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The room, opened if needed; an error when the replica holds its
    /// maximum of rooms.
    pub(crate) fn open(&self, tenant: &str, name: &str) -> Result<Arc<Room>, String> {
        let mut rooms = self.map();
        let keep = self.keep;
        rooms.retain(|_, r| r.idle_for() < keep);
        let key = (tenant.to_owned(), name.to_owned());
        if let Some(r) = rooms.get(&key) {
            return Ok(r.clone());
        }
        if rooms.len() >= self.max_rooms {
            return Err(format!(
                "this ingest replica holds its maximum of {} rooms; retry later",
                self.max_rooms
            ));
        }
        let r = Arc::new(Room::new(name.to_owned()));
        rooms.insert(key, r.clone());
        Ok(r)
    }

    /// The room if it exists.
    pub(crate) fn get(&self, tenant: &str, name: &str) -> Option<Arc<Room>> {
        self.map()
            .get(&(tenant.to_owned(), name.to_owned()))
            .cloned()
    }
}

/// Checks a room or participant name: 1 to 64 letters, digits, `-`, `_`, `.`
/// or spaces (participants only).
pub(crate) fn check_name(what: &str, s: &str, spaces: bool) -> Result<(), String> {
    let ok = !s.trim().is_empty()
        && s.chars().count() <= 64
        && s.chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.') || (spaces && c == ' '));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {s:?} is not valid: use 1 to 64 letters, digits, '-', '_' or '.'{}",
            if spaces { " or spaces" } else { "" }
        ))
    }
}

/// Cue text for WebVTT: one line (`cue_text`, which also turns `-->` into
/// `->`) with `&`, `<` and `>` escaped.
fn escape_vtt(s: &str) -> String {
    cue_text(s)
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// What a cue shows: the translation when asked for and present; the
/// speech's text marked untranslated when the translation failed its
/// checks; else the speech's text.
fn shown(c: &Caption, translated: bool) -> std::borrow::Cow<'_, str> {
    match (&c.translation, translated) {
        (Some(t), true) if t.failure.is_some() => {
            format!("{} {}", nexus_transcript::UNTRANSLATED, c.text).into()
        }
        (Some(t), true) if !t.text.is_empty() => t.text.as_str().into(),
        _ => c.text.as_str().into(),
    }
}

/// A WebVTT document of `cues`, each labelled with its speaker as a voice
/// span; `X-TIMESTAMP-MAP` ties the room clock's zero to MPEG-TS time zero
/// so the document can serve as an HLS subtitle segment.
pub(crate) fn webvtt(cues: &[Caption], translated: bool) -> String {
    let mut out = String::from("WEBVTT\nX-TIMESTAMP-MAP=MPEGTS:0,LOCAL:00:00:00.000\n\n");
    for c in cues {
        out.push_str(&format!(
            "{}-{}\n{} --> {}\n<v {}>{}\n\n",
            c.session.get(..8).unwrap_or(&c.session),
            c.segment,
            cue_timestamp(c.start_ms, '.'),
            cue_timestamp(c.end_ms.max(c.start_ms + 1), '.'),
            escape_vtt(&c.who()),
            escape_vtt(&shown(c, translated))
        ));
    }
    out
}

/// An SRT document of `cues`, each line starting with its speaker's name.
pub(crate) fn srt(cues: &[Caption], translated: bool) -> String {
    let mut out = String::new();
    for (i, c) in cues.iter().enumerate() {
        out.push_str(&format!(
            "{}\n{} --> {}\n{}: {}\n\n",
            i + 1,
            cue_timestamp(c.start_ms, ','),
            cue_timestamp(c.end_ms.max(c.start_ms + 1), ','),
            c.who(),
            cue_text(&shown(c, translated))
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(who: &str, seg: u64, start: u64, end: u64, text: &str) -> Caption {
        Caption {
            participant: who.into(),
            session: "0123456789abcdef".into(),
            segment: seg,
            revision: 1,
            start_ms: start,
            end_ms: end,
            text: text.into(),
            language: "en".into(),
            words: vec![],
            translation: Some(Translated {
                language: "de".into(),
                text: format!("{text} (de)"),
                failure: None,
            }),
            speaker: None,
        }
    }

    #[test]
    fn subtitles_label_speakers_and_escape_text() {
        let cues = vec![
            cap("alice", 0, 1_000, 2_500, "a <b> & c"),
            cap("bob", 0, 3_723_004, 3_724_000, "hello"),
        ];
        let vtt = webvtt(&cues, false);
        assert!(vtt.starts_with("WEBVTT\nX-TIMESTAMP-MAP=MPEGTS:0,LOCAL:00:00:00.000\n\n"));
        assert!(vtt.contains("00:00:01.000 --> 00:00:02.500\n<v alice>a &lt;b&gt; &amp; c\n"));
        assert!(vtt.contains("01:02:03.004 --> 01:02:04.000\n<v bob>hello\n"));
        let srt = srt(&cues, true);
        assert!(srt.starts_with("1\n00:00:01,000 --> 00:00:02,500\nalice: a <b> & c (de)\n\n2\n"));
        // A diarized microphone: the voice names the participant and who spoke.
        let mut room_mic = cap("room-2", 1, 5_000, 6_000, "yes");
        room_mic.speaker = Some("Speaker 2".into());
        assert!(webvtt(&[room_mic.clone()], false).contains("<v room-2 (Speaker 2)>yes\n"));
        assert!(super::srt(&[room_mic], false).contains("room-2 (Speaker 2): yes\n"));
    }

    #[test]
    fn rooms_keep_finals_fan_out_and_bound_themselves() {
        let rooms = Rooms::new(2, Duration::from_secs(60));
        let r = rooms.open("t", "standup").unwrap();
        assert!(Arc::ptr_eq(&r, &rooms.open("t", "standup").unwrap()));
        // Tenants do not share rooms.
        assert!(!Arc::ptr_eq(&r, &rooms.open("u", "standup").unwrap()));
        let e = rooms.open("t", "third").unwrap_err();
        assert!(e.contains("maximum of 2 rooms"), "{e}");
        r.publish(CaptionEvent::Joined {
            participant: "alice".into(),
            session: "s1".into(),
        });
        r.publish(CaptionEvent::Final(cap("alice", 0, 0, 900, "one")));
        let (replay, mut rx) = r.subscribe();
        assert_eq!(replay.len(), 1);
        r.publish(CaptionEvent::Interim(cap("alice", 1, 1_000, 1_500, "tw")));
        r.publish(CaptionEvent::Final(cap("alice", 1, 1_000, 1_800, "two")));
        assert!(matches!(&*rx.try_recv().unwrap(), CaptionEvent::Interim(_)));
        assert!(matches!(&*rx.try_recv().unwrap(), CaptionEvent::Final(c) if c.text == "two"));
        assert_eq!(r.cues(0).len(), 2);
        assert_eq!(r.cues(1_000).len(), 1);
        assert_eq!(r.publishers(), vec!["alice".to_owned()]);
        let json = serde_json::to_value(CaptionEvent::Interim(cap("alice", 1, 0, 1, "x"))).unwrap();
        assert_eq!(json["type"], "interim");
        for ev in [
            CaptionEvent::Final(cap("a", 0, 0, 1, "x")),
            CaptionEvent::Left {
                participant: "a".into(),
                session: "s".into(),
            },
        ] {
            assert_eq!(serde_json::to_value(&ev).unwrap()["type"], ev.kind());
        }
        assert_eq!(json["participant"], "alice");
        assert_eq!(json["translation"]["language"], "de");
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("room", "standup-1", false).is_ok());
        assert!(check_name("room", "a b", false).is_err());
        assert!(check_name("participant", "Ana María", true).is_ok());
        assert!(check_name("participant", "", true).is_err());
        assert!(check_name("room", &"x".repeat(65), false).is_err());
    }
}
