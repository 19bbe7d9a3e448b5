//! Resuming a live session after a dropped connection. A session whose client
//! went away stays parked on its ingest replica for the resume grace, still
//! decoding the audio it has; a resumed call takes it over (even before the
//! replica noticed the old connection died), gets every result after the
//! index it names, and may send more audio. A session that is not running
//! here (it ended, or ran on a replica that died) can still hand over
//! the finals in its result log, after which the call ends.

use std::collections::HashSet;

use nexus_bus::{Bus, SessionId, decode};
use nexus_proto::pipeline::DecodeResult;
use nexus_proto::speech::{
    ResumeSession, SpeechEvent, StreamingRecognizeRequest, StreamingRecognizeResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Response, Status, Streaming};

use crate::session::Reattach;
use crate::{Ingest, ResponseStream, invalid};

impl<B: Bus> Ingest<B> {
    pub(crate) async fn resume(
        &self,
        r: ResumeSession,
        tenant: String,
        inbound: Streaming<StreamingRecognizeRequest>,
    ) -> Result<Response<ResponseStream>, Status> {
        let rx = self.resume_session(r, tenant, Box::pin(inbound)).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    /// Hands `inbound` to the running session `r` names (its current client,
    /// if it still has one, is told it was taken over), or replays the finals
    /// its result log holds; the session's responses come on the receiver.
    pub(crate) async fn resume_session(
        &self,
        r: ResumeSession,
        tenant: String,
        mut inbound: crate::session::Inbound,
    ) -> Result<mpsc::Receiver<Result<StreamingRecognizeResponse, Status>>, Status> {
        let id = SessionId::parse(&r.session_id).map_err(|_| {
            invalid(format!(
                "resume.session_id {:?} is not a session id; use the session_id of the session's first response",
                r.session_id
            ))
        })?;
        let keys_on = self.inner.access.requires_keys();
        let parked = self
            .inner
            .resumable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id.as_str())
            .cloned();
        let (tx, rx) = mpsc::channel(64);
        if let Some((owner, session)) = parked {
            if keys_on && owner != tenant {
                return Err(not_found(&id));
            }
            let handed = session
                .send(Reattach {
                    inbound,
                    out: tx.clone(),
                    after: r.after_result_index,
                })
                .await;
            match handed {
                Ok(()) => return Ok(rx),
                // The session ended meanwhile; its log still holds the finals.
                Err(mpsc::error::SendError(back)) => inbound = back.inbound,
            }
        }
        // Not parked here: hand over the finals its result log holds.
        let log = self.inner.cfg.fleet.keys.results(&id);
        let mut entries = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .inner
                .bus
                .range_after(&log, after, 512)
                .await
                .map_err(|e| Status::unavailable(format!("results cannot be read: {e}; retry")))?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            entries.extend(page);
        }
        if entries.is_empty() {
            return Err(not_found(&id));
        }
        let mut out = vec![StreamingRecognizeResponse {
            session_id: id.to_string(),
            ..Default::default()
        }];
        let mut seen = HashSet::new();
        for (i, e) in entries.iter().enumerate() {
            let Ok(msg) = decode::<DecodeResult>(&e.fields) else {
                continue;
            };
            let env = msg.envelope.unwrap_or_default();
            if keys_on && env.tenant != tenant {
                return Err(not_found(&id));
            }
            let index = i as u64 + 1;
            let Some(mut res) = msg.result else { continue };
            if !res.is_final
                || res.alternatives.is_empty()
                || index <= r.after_result_index
                || !seen.insert(env.segment_id)
            {
                continue;
            }
            res.result_index = index;
            out.push(StreamingRecognizeResponse {
                session_id: id.to_string(),
                results: vec![res],
                ..Default::default()
            });
        }
        out.push(StreamingRecognizeResponse {
            session_id: id.to_string(),
            speech_event: SpeechEvent::EndOfSession as i32,
            ..Default::default()
        });
        tracing::info!(session = %id, responses = out.len(), "ended session's results handed over");
        drop(inbound);
        tokio::spawn(async move {
            for m in out {
                if tx.send(Ok(m)).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }
}

fn not_found(id: &SessionId) -> Status {
    Status::not_found(format!(
        "session {id} is not running here and left no results: it ended longer ago than results are kept, or never existed; start a new session"
    ))
}
