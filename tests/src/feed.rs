//! A reader of a tenant's feed as Server-Sent Events (`GET /v1/feed`), for tests and pcg-bench.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::Saas;

/// One item of the feed.
#[derive(Debug, Clone)]
pub struct Item {
    pub seq: u64,
    pub topic: String,
    pub data: Value,
}

/// An SSE reader over one `GET /v1/feed` response.
pub struct Sse {
    resp: reqwest::Response,
    buf: String,
}

impl Sse {
    /// Opens `GET /v1/feed?<query>` (with `Last-Event-ID: last_id` when given); panics unless it
    /// is answered 200 with `text/event-stream`.
    pub async fn open(saas: &Saas, key: &str, query: &str, last_id: Option<u64>) -> Sse {
        let ca = std::fs::read(&saas.ca_file).expect("ca");
        // No overall timeout: the stream stays open.
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(crate::client_tls(&ca))
            .build()
            .expect("client");
        let mut req = http
            .get(format!("{}/v1/feed?{query}", saas.api))
            .bearer_auth(key);
        if let Some(id) = last_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let resp = req.send().await.expect("GET /v1/feed");
        assert_eq!(resp.status(), 200, "GET /v1/feed?{query}");
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap_or_default(),
            "text/event-stream"
        );
        Sse {
            resp,
            buf: String::new(),
        }
    }

    /// The next item, or None when none came within `wait` (or the stream ended). A failure the
    /// server reports on the stream is an item with topic `error` (it has no id: `seq` 0).
    pub async fn next(&mut self, wait: Duration) -> Option<Item> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse::<u64>().ok();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                let data: Value = serde_json::from_str(&data).expect("data is JSON");
                return Some(Item {
                    seq: id.unwrap_or_default(),
                    topic: event,
                    data,
                });
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.resp.chunk()).await {
                Ok(Ok(Some(bytes))) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                _ => return None,
            }
        }
    }
}
