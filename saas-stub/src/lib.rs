//! pcg-saas: the SaaS companion of the pcg gateway.
//!
//! - [`store`]: durable state (sled): tenants, API keys, pairing tokens, gateways, commands, events.
//! - [`ca`]: the CA generated on first start; signs server certificates and gateway certificates.
//! - [`api`]: the REST API (axum over HTTPS) for people and automation, and the pairing endpoint.
//! - [`broker`]: the tonic `Broker` service every paired gateway keeps one tunnel to.
//! - [`config`]: the TOML file and environment overrides.
//!
//! [`App`] holds the shared state; [`serve`] runs both listeners until `shutdown` resolves.

pub mod api;
pub mod broker;
pub mod ca;
pub mod config;
pub mod store;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::sync::Notify;

pub use config::Config;

/// Version reported by the API and the broker.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// State shared by the REST API and the broker.
pub struct App {
    pub cfg: Config,
    pub store: store::Store,
    pub ca: ca::Ca,
    /// Live tunnels by gateway id.
    pub tunnels: broker::Tunnels,
    /// Waiters for command completion (long-poll `GET /v1/commands/{id}?wait_seconds=`).
    pub waiters: Mutex<HashMap<String, Arc<Notify>>>,
    /// URL put in pairing tokens.
    pub api_url: String,
    /// Broker endpoints handed to gateways.
    pub broker_urls: Vec<String>,
}

impl App {
    /// Wakes everyone waiting on `command_id`.
    pub fn notify_command(&self, command_id: &str) {
        let n = self
            .waiters
            .lock()
            .expect("waiters lock is never poisoned")
            .remove(command_id);
        if let Some(n) = n {
            n.notify_waiters();
        }
    }

    fn waiter(&self, command_id: &str) -> Arc<Notify> {
        self.waiters
            .lock()
            .expect("waiters lock is never poisoned")
            .entry(command_id.to_string())
            .or_default()
            .clone()
    }
}

/// Opens the data directory (creating the CA, the store and the operator key on first start)
/// and returns the shared state. `api_addr`/`broker_addr` are the bound addresses, used for the
/// advertised URLs when the config names none.
pub fn open(
    cfg: Config,
    api_addr: std::net::SocketAddr,
    broker_addr: std::net::SocketAddr,
) -> anyhow::Result<Arc<App>> {
    use anyhow::Context as _;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data directory {}", cfg.data_dir.display()))?;
    let ca = ca::Ca::load_or_create(&cfg.data_dir)?;
    let store = store::Store::open(&cfg.data_dir.join("db")).with_context(|| {
        format!(
            "cannot open the store in {} (is another pcg-saas using this data directory?)",
            cfg.data_dir.display()
        )
    })?;
    let op_path = cfg.data_dir.join("operator.key");
    if !op_path.exists() {
        let (_, key) = store.create_api_key(None, "operator")?;
        ca::write_private(&op_path, format!("{key}\n").as_bytes())
            .with_context(|| format!("cannot write {}", op_path.display()))?;
        tracing::info!(path = %op_path.display(), "first start: operator API key written (owner-only file)");
    }
    let api_url = cfg
        .public_api_url
        .clone()
        .unwrap_or_else(|| format!("https://{api_addr}"));
    let broker_urls = if cfg.public_broker_urls.is_empty() {
        vec![format!("https://{broker_addr}")]
    } else {
        cfg.public_broker_urls.clone()
    };
    Ok(Arc::new(App {
        cfg,
        store,
        ca,
        tunnels: broker::Tunnels::default(),
        waiters: Mutex::new(HashMap::new()),
        api_url,
        broker_urls,
    }))
}

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
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut rx1 = stop_rx.clone();
    let mut rx2 = stop_rx;
    let api_task = tokio::spawn(api::serve(app.clone(), api, api_tls, async move {
        let _ = rx1.wait_for(|s| *s).await;
    }));
    let broker_task = tokio::spawn(broker::serve(
        app.clone(),
        broker,
        cert_pem,
        key_pem,
        async move {
            let _ = rx2.wait_for(|s| *s).await;
        },
    ));
    let (a, b) = tokio::join!(api_task, broker_task);
    a??;
    b??;
    app.store.flush().await?;
    Ok(())
}
