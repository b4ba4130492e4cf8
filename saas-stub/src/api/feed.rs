//! A tenant's feed, served two ways over [`crate::app::feed`]:
//!
//! - `GET /v1/feed` as Server-Sent Events: each item is an SSE event whose `id` is its sequence
//!   number, whose `event` is its topic and whose `data` is its JSON view. A client resumes with
//!   `since=` or the standard `Last-Event-ID` header (an `EventSource` sends it by itself). A
//!   comment line every 15 s keeps an idle stream open through proxies.
//! - `pcg.feed.v1.Feed/Subscribe` as a gRPC server stream on the same port (HTTP/2), the API key
//!   in the `authorization` metadata.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use pcg_proto::feed::v1 as pb;
use serde::Deserialize;

use super::{ApiError, ApiResult, Q};
use crate::app::feed::{FeedQuery, Subscription};
use crate::app::{App, AppError, Caller, Kind};

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FeedParams {
    /// Comma-separated: `commands`, `results`, `events`, `health`; absent: all of them.
    pub topics: Option<String>,
    /// Only what concerns this gateway.
    pub gateway_id: Option<String>,
    /// Start after this sequence number (`0`: everything retained); absent: only what comes
    /// from now on. A `Last-Event-ID` header takes its place.
    pub since: Option<u64>,
}

/// How often an idle stream carries a comment (SSE) so that proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

fn items(sub: Subscription) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    futures_util::stream::unfold(Some(sub), |sub| async move {
        let mut sub = sub?;
        match sub.next().await? {
            Ok(item) => {
                let data = super::dto::feed_data(&item).to_string();
                let ev = SseEvent::default()
                    .id(item.seq.to_string())
                    .event(item.topic())
                    .data(data);
                Some((Ok(ev), Some(sub)))
            }
            Err(e) => {
                // The store failed: say so and end; the client resumes from its last id.
                tracing::warn!("feed subscription ended: {}", e.message);
                let err = ApiError::from(e);
                let ev = SseEvent::default().event("error").data(
                    serde_json::json!({"code": err.code, "message": err.message}).to_string(),
                );
                Some((Ok(ev), None))
            }
        }
    })
}

#[utoipa::path(get, path = "/v1/feed", params(FeedParams,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this sequence number (sent by an EventSource when it reconnects)")),
    responses((status = 200, description = "Server-Sent Events: `id` the sequence number, `event` the topic (`commands`: SubmittedView, `results`: CommandView, `events`: EventView, `health`: HealthReportView, `gap`: items deleted by retention), `data` the JSON view", content_type = "text/event-stream", body = String),
              (status = 400, body = super::error::ErrorBody), (status = 404, body = super::error::ErrorBody)),
    security(("api_key" = [])))]
pub async fn feed_sse(
    State(app): State<Arc<App>>,
    caller: Caller,
    headers: HeaderMap,
    Q(p): Q<FeedParams>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::from(AppError::new(
                        Kind::Invalid,
                        "invalid_last_event_id",
                        "Last-Event-ID must be the sequence number (the `id`) of an item of this feed",
                    ))
                })?,
        ),
    };
    let sub = app.subscribe(
        &caller,
        FeedQuery {
            topics: p.topics,
            gateway_id: p.gateway_id,
            since: last_event_id.or(p.since),
        },
    )?;
    Ok(Sse::new(items(sub)).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// The gRPC `Feed` service.
pub struct FeedService {
    app: Arc<App>,
}

impl FeedService {
    pub fn server(app: Arc<App>) -> pb::feed_server::FeedServer<FeedService> {
        pb::feed_server::FeedServer::new(FeedService { app })
    }
}

fn status(e: AppError) -> tonic::Status {
    let code = match e.kind {
        Kind::Invalid | Kind::TooLarge | Kind::Unprocessable => tonic::Code::InvalidArgument,
        Kind::Unauthenticated => tonic::Code::Unauthenticated,
        Kind::Forbidden => tonic::Code::PermissionDenied,
        Kind::NotFound => tonic::Code::NotFound,
        Kind::Conflict => tonic::Code::FailedPrecondition,
        Kind::Gone => tonic::Code::NotFound,
        Kind::Unavailable => tonic::Code::Unavailable,
        Kind::Internal => tonic::Code::Internal,
    };
    tonic::Status::new(code, format!("{}: {}", e.code, e.message))
}

type ItemStream = Pin<Box<dyn Stream<Item = Result<pb::Item, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl pb::feed_server::Feed for FeedService {
    type SubscribeStream = ItemStream;

    async fn subscribe(
        &self,
        req: tonic::Request<pb::SubscribeRequest>,
    ) -> Result<tonic::Response<ItemStream>, tonic::Status> {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let caller = self.app.authenticate_fresh(header).await.map_err(status)?;
        let r = req.into_inner();
        let sub = self
            .app
            .subscribe(
                &caller,
                FeedQuery {
                    topics: Some(r.topics.join(",")),
                    gateway_id: Some(r.gateway_id).filter(|g| !g.is_empty()),
                    since: r.since,
                },
            )
            .map_err(status)?;
        let stream = futures_util::stream::unfold(Some(sub), |sub| async move {
            let mut sub = sub?;
            match sub.next().await? {
                Ok(item) => {
                    let it = pb::Item {
                        seq: item.seq,
                        topic: item.topic().to_string(),
                        json: super::dto::feed_data(&item).to_string(),
                    };
                    Some((Ok(it), Some(sub)))
                }
                Err(e) => Some((Err(status(e)), None)),
            }
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}
