//! The conformance suite (feature `conformance`): checks every driver runs against its real peer.
//!
//! Each check drives a `&dyn BareMetal` through one part of the contract in the crate docs and
//! panics with a message naming what was expected and what was seen. Drivers call these from their
//! own integration tests, after starting their peer.

use std::time::{Duration, Instant};

use crate::baremetal::{BareMetal, DriverFactory};
use crate::error::{ErrorKind, ProviderError};
use crate::types::{
    BmcEndpoint, BootDevice, BootOverride, BootPersistence, BootSource, Capabilities, PowerAction,
    PowerState, ProvisionRequest, Secret,
};

fn ok<T>(what: &str, r: Result<T, ProviderError>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("conformance: {what} failed: {e} (kind {:?})", e.kind()),
    }
}

/// Enrolment checks credentials and records a usable profile.
pub async fn enrol(d: &dyn BareMetal) -> Capabilities {
    let caps = ok("enrol", d.enrol().await);
    assert!(
        !caps.systems.is_empty(),
        "conformance: enrol found no system: {caps:?}"
    );
    for a in [PowerAction::On, PowerAction::Off] {
        assert!(
            caps.power_actions.contains(&a),
            "conformance: profile lacks {a:?}: {caps:?}"
        );
    }
    assert_eq!(
        d.capabilities().as_ref(),
        Some(&caps),
        "conformance: profile not recorded"
    );
    caps
}

/// Off (twice), on (twice), cycle, off again: each reaches its state within `settle`.
pub async fn power_round_trip(d: &dyn BareMetal, system: &str, settle: Duration) {
    let steps = [
        (PowerAction::Off, PowerState::Off),
        (PowerAction::Off, PowerState::Off),
        (PowerAction::On, PowerState::On),
        (PowerAction::On, PowerState::On),
        (PowerAction::Cycle, PowerState::On),
        (PowerAction::Off, PowerState::Off),
    ];
    run_power_steps(d, system, settle, &steps).await;
}

/// On, hard reset (the machine comes back on), soft shutdown where offered, off.
pub async fn power_reset(d: &dyn BareMetal, system: &str, caps: &Capabilities, settle: Duration) {
    let mut steps = vec![
        (PowerAction::On, PowerState::On),
        (PowerAction::Reset, PowerState::On),
    ];
    if caps.power_actions.contains(&PowerAction::SoftShutdown) {
        steps.push((PowerAction::SoftShutdown, PowerState::Off));
    }
    steps.push((PowerAction::Off, PowerState::Off));
    run_power_steps(d, system, settle, &steps).await;
}

async fn run_power_steps(
    d: &dyn BareMetal,
    system: &str,
    settle: Duration,
    steps: &[(PowerAction, PowerState)],
) {
    for &(action, want) in steps {
        ok(&format!("power {action:?}"), d.power(system, action).await);
        ok(
            &format!("wait for {want:?} after {action:?}"),
            d.wait_power(system, want, settle).await,
        );
        let seen = ok("power state", d.power_state(system).await);
        assert_eq!(
            seen, want,
            "conformance: after {action:?} the state reads {seen:?}"
        );
    }
}

/// Each boot device the profile lists is set and read back; persistence where the BMC keeps it;
/// clearing reads back `None`. `check_persistence` is false for BMCs that keep only the device
/// (ipmi_sim stores the device alone and reports every override as next-boot-only).
pub async fn boot_override_round_trip(
    d: &dyn BareMetal,
    system: &str,
    caps: &Capabilities,
    check_persistence: bool,
) {
    for &device in caps.boot_devices.iter().filter(|b| **b != BootDevice::None) {
        let want = BootOverride::once(device);
        ok(
            &format!("set boot {device:?}"),
            d.set_boot_override(system, &want).await,
        );
        let seen = ok("read boot override", d.boot_override(system).await);
        assert_eq!(
            seen.device, device,
            "conformance: set {want:?}, read back {seen:?}"
        );
    }
    let want = BootOverride {
        device: BootDevice::Pxe,
        persistence: BootPersistence::Continuous,
        mode: None,
    };
    ok(
        "set continuous PXE",
        d.set_boot_override(system, &want).await,
    );
    let seen = ok("read boot override", d.boot_override(system).await);
    assert_eq!(
        seen.device,
        BootDevice::Pxe,
        "conformance: set {want:?}, read back {seen:?}"
    );
    if check_persistence {
        assert_eq!(
            seen.persistence,
            BootPersistence::Continuous,
            "conformance: set {want:?}, read back {seen:?}"
        );
    }
    ok(
        "clear boot override",
        d.set_boot_override(system, &BootOverride::NONE).await,
    );
    let seen = ok("read boot override", d.boot_override(system).await);
    assert_eq!(
        seen.device,
        BootDevice::None,
        "conformance: cleared, read back {seen:?}"
    );
}

