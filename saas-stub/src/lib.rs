//! pcg-saas: the SaaS companion of the pcg gateway.
//!
//! - [`app`]: the application layer: every operation, with typed errors;
//! - [`api`]: the REST API (axum over HTTPS), thin handlers over [`app`];
//! - [`broker`]: the gRPC `Broker` service every paired gateway keeps one tunnel to;
//! - [`net`]: the TLS listener both run on (connection limits, handshake, header and idle
//!   timeouts);
//! - [`store`]: durable state (sled): tenants, API keys, pairing tokens, gateways, commands,
//!   idempotency keys, events;
//! - [`ca`], [`tls`]: the CA generated on first start and the servers' TLS configurations;
//! - [`config`]: the TOML file and environment overrides.
//!
//! [`open`] loads the state; [`serve`] runs both listeners until `shutdown` resolves, then ends
//! every tunnel with a Goodbye, lets open requests finish within `shutdown_grace_ms`, flushes
//! and returns.

pub mod api;
pub mod app;
pub mod broker;
pub mod ca;
pub mod config;
pub mod net;
pub mod store;
pub mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

pub use app::{open, App};
pub use config::Config;

/// Version reported by the API and the broker.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Server certificate names: configured ones, the listen addresses, 127.0.0.1 and localhost.
fn server_names(app: &App) -> Vec<String> {
    let mut names = app.cfg.server_names.clone();
    for n in [
        "127.0.0.1".to_string(),
        "localhost".to_string(),
        app.cfg.api_listen.ip().to_string(),
        app.cfg.broker_listen.ip().to_string(),
    ] {
        if !names.contains(&n) && n != "0.0.0.0" && n != "::" {
            names.push(n);
        }
    }
    for url in std::iter::once(&app.api_url).chain(app.broker_urls.iter()) {
        if let Some(host) = url
            .strip_prefix("https://")
            .and_then(|r| r.split(['/', ':']).next())
        {
            if !host.is_empty() && !names.iter().any(|n| n == host) {
                names.push(host.to_string());
            }
        }
    }
    names
}

/// Runs the REST API and the broker on the given listeners until `shutdown` resolves.
pub async fn serve(
    app: Arc<App>,
    api: TcpListener,
    broker: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (cert_pem, key_pem) = app.ca.issue_server(&server_names(&app))?;
    let api_tls = tls::api_server_config(&cert_pem, &key_pem, &app.ca.cert_der)?;
    let broker_tls = tls::broker_server_config(&cert_pem, &key_pem, &app.ca.cert_der)?;
    let cfg = &app.cfg;
    let limits = net::Limits {
        max_pending_handshakes: cfg.max_pending_handshakes,
        max_connections_per_ip: cfg.max_connections_per_ip,
        handshake_timeout: Duration::from_millis(cfg.tls_handshake_timeout_ms),
        header_timeout: Duration::from_millis(cfg.header_timeout_ms),
        idle_timeout: Duration::from_secs(cfg.idle_timeout_secs.max(1)),
    };
    let budget = net::ConnBudget::new(cfg.max_connections, 2, cfg.max_pending_handshakes);
    let rest = api::router(app.clone());
    let grpc = broker::router(app.clone());
    let listeners = tokio_util::task::TaskTracker::new();
    listeners.spawn(net::serve(
        "api",
        api,
        api_tls,
        limits.clone(),
        budget.clone(),
        Arc::default(),
        move |info| with_conn_info(rest.clone(), info),
        app.shutdown.clone(),
        app.tasks.clone(),
    ));
    listeners.spawn(net::serve(
        "broker",
        broker,
        broker_tls,
        limits,
        budget,
        Arc::default(),
        move |info| with_conn_info(grpc.clone(), info),
        app.shutdown.clone(),
        app.tasks.clone(),
    ));
    listeners.close();
    // Housekeeping: forget idempotency keys past their window.
    {
        let app2 = app.clone();
        app.tasks.spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs(600));
            loop {
                tokio::select! {
                    _ = t.tick() => {}
                    _ = app2.shutdown.cancelled() => return,
                }
                match app2.store.prune_idempotency(app2.idempotency_window_ms()) {
                    Ok(n) if n > 0 => tracing::info!(pruned = n, "forgot expired idempotency keys"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!("pruning idempotency keys failed: {e}"),
                }
            }
        });
    }
    shutdown.await;
    tracing::info!("stopping: closing tunnels and listeners");
    app.shutdown.cancel();
    app.tunnels.close_all(
        "the SaaS broker is stopping; redial in a moment",
        broker::STOP_RETRY_AFTER_MS,
    );
    listeners.wait().await;
    app.tasks.close();
    let grace = Duration::from_millis(app.cfg.shutdown_grace_ms);
    if tokio::time::timeout(grace, app.tasks.wait()).await.is_err() {
        tracing::warn!(
            left = app.tasks.len(),
            "connections still open after {grace:?}; closing them"
        );
    }
    app.store.flush().await?;
    tracing::info!("stopped");
    Ok(())
}

/// `router` with the connection's facts in every request's extensions.
fn with_conn_info(
    router: axum::Router,
    info: net::ConnInfo,
) -> tower::util::MapRequest<
    axum::Router,
    impl Fn(http::Request<hyper::body::Incoming>) -> http::Request<hyper::body::Incoming> + Clone,
> {
    tower::util::MapRequest::new(router, move |mut req: http::Request<_>| {
        req.extensions_mut().insert(info.clone());
        req
    })
}
