//! The WebSocket way in, for gateways behind proxies that inspect TLS (see `pcg_proto::ws`).
//!
//! `GET /v1/tunnel/ws` on the REST listener upgrades to a WebSocket with the subprotocol
//! `pcg-tunnel.v1`. The WebSocket carries a byte stream on which a second, inner TLS handshake
//! runs — the same as on the public port: the SaaS certificate, a client certificate optional at
//! the TLS layer and required by the broker — and then HTTP/2 or HTTP/1.1 with the REST API and
//! the broker. So pairing and the tunnel work the same way through it, and the broker sees the
//! gateway's own certificate whatever the proxy did to the outer TLS.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use pcg_proto::ws::tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use pcg_proto::ws::tokio_tungstenite::tungstenite::protocol::Role;
use pcg_proto::ws::tokio_tungstenite::WebSocketStream;
use pcg_proto::ws::{WsBytes, SUBPROTOCOL};

use crate::api::ApiError;
use crate::app::App;
use crate::net::ConnInfo;

/// Answers the upgrade and serves the inner connection on the upgraded stream.
pub async fn upgrade(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    mut req: axum::extract::Request,
) -> Response {
    let refuse = |status: StatusCode, code: &'static str, message: String| {
        ApiError::new(status, code, message).into_response()
    };
    let has = |name: &str, want: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(want)))
    };
    if !has("upgrade", "websocket") || !has("connection", "upgrade") {
        return refuse(
            StatusCode::UPGRADE_REQUIRED,
            "websocket_required",
            "this endpoint takes a WebSocket upgrade (`Upgrade: websocket`); a proxy in the way may have removed it — an administrator must let WebSocket upgrades through (squid: `http_upgrade_request_protocols websocket allow all`)".into(),
        );
    }
    if !has("sec-websocket-protocol", SUBPROTOCOL) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "websocket_subprotocol",
            format!("the WebSocket must ask for the subprotocol {SUBPROTOCOL}"),
        );
    }
    let Some(key) = headers
        .get("sec-websocket-key")
        .map(|k| k.as_bytes().to_vec())
    else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "websocket_key",
            "missing Sec-WebSocket-Key".into(),
        );
    };
    let Some(inner_tls) = app.inner_tls.get().cloned() else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "starting",
            "the service is starting; retry in a moment".into(),
        );
    };
    let outer = req.extensions().get::<ConnInfo>().cloned();
    if req.version() != http::Version::HTTP_11 {
        return refuse(
            StatusCode::UPGRADE_REQUIRED,
            "websocket_required",
            "the WebSocket needs HTTP/1.1 (this request came over another version)".into(),
        );
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let app2 = app.clone();
    app.tasks.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!("WebSocket upgrade failed: {e}");
                return;
            }
        };
        let ws = WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        let peer = outer
            .map(|c| c.peer)
            .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        crate::net::serve_inner(WsBytes::new(ws), peer, inner_tls, "websocket", app2.clone()).await;
    });
    let mut h = HeaderMap::new();
    h.insert("upgrade", HeaderValue::from_static("websocket"));
    h.insert("connection", HeaderValue::from_static("upgrade"));
    h.insert(
        "sec-websocket-protocol",
        HeaderValue::from_static(SUBPROTOCOL),
    );
    if let Ok(v) = HeaderValue::from_str(&derive_accept_key(&key)) {
        h.insert("sec-websocket-accept", v);
    }
    (StatusCode::SWITCHING_PROTOCOLS, h).into_response()
}
