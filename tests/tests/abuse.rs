//! Connection abuse against the real pcg-saas: thousands of silent TCP connections and stalled
//! TLS handshakes under a 1,024-descriptor limit must not stop it from answering a normal
//! client or from keeping a gateway's tunnel; slow clients are cut off within their bounds.

#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pcg_e2e::{Saas, SaasOptions};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Raises this process's descriptor limit to its hard limit (the flood needs thousands).
fn raise_nofile() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    l.current = l.maximum;
    let _ = setrlimit(Resource::Nofile, l);
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Opens `n` connections to `to` from 127.0.0.`from_hosts` (spread over them); with `hello`,
/// each sends the first bytes of a TLS ClientHello and then stalls. Connections that cannot
/// be made within the bound are counted, not fatal.
async fn flood(
    to: SocketAddr,
    n: usize,
    hosts: std::ops::Range<u8>,
    hello: bool,
) -> (Vec<TcpStream>, usize) {
    let mut held = Vec::with_capacity(n);
    let mut failed = 0;
    let hosts: Vec<u8> = hosts.collect();
    for chunk in (0..n).collect::<Vec<_>>().chunks(200) {
        let tries = chunk.iter().map(|i| {
            let host = hosts[i % hosts.len()];
            async move {
                let s = TcpSocket::new_v4()?;
                s.bind(SocketAddr::from((Ipv4Addr::new(127, 0, 0, host), 0)))?;
                let mut c = tokio::time::timeout(Duration::from_secs(10), s.connect(to))
                    .await
                    .map_err(|_| std::io::Error::other("connect timed out"))??;
                if hello {
                    // A TLS record header announcing a 512-byte ClientHello, and 6 bytes of it.
                    c.write_all(&[
                        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
                    ])
                    .await?;
                }
                Ok::<_, std::io::Error>(c)
            }
        });
        for r in futures_util::future::join_all(tries).await {
            match r {
                Ok(c) => held.push(c),
                Err(_) => failed += 1,
            }
        }
    }
    (held, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_do_not_stop_service_under_a_1024_descriptor_limit() {
    let have = raise_nofile();
    assert!(
        have >= 12_000,
        "this test needs a descriptor hard limit of 12,000 (have {have})"
    );
    let dir = pcg_e2e::test_dir();
    let (saas, gw, key, gw_id) = pcg_e2e::paired(
        dir.path(),
        SaasOptions {
            heartbeat_ms: Some(1000),
            nofile: Some(1024),
            // Two listeners: each is flooded.
            broker_listen: Some("127.0.0.1:0".parse().unwrap()),
            // Handshakes are not given up during the test: only eviction makes room.
            extra_toml: "max_pending_handshakes = 64\ntls_handshake_timeout_ms = 120000\n".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let connects_before = gw.status().unwrap()["tunnel"]["connects"].as_u64().unwrap();
    let started = Instant::now();
    let mut held = Vec::new();
    let mut failed = 0;
    for target in [saas.api_listen, saas.broker_listen] {
        let (h, f) = flood(target, 2000, 2..42, false).await;
        held.extend(h);
        failed += f;
        let (h, f) = flood(target, 500, 42..52, true).await;
        held.extend(h);
        failed += f;
    }
    eprintln!(
        "holding {} abusive connections ({failed} could not be made) after {:?}",
        held.len(),
        started.elapsed()
    );
    assert!(held.len() >= 4000, "only {} connections made", held.len());
    // A normal client, on fresh connections, keeps getting answers.
    let ca = std::fs::read(saas.dir.join("data/ca.pem")).unwrap();
    let fresh = reqwest::Client::builder()
        .use_preconfigured_tls(pcg_e2e::client_tls(&ca))
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    for i in 0..20 {
        let r = fresh.get(format!("{}/healthz", saas.api)).send().await;
        let r = r.unwrap_or_else(|e| {
            panic!(
                "healthz #{i} failed under the flood: {e:?}\nSaaS log (last lines):\n{}",
                saas.log()
                    .lines()
                    .rev()
                    .take(30)
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        assert_eq!(r.status().as_u16(), 200);
    }
    // The gateway keeps its tunnel, and commands still go through it.
    let id = saas
        .submit(&key, &gw_id, "gateway.echo", json!({"under": "flood"}))
        .await
        .unwrap();
    let v = saas
        .wait_command(&key, &id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");
    let st = gw.status().unwrap();
    assert_eq!(st["tunnel"]["state"], "connected", "{st}");
    assert_eq!(
        st["tunnel"]["connects"].as_u64().unwrap(),
        connects_before,
        "the tunnel was dropped during the flood: {st}"
    );
    // The process never ran out of descriptors.
    let log = saas.log();
    assert!(
        !log.contains("Too many open files"),
        "pcg-saas ran out of descriptors:\n{log}"
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off() {
    let dir = pcg_e2e::test_dir();
    let saas = Saas::start(
        &dir.path().join("saas"),
        SaasOptions {
            extra_toml:
                "tls_handshake_timeout_ms = 1500\nheader_timeout_ms = 1500\nidle_timeout_secs = 2\n"
                    .into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let closed_within = |mut s: TcpStream| async move {
        let start = Instant::now();
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(60), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
                Ok(Ok(_)) => continue,
                Err(_) => panic!("still open after 60 s"),
            }
        }
    };
    // No TLS at all, on both listeners.
    for to in [saas.api_listen, saas.broker_listen] {
        let s = TcpStream::connect(to).await.unwrap();
        let t = closed_within(s).await;
        eprintln!("silent TCP connection to {to} closed after {t:?}");
    }
    // A TLS client that never finishes its request headers.
    let ca = std::fs::read(saas.dir.join("data/ca.pem")).unwrap();
    let mut cfg = pcg_e2e::client_tls(&ca);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tcp = TcpStream::connect(saas.api_listen).await.unwrap();
    let mut tls = connector.connect(name.clone(), tcp).await.unwrap();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(60), tls.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("a request with unfinished headers is still open after 60 s"),
        }
    }
    eprintln!("unfinished headers cut after {:?}", start.elapsed());
    // An idle keep-alive connection after a complete request.
    let tcp = TcpStream::connect(saas.api_listen).await.unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(60), tls.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("an idle connection is still open after 60 s"),
        }
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    eprintln!(
        "idle keep-alive connection closed after {:?}",
        start.elapsed()
    );
}

/// HTTP/2 connections start with small buffers (`vendor/h2/PATCHED.md`: 4 KiB to write, 1 KiB
/// to read, 512 bytes for Huffman decoding) that must grow when a frame needs more: a request
/// whose header block is 12 KiB (a HEADERS frame read in one piece, Huffman-coded by the
/// client) and an answer of 130 KiB (DATA frames of the largest size) both pass over h2,
/// several times on one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_frames_larger_than_the_first_buffers_pass() {
    let dir = pcg_e2e::test_dir();
    let saas = Saas::start(&dir.path().join("saas"), SaasOptions::default())
        .await
        .unwrap();
    let pad: String = (0..12 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let committed: serde_json::Value =
        serde_json::from_str(include_str!("../../saas-stub/openapi.json")).unwrap();
    let mut tls = pcg_e2e::client_tls(&std::fs::read(&saas.ca_file).unwrap());
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(90))
        .build()
        .unwrap();
    for round in 0..3 {
        let r = http
            .get(format!("{}/openapi.json", saas.api))
            .header("x-pad", &pad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2, "round {round}");
        assert_eq!(r.status(), 200, "round {round}");
        let body = r.bytes().await.unwrap();
        assert!(
            body.len() > 100 * 1024,
            "round {round}: {} bytes",
            body.len()
        );
        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(doc, committed, "round {round}");
    }
}