/// Insert, insert again (idempotent), eject, eject again (idempotent). Where the profile says
/// there is no virtual media, insert must fail with `Unsupported`.
pub async fn virtual_media_round_trip(
    d: &dyn BareMetal,
    system: &str,
    caps: &Capabilities,
    image_url: &str,
) {
    if !caps.virtual_media {
        let e = d
            .insert_media(system, image_url)
            .await
            .expect_err("insert without virtual media");
        assert_eq!(e.kind(), ErrorKind::Unsupported, "conformance: {e}");
        return;
    }
    for _ in 0..2 {
        ok("insert media", d.insert_media(system, image_url).await);
        let m = ok("media state", d.media_state(system).await).expect("profile says virtual media");
        assert!(m.inserted, "conformance: inserted, reads {m:?}");
        assert_eq!(
            m.image.as_deref(),
            Some(image_url),
            "conformance: image reads {m:?}"
        );
    }
    for _ in 0..2 {
        ok("eject media", d.eject_media(system).await);
        let m = ok("media state", d.media_state(system).await).expect("profile says virtual media");
        assert!(!m.inserted, "conformance: ejected, reads {m:?}");
    }
}

/// Provision from `boot`, check power on; deprovision, check power off and no override.
pub async fn lifecycle(d: &dyn BareMetal, system: &str, boot: BootSource, settle: Duration) {
    let req = ProvisionRequest {
        boot,
        boot_mode: None,
        power_timeout_ms: Some(settle.as_millis() as u64),
    };
    let st = ok(
        "provision",
        d.provision(system, &req, &crate::types::no_progress).await,
    );
    assert_eq!(
        st.power,
        PowerState::On,
        "conformance: provisioned machine reads {st:?}"
    );
    let st = ok("deprovision", d.deprovision(system, settle).await);
    assert_eq!(
        st.power,
        PowerState::Off,
        "conformance: deprovisioned machine reads {st:?}"
    );
    assert_eq!(
        st.boot.device,
        BootDevice::None,
        "conformance: deprovision left {st:?}"
    );
    assert!(
        !st.media.is_some_and(|m| m.inserted),
        "conformance: deprovision left media"
    );
    let st = ok("deprovision again", d.deprovision(system, settle).await);
    assert_eq!(
        st.power,
        PowerState::Off,
        "conformance: second deprovision reads {st:?}"
    );
}

/// A wrong password fails enrolment with `Auth` naming the BMC and the user, never the password.
pub async fn wrong_password(factory: &DriverFactory, good: &BmcEndpoint) {
    let bad_pw = "not-the-password"; // 16 bytes: fits IPMI v1.5 and v2.0 limits
    let ep = BmcEndpoint {
        password: Secret::new(bad_pw),
        ..good.clone()
    };
    let d = ok("create driver", factory(ep));
    let e = d.enrol().await.expect_err("enrol with a wrong password");
    assert_eq!(
        e.kind(),
        ErrorKind::Auth,
        "conformance: wrong password gave {e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains(d.endpoint()),
        "conformance: message does not name the BMC: {msg}"
    );
    assert!(
        msg.contains(&good.user),
        "conformance: message does not name the user: {msg}"
    );
    assert!(
        !msg.contains(bad_pw),
        "conformance: message shows the password: {msg}"
    );
    let _ = d.close().await;
}

/// An address where nothing answers fails with `Timeout` (or `Unreachable`) within the endpoint's
/// bound plus `slack`.
pub async fn unreachable(factory: &DriverFactory, dead: &BmcEndpoint, slack: Duration) {
    let bound = Duration::from_millis(dead.timeout_ms.expect("set timeout_ms for this check"));
    let d = ok("create driver", factory(dead.clone()));
    let start = Instant::now();
    let e = d.enrol().await.expect_err("enrol against a dead address");
    let took = start.elapsed();
    assert!(
        matches!(e.kind(), ErrorKind::Timeout | ErrorKind::Unreachable),
        "conformance: dead BMC gave {e}"
    );
    assert!(
        took <= bound + slack,
        "conformance: dead BMC took {took:?}, bound {bound:?}"
    );
    assert!(
        e.to_string().contains(d.endpoint()),
        "conformance: message lacks endpoint: {e}"
    );
}
