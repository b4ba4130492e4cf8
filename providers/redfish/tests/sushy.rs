//! pcg-redfish against its real peer, sushy-emulator (fake driver) behind TLS and basic auth:
//! the provider conformance suite plus TLS trust checks.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{ImageServer, Sushy};
use pcg_provider::{
    conformance, BareMetal, BmcEndpoint, BootDevice, BootMode, BootOverride, BootPersistence,
    BootSource, ErrorKind, TlsTrust,
};
use pcg_redfish::RedfishDriver;

/// sushy applies a power change 1–11 s after the Reset answers.
const SETTLE: Duration = Duration::from_secs(25);

#[tokio::test]
async fn sushy_enrol_records_profile() {
    let Some(peer) = Sushy::start() else { return };
    let d = RedfishDriver::new(&peer.endpoint()).unwrap();
    let caps = conformance::enrol(&d).await;
    assert_eq!(caps.systems.len(), 3, "{caps:?}");
    assert!(caps.virtual_media);
    assert_eq!(
        caps.details["auth"], "basic",
        "sushy has no SessionService: {caps:?}"
    );
    assert_eq!(caps.details["virtual_media_under"], "Systems", "{caps:?}");
    d.close().await.unwrap();
}

#[tokio::test]
async fn sushy_power_round_trip() {
    let Some(peer) = Sushy::start() else { return };
    let d = RedfishDriver::new(&peer.endpoint()).unwrap();
    let caps = conformance::enrol(&d).await;
    conformance::power_round_trip(&d, &caps.systems[0], SETTLE).await;
    assert_eq!(d.capabilities().unwrap().details["reset_answer"], 204);
    d.close().await.unwrap();
}

#[tokio::test]
async fn sushy_power_reset_and_soft_shutdown() {
    let Some(peer) = Sushy::start() else { return };
    let d = RedfishDriver::new(&peer.endpoint()).unwrap();
    let caps = conformance::enrol(&d).await;
    conformance::power_reset(&d, &caps.systems[1], &caps, SETTLE).await;
    d.close().await.unwrap();
}

#[tokio::test]
async fn sushy_boot_override_and_virtual_media() {
    let Some(peer) = Sushy::start() else { return };
    let images = ImageServer::start(&peer.bin.join("python"));
    let d = RedfishDriver::new(&peer.endpoint()).unwrap();
    let caps = conformance::enrol(&d).await;
    let sys = &caps.systems[1];
    conformance::boot_override_round_trip(&d, sys, &caps, true).await;
    // Firmware mode travels with the override.
    for mode in [BootMode::Legacy, BootMode::Uefi] {
        let want = BootOverride {
            device: BootDevice::Pxe,
            persistence: BootPersistence::Continuous,
            mode: Some(mode),
        };
        d.set_boot_override(sys, &want).await.unwrap();
        assert_eq!(d.boot_override(sys).await.unwrap(), want);
    }
    conformance::virtual_media_round_trip(&d, sys, &caps, &images.url).await;
    d.close().await.unwrap();
}

#[tokio::test]
async fn sushy_provision_lifecycle_from_virtual_media() {
    let Some(peer) = Sushy::start() else { return };
    let images = ImageServer::start(&peer.bin.join("python"));
    let d = RedfishDriver::new(&peer.endpoint()).unwrap();
    let caps = conformance::enrol(&d).await;
    let boot = BootSource::VirtualMedia {
        image_url: images.url.clone(),
    };
    conformance::lifecycle(&d, &caps.systems[2], boot, SETTLE).await;
    d.close().await.unwrap();
}

#[tokio::test]
async fn sushy_wrong_password_is_auth_error() {
    let Some(peer) = Sushy::start() else { return };
    conformance::wrong_password(&RedfishDriver::factory, &peer.endpoint()).await;
}

#[tokio::test]
async fn sushy_pinned_certificate_and_wrong_trust() {
    let Some(peer) = Sushy::start() else { return };
    // Pinned by SHA-256: works without the CA.
    let mut ep = peer.endpoint();
    ep.tls = Some(TlsTrust::PinSha256(peer.pki.cert_sha256.clone()));
    let d = RedfishDriver::new(&ep).unwrap();
    d.enrol().await.unwrap();
    // A wrong pin and a foreign CA are refused, naming the endpoint.
    ep.tls = Some(TlsTrust::PinSha256("00".repeat(32)));
    let e = RedfishDriver::new(&ep).unwrap().enrol().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unreachable, "{e}");
    assert!(e.to_string().contains("pinned"), "{e}");
    ep.tls = Some(TlsTrust::CaPem(common::pki().ca_pem));
    let e = RedfishDriver::new(&ep).unwrap().enrol().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unreachable, "{e}");
    assert!(
        e.to_string().contains(&format!("127.0.0.1:{}", peer.port)),
        "{e}"
    );
    // HTTPS without any trust is refused before any I/O.
    ep.tls = None;
    let e = RedfishDriver::new(&ep).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidSpec, "{e}");
}

#[tokio::test]
async fn unreachable_bmc_fails_within_bound() {
    // A port where nothing listens: refused at once.
    let port = common::free_port();
    let mut ep = BmcEndpoint::new(format!("https://127.0.0.1:{port}"), "admin", "pw");
    ep.tls = Some(TlsTrust::PinSha256("00".repeat(32)));
    ep.timeout_ms = Some(2_000);
    conformance::unreachable(&RedfishDriver::factory, &ep, Duration::from_millis(500)).await;

    // A listener that accepts and never answers (a hung BMC): Timeout within the bound.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    ep.address = format!("https://{}", silent.local_addr().unwrap());
    let start = Instant::now();
    let e = RedfishDriver::new(&ep).unwrap().enrol().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(
        start.elapsed() < Duration::from_millis(2_500),
        "{:?}",
        start.elapsed()
    );
    assert!(e.to_string().contains(&ep.address), "{e}");
}
