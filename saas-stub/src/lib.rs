//! pcg-saas: the SaaS companion of the pcg gateway.
//!
//! - [`app`]: the application layer: every operation, with typed errors;
//! - [`api`]: the REST API (axum over HTTPS), thin handlers over [`app`];
//! - [`broker`]: the gRPC `Broker` service every paired gateway keeps one tunnel to;
//! - [`net`]: the TLS listener both run on (connection limits, handshake, header and idle
//!   timeouts); by default one public port serves both;
//! - [`tunnel_ws`]: the WebSocket way in, for gateways behind TLS-inspecting proxies;
//! - [`commands`]: command state in memory, with the store as its log;
//! - [`watch`]: the broker's side of declared machines (sync, reports, health);
//! - [`store`]: durable state (sled): tenants, API keys, pairing tokens, gateways, commands,
//!   idempotency keys, events;
//! - [`ca`], [`tls`]: the CA generated on first start and the servers' TLS configurations;
//! - [`metrics`]: Prometheus metrics (`GET /metrics` with the operator key, or `metrics_listen`);
//! - [`config`]: the TOML file and environment overrides.
//!
//! [`open`] loads the state; [`serve`] runs both listeners until `shutdown` resolves, then ends
//! every tunnel with a Goodbye, lets open requests finish within `shutdown_grace_ms`, flushes
//! and returns.

pub mod api;
pub mod app;
pub mod broker;
pub mod ca;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod metrics;
pub mod net;
pub mod oplog;
pub mod store;
pub mod tls;
pub mod tunnel_ws;
pub mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

pub use app::{open, App};
pub use config::Config;

/// Version reported by the API and the broker.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Server certificate names: the host of the public API URL first, configured ones, the listen
/// addresses, 127.0.0.1 and localhost.
fn server_names(app: &App) -> Vec<String> {
    let mut names = Vec::new();
    if let Some(host) = app
        .api_url
        .strip_prefix("https://")
        .and_then(|r| r.split('/').next())
        .map(|hp| match hp.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') && p.parse::<u16>().is_ok() => h,
            _ => hp,
        })
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
    {
        names.push(host.to_string());
    }
    for n in &app.cfg.server_names {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    let mut listens = vec![app.cfg.api_listen.ip().to_string()];
    if let Some(b) = app.cfg.broker_listen {
        listens.push(b.ip().to_string());
    }
    for n in ["127.0.0.1".to_string(), "localhost".to_string()]
        .into_iter()
        .chain(listens)
    {
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

/// The bounds of every listener, from the config.
pub(crate) fn limits(cfg: &Config) -> net::Limits {
    net::Limits {
        max_pending_handshakes: cfg.max_pending_handshakes,
        max_connections_per_ip: cfg.max_connections_per_ip,
        handshake_timeout: Duration::from_millis(cfg.tls_handshake_timeout_ms),
        header_timeout: Duration::from_millis(cfg.header_timeout_ms),
        idle_timeout: Duration::from_secs(cfg.idle_timeout_secs.max(1)),
        max_concurrent_handshakes: cfg.max_concurrent_handshakes,
    }
}

/// The REST API and the broker on one router: what the public port serves when the broker
/// shares it, and what inner connections (the WebSocket way in) are served with.
pub(crate) fn inner_router(app: Arc<App>) -> axum::Router {
    api::router(app.clone()).merge(broker::router(app))
}

/// Runs the REST API and the broker until `shutdown` resolves: both on `api` (the public port),
/// or the broker on its own listener `broker`.
pub async fn serve(
    app: Arc<App>,
    api: TcpListener,
    broker: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (cert_pem, key_pem) = app.ca.issue_server(&server_names(&app))?;
    let public_tls = tls::public_server_config(&cert_pem, &key_pem, &app.ca.cert_der)?;
    let _ = app.inner_tls.set(public_tls.clone());
    let cfg = &app.cfg;
    let limits = limits(cfg);
    let listener_count = if broker.is_some() { 2 } else { 1 };
    let budget = net::ConnBudget::new(
        cfg.max_connections,
        listener_count,
        cfg.max_pending_handshakes,
    );
    let listeners = tokio_util::task::TaskTracker::new();
    match broker {
        None => {
            let router = inner_router(app.clone());
            listeners.spawn(net::serve(
                "public",
                api,
                public_tls,
                limits,
                budget,
                Arc::default(),
                move |info| with_conn_info(router.clone(), info),
                app.shutdown.clone(),
                app.tasks.clone(),
            ));
        }
        Some(broker) => {
            let api_tls = tls::api_server_config(&cert_pem, &key_pem, &app.ca.cert_der)?;
            let broker_tls = tls::broker_server_config(&cert_pem, &key_pem, &app.ca.cert_der)?;
            let rest = api::router(app.clone());
            let grpc = broker::router(app.clone());
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
        }
    }
    if let Some(addr) = app.cfg.metrics_listen {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (metrics_listen): {e}"))?;
        let (app2, app3) = (app.clone(), app.clone());
        listeners.spawn(async move {
            pcg_obs::serve_metrics(l, Arc::new(move || app2.render_metrics()), async move {
                app3.shutdown.cancelled().await
            })
            .await;
        });
    }
    listeners.close();
    // Housekeeping: retention of commands, events and idempotency keys.
    {
        let app2 = app.clone();
        app.tasks.spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs(600));
            loop {
                tokio::select! {
                    _ = t.tick() => {}
                    _ = app2.shutdown.cancelled() => return,
                }
                // Off the runtime's threads: a pass over a large store takes a while.
                let app3 = app2.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || app3.prune()).await {
                    tracing::warn!("a retention pass stopped: {e}");
                }
            }
        });
    }
    // Prompt flushes while someone reads the feed.
    app.tasks.spawn(app::feed::pump(app.clone()));
    // Deadlines of commands never handed to a gateway.
    {
        let app2 = app.clone();
        app.tasks.spawn(async move {
            let mut t = tokio::time::interval(Duration::from_millis(500));
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = t.tick() => {}
                    _ = app2.shutdown.cancelled() => return,
                }
                if let Err(e) = app2.expire_deadlines().await {
                    tracing::warn!("ending commands past their deadline failed: {e}");
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
pub(crate) fn with_conn_info(
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
