//! What pcg-saas and pcg-gateway share:
//! - [`init_logging`]: logs on stderr as text or JSON lines, at a level from `--log-level`,
//!   or a filter from `PCG_LOG` (tracing `EnvFilter` syntax), which wins;
//! - [`serve_metrics`]: a plain HTTP endpoint answering `GET /metrics` with a
//!   `prometheus-client` registry in the OpenMetrics text format;
//! - [`allocator!`]: the daemons' memory allocator.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

pub use mimalloc;
pub use prometheus_client;

/// Declares the daemon's memory allocator: mimalloc instead of glibc's malloc, which took about a
/// sixth of the broker's CPU per command (BENCHMARKS.md, "The memory allocator"). mimalloc's
/// eager arena commit is switched off before the first allocation: with it on, memory freed
/// after a burst stays resident (80 instead of 55 KiB per idle tunnel after 2,000 gateways
/// connected at once). Use once, in a binary crate's root.
#[macro_export]
macro_rules! allocator {
    () => {
        #[global_allocator]
        static GLOBAL: $crate::mimalloc::MiMalloc = $crate::mimalloc::MiMalloc;

        #[allow(unsafe_code)]
        mod mimalloc_options {
            extern "C" {
                fn mi_option_set(option: i32, value: ::core::ffi::c_long);
            }

            /// `mi_option_arena_eager_commit` in mimalloc 3's `mi_option_t` (the version is
            /// pinned in the workspace manifest).
            const ARENA_EAGER_COMMIT: i32 = 4;

            extern "C" fn set() {
                // SAFETY: writes one entry of mimalloc's static option table; it runs from
                // .preinit_array, before any constructor, thread or allocation.
                unsafe { mi_option_set(ARENA_EAGER_COMMIT, 0) }
            }

            #[used]
            #[link_section = ".preinit_array"]
            static SET: extern "C" fn() = set;
        }
    };
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`, `spans`).
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            o => Err(format!("log format {o:?}: use text or json")),
        }
    }
}

/// The most recent log lines of the process (for support bundles), at most this many.
pub const RECENT_LINES: usize = 5_000;

fn recent() -> &'static Mutex<VecDeque<String>> {
    static R: OnceLock<Mutex<VecDeque<String>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(VecDeque::with_capacity(RECENT_LINES)))
}

/// The most recent log lines (without colour codes), oldest first.
pub fn recent_logs() -> Vec<String> {
    recent()
        .lock()
        .expect("recent-logs lock is never poisoned")
        .iter()
        .cloned()
        .collect()
}

/// Writes each log event to stderr and keeps it among the recent lines.
struct Tee;

impl std::io::Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        {
            let mut r = recent().lock().expect("recent-logs lock is never poisoned");
            for line in text.lines().filter(|l| !l.is_empty()) {
                if r.len() == RECENT_LINES {
                    r.pop_front();
                }
                r.push_back(line.to_string());
            }
        }
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Sets up logging on stderr. `PCG_LOG` (a filter such as `info,pcg_saas=debug`) wins over
/// `level` (`error`, `warn`, `info`, `debug`, `trace`; default `info`).
pub fn init_logging(level: Option<&str>, format: LogFormat) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("PCG_LOG") {
        Ok(f) if !f.trim().is_empty() => {
            EnvFilter::try_new(&f).map_err(|e| format!("PCG_LOG={f:?}: {e}"))?
        }
        _ => {
            let l = level.unwrap_or("info");
            if !["error", "warn", "info", "debug", "trace"].contains(&l) {
                return Err(format!(
                    "log level {l:?}: use error, warn, info, debug or trace (or PCG_LOG for a filter)"
                ));
            }
            EnvFilter::new(l)
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(|| Tee);
    let r = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    r.map_err(|e| format!("cannot set up logging: {e}"))
}

/// The content type of the metrics answer: the Prometheus text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Encodes `registry` in the Prometheus text exposition format (0.0.4), which every scraper
/// and `promtool check metrics` read: prometheus-client writes OpenMetrics, whose counters carry
/// their HELP and TYPE on the name without `_total` and which ends with `# EOF`; both are
/// rewritten here.
pub fn encode(registry: &Registry) -> String {
    let mut om = String::new();
    prometheus_client::encoding::text::encode(&mut om, registry)
        .expect("writing to a String cannot fail");
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len() + 64);
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Serves `GET /metrics` on `listener` (plain HTTP/1.1) until `shutdown` resolves, answering
/// what `render` returns (e.g. [`encode`] of a registry after refreshing gauges read at scrape
/// time).
pub async fn serve_metrics(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("metrics listener: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let render = render.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let render = render.clone();
                    async move {
                        let resp = if req.uri().path() == "/metrics"
                            && req.method() == http::Method::GET
                        {
                            http::Response::builder()
                                .header(http::header::CONTENT_TYPE, METRICS_CONTENT_TYPE)
                                .body(http_body_util::Full::new(bytes::Bytes::from(render())))
                        } else {
                            http::Response::builder()
                                .status(http::StatusCode::NOT_FOUND)
                                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                                    b"metrics are at GET /metrics\n",
                                )))
                        };
                        Ok::<_, Infallible>(resp.expect("a static response builds"))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        });
    }
}
