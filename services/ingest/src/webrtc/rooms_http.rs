//! The room endpoints: server-sent events, live WebVTT, SRT, room state, and
//! the captions page.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use nexus_bus::Bus;
use tokio::sync::broadcast;

use crate::Ingest;
use crate::http::ApiError;
use crate::rooms::{self, CaptionEvent, Room};

use super::{RoomQuery, bad, tenant_of};

/// Viewers one room takes on one replica (its publishers' data channels included).
pub(crate) const MAX_ROOM_VIEWERS: usize = 1_000;

/// A room that exists, its name from the path and checked, with the query:
/// the extractor of the subtitle and state endpoints.
pub(crate) struct RoomAccess(Arc<Room>, RoomQuery);

impl<B: Bus> FromRequestParts<Ingest<B>> for RoomAccess {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, ingest: &Ingest<B>) -> Result<Self, ApiError> {
        let Path(room) = Path::<String>::from_request_parts(parts, ingest)
            .await
            .map_err(|e| bad(e.body_text(), "room"))?;
        let Query(q) = Query::<RoomQuery>::from_request_parts(parts, ingest)
            .await
            .map_err(|e| bad(e.body_text(), "query"))?;
        let found = find_room(ingest, &parts.headers, &room, &q, false)?;
        Ok(Self(found, q))
    }
}

/// The tenant's room `name`: opened if `open`, else NOT_FOUND when it does
/// not exist.
fn find_room<B: Bus>(
    ingest: &Ingest<B>,
    headers: &HeaderMap,
    name: &str,
    q: &RoomQuery,
    open: bool,
) -> Result<Arc<Room>, ApiError> {
    let tenant = tenant_of(
        ingest,
        headers,
        q.access_token.as_deref(),
        q.tenant.as_deref(),
    )?;
    rooms::check_name("room", name, false).map_err(|e| bad(e, "room"))?;
    let rooms = &ingest.inner.webrtc.rooms;
    if open {
        return rooms
            .open(&tenant, name)
            .map_err(|e| ApiError::new(StatusCode::TOO_MANY_REQUESTS, e));
    }
    rooms.get(&tenant, name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no room {name:?} on this server; it opens when someone publishes into it"),
        )
    })
}

/// `GET /v1/rooms/{room}/events`: the room's captions as server-sent events
/// (`interim`, `final`, `joined`, `left`, `error`), the last finals first.
pub(crate) async fn events<B: Bus>(
    State(ingest): State<Ingest<B>>,
    headers: HeaderMap,
    Path(room): Path<String>,
    Query(q): Query<RoomQuery>,
) -> Result<Response, ApiError> {
    // Viewers may come before the first speaker: the room opens for them.
    let room = find_room(&ingest, &headers, &room, &q, true)?;
    // A viewer is a call of its tenant while it watches (the tenant's
    // concurrency bound), and a room has at most MAX_ROOM_VIEWERS.
    let tenant = tenant_of(
        &ingest,
        &headers,
        q.access_token.as_deref(),
        q.tenant.as_deref(),
    )?;
    let grant = ingest
        .inner
        .access
        .limit(tenant)
        .map_err(|d| ApiError::from(tonic::Status::from(d)))?;
    if room.viewers() >= MAX_ROOM_VIEWERS {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "room {:?} has its maximum of {MAX_ROOM_VIEWERS} viewers on this replica; retry later",
                room.name
            ),
        ));
    }
    let (replay, rx) = room.subscribe();
    let first = futures::stream::iter(replay.into_iter().map(|c| Arc::new(CaptionEvent::Final(c))));
    let live = futures::stream::unfold((rx, grant), |(mut rx, grant)| async move {
        loop {
            match rx.recv().await {
                Ok(ev) => return Some((ev, (rx, grant))),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    use futures::StreamExt;
    let stream = first
        .chain(live)
        .map(|ev| Event::default().event(ev.kind()).json_data(&*ev));
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// `GET /v1/rooms/{room}/captions.vtt`: a rolling WebVTT cue list of the last
/// `window_s` seconds (default 60), for HLS subtitle playlists.
pub(crate) async fn vtt(RoomAccess(room, q): RoomAccess) -> Response {
    let window = q.window_s.unwrap_or(60).saturating_mul(1000);
    let since = room.clock_ms().saturating_sub(window);
    let body = rooms::webvtt(&room.cues(since), q.translated.unwrap_or(false));
    (
        [
            (header::CONTENT_TYPE, "text/vtt; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /v1/rooms/{room}/captions.srt`: every caption of the room so far.
pub(crate) async fn srt(RoomAccess(room, q): RoomAccess) -> Response {
    let body = rooms::srt(&room.cues(0), q.translated.unwrap_or(false));
    let disposition = format!("attachment; filename=\"{}.srt\"", room.name);
    (
        [
            (
                header::CONTENT_TYPE,
                "application/x-subrip; charset=utf-8".to_owned(),
            ),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        body,
    )
        .into_response()
}

/// `GET /v1/rooms/{room}`: who publishes and how many captions there are.
pub(crate) async fn room_info(RoomAccess(room, _): RoomAccess) -> Response {
    axum::Json(serde_json::json!({
        "room": room.name,
        "publishers": room.publishers(),
        "captions": room.cues(0).len(),
        "clock_ms": room.clock_ms(),
    }))
    .into_response()
}

/// The captions page: plain HTML and JavaScript, no build step.
pub(crate) async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../../static/captions.html"),
    )
        .into_response()
}
