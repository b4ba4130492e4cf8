//! Fault injection below SOAP (a fake HTTP server on 127.0.0.1, never the proof that the driver
//! works — that is tests/vcsim.rs): refused connections, a server that never answers, a web
//! server's error page, and a body that is not SOAP each map to the right error kind, naming the
//! endpoint.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use pcg_provider::ErrorKind;
use pcg_vsphere::{VsphereDriver, VsphereEndpoint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Answers every connection with `response` (or never, when None), after reading the request.
async fn fake(response: Option<&'static str>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = s.read(&mut buf).await;
                match response {
                    Some(r) => {
                        let _ = s.write_all(r.as_bytes()).await;
                    }
                    None => tokio::time::sleep(Duration::from_secs(30)).await,
                }
            });
        }
    });
    format!("http://{addr}")
}

fn ep(url: &str) -> VsphereEndpoint {
    let mut ep = VsphereEndpoint::new(url, "admin", "pw");
    ep.timeout_ms = Some(500);
    ep
}

#[tokio::test]
async fn refused_connection_is_unreachable() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let e = VsphereDriver::connect(&ep(&url)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unreachable, "{e}");
    assert!(e.to_string().contains(&url), "{e}");
    assert!(e.to_string().contains("vCenter"), "{e}");
    assert!(!e.to_string().contains("BMC"), "{e}");
}

#[tokio::test]
async fn silent_server_is_a_timeout_within_the_bound() {
    let url = fake(None).await;
    let t = Instant::now();
    let e = VsphereDriver::connect(&ep(&url)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // The server accepted and read the request: the request bound fired, and is the one stated.
    assert!(e.to_string().contains("within 500ms"), "{e}");
    assert!(!e.to_string().contains("BMC"), "{e}");
}

#[tokio::test]
async fn web_server_error_page_is_a_provider_fault() {
    let url = fake(Some(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 11\r\nConnection: close\r\n\r\nunavailable",
    ))
    .await;
    let e = VsphereDriver::connect(&ep(&url)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ProviderFault, "{e}");
    assert!(e.to_string().contains("HTTP 503"), "{e}");
}

#[tokio::test]
async fn a_body_that_is_not_soap_is_a_provider_fault() {
    let url = fake(Some(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 20\r\nConnection: close\r\n\r\n<html>hello</html>  ",
    ))
    .await;
    let e = VsphereDriver::connect(&ep(&url)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ProviderFault, "{e}");
    assert!(e.to_string().contains("RetrieveServiceContent"), "{e}");
}
