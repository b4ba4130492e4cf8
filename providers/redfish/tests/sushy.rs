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
    // A wrong pin and a foreign CA are trust failures (not "unreachable"), naming the endpoint
    // and the SHA-256 to pin.
    ep.tls = Some(TlsTrust::PinSha256("00".repeat(32)));
    let e = RedfishDriver::new(&ep).unwrap().enrol().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TlsTrust, "{e}");
    assert!(e.to_string().contains("pinned"), "{e}");
    assert!(e.to_string().contains(&peer.pki.cert_sha256), "{e}");
    ep.tls = Some(TlsTrust::CaPem(common::pki().ca_pem));
    let e = RedfishDriver::new(&ep).unwrap().enrol().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TlsTrust, "{e}");
    let msg = e.to_string();
    eprintln!("foreign CA: {msg}");
    assert!(msg.contains(&format!("127.0.0.1:{}", peer.port)), "{msg}");
    assert!(
        msg.contains("pin_sha256") && msg.contains(&peer.pki.cert_sha256),
        "{msg}"
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

/// `curl --cacert CA -u USER:PASSWORD https://.../PATH` against the emulator: a second client
/// reading back what pcg set.
fn curl_json(peer: &Sushy, path: &str) -> serde_json::Value {
    let ca = peer.dir.path().join("ca.pem");
    std::fs::write(&ca, &peer.pki.ca_pem).unwrap();
    let out = std::process::Command::new("curl")
        .args(["-sS", "--fail", "--cacert"])
        .arg(&ca)
        .args(["-u", &format!("{}:{}", common::USER, common::PASSWORD)])
        .arg(format!("https://127.0.0.1:{}{path}", peer.port))
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("curl returned JSON")
}

/// The Reset requests the emulator served (its request log).
fn resets(peer: &Sushy) -> usize {
    std::fs::read_to_string(&peer.proc.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("POST") && l.contains("ComputerSystem.Reset"))
        .count()
}

#[tokio::test]
async fn sushy_boot_and_media_commands_change_no_power() {
    use pcg_provider::command::{self, BareMetalService, Protocol};
    let Some(peer) = Sushy::start() else { return };
    let images = ImageServer::start(&peer.bin.join("python"));
    let svc = BareMetalService::new().with_factory(Protocol::Redfish, RedfishDriver::factory);
    let ep = serde_json::to_value(peer.endpoint()).unwrap();
    let out = svc
        .handle(
            command::ENROL,
            serde_json::json!({"name": "r1", "protocol": "redfish", "endpoint": ep}),
        )
        .await
        .unwrap();
    let sys = out["capabilities"]["systems"][1]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/redfish/v1/Systems/{sys}");
    let power_before = curl_json(&peer, &path)["PowerState"].clone();
    let resets_before = resets(&peer);

    // Boot override: device, persistence and mode, read back by curl.
    for (device, target, persistence, enabled, mode, mode_rf) in [
        ("pxe", "Pxe", "continuous", "Continuous", "uefi", "UEFI"),
        ("cd", "Cd", "continuous", "Continuous", "legacy", "Legacy"),
        ("disk", "Hdd", "continuous", "Continuous", "uefi", "UEFI"),
    ] {
        let out = svc
            .handle(
                command::BOOT,
                serde_json::json!({"bmc": "r1", "system": sys, "device": device,
                    "persistence": persistence, "mode": mode}),
            )
            .await
            .unwrap();
        assert_eq!(out["boot"]["device"], device, "{out}");
        let boot = curl_json(&peer, &path)["Boot"].clone();
        assert_eq!(
            (
                boot["BootSourceOverrideTarget"].as_str(),
                boot["BootSourceOverrideEnabled"].as_str(),
                boot["BootSourceOverrideMode"].as_str()
            ),
            (Some(target), Some(enabled), Some(mode_rf)),
            "curl reads {boot}"
        );
    }

    // Virtual media insert and eject, read back by curl.
    let out = svc
        .handle(
            command::INSERT_MEDIA,
            serde_json::json!({"bmc": "r1", "system": sys, "image_url": images.url}),
        )
        .await
        .unwrap();
    assert_eq!(out["media"]["inserted"], true, "{out}");
    let cd = curl_json(&peer, &format!("{path}/VirtualMedia/Cd"));
    assert_eq!(
        (cd["Inserted"].as_bool(), cd["Image"].as_str()),
        (Some(true), Some(images.url.as_str())),
        "curl reads {cd}"
    );
    let out = svc
        .handle(
            command::EJECT_MEDIA,
            serde_json::json!({"bmc": "r1", "system": sys}),
        )
        .await
        .unwrap();
    assert_eq!(out["media"]["inserted"], false, "{out}");
    let cd = curl_json(&peer, &format!("{path}/VirtualMedia/Cd"));
    assert_eq!(cd["Inserted"].as_bool(), Some(false), "curl reads {cd}");

    // None of it touched the power.
    assert_eq!(resets(&peer), resets_before, "a Reset was sent");
    assert_eq!(curl_json(&peer, &path)["PowerState"], power_before);
    // Power answers the state after the change by default (sushy applies it 1-11 s later).
    let out = svc
        .handle(
            command::POWER,
            serde_json::json!({"bmc": "r1", "system": sys, "action": "off", "timeout_ms": 30000}),
        )
        .await
        .unwrap();
    assert_eq!(out["state"], "off", "{out}");
    assert_eq!(curl_json(&peer, &path)["PowerState"], "Off");
    // The request log does show a Reset when there is one.
    assert_eq!(
        resets(&peer),
        resets_before + 1,
        "the power off was one Reset"
    );
    svc.driver("r1").unwrap().close().await.unwrap();
}

/// A BMC's own self-signed certificate marked CA:TRUE, given as `ca_pem`: accepted, as `curl
/// --cacert` accepts the same file (WebPKI alone refuses it as `CaUsedAsEndEntity`).
#[tokio::test]
async fn sushy_self_signed_ca_certificate_as_ca_pem() {
    let Some(peer) = Sushy::start_with(common::self_signed_ca_pki()) else {
        return;
    };
    let ca = peer.dir.path().join("bmc-cert.pem");
    std::fs::write(&ca, &peer.pki.ca_pem).unwrap();
    let curl = std::process::Command::new("curl")
        .args(["-sS", "--fail", "-o", "/dev/null", "--cacert"])
        .arg(&ca)
        .args(["-u", &format!("{}:{}", common::USER, common::PASSWORD)])
        .arg(format!(
            "https://127.0.0.1:{}/redfish/v1/Systems",
            peer.port
        ))
        .output()
        .unwrap();
    assert!(
        curl.status.success(),
        "curl --cacert refuses it too: {}",
        String::from_utf8_lossy(&curl.stderr)
    );
    let d = RedfishDriver::new(&peer.endpoint()).unwrap();
    let caps = conformance::enrol(&d).await;
    assert_eq!(caps.systems.len(), 3);
    d.close().await.unwrap();
    // The host name is still checked against the certificate: another name it carries works.
    let mut ep = peer.endpoint();
    ep.address = format!("https://localhost:{}", peer.port);
    RedfishDriver::new(&ep).unwrap().enrol().await.unwrap();
}
