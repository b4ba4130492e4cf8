//! pcg-ipmi against its real peers, ipmi_sim (Debian openipmi) and a BMC on pyghmi's BMC server
//! (the base of OpenStack's VirtualBMC), with ipmitool as the reference reader: the provider
//! conformance suite against both, read-back by ipmitool, session hygiene, loss tolerance and
//! slow Open Session answers.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{IpmiSim, LabBmc, PyghmiBmc};
use pcg_ipmi::{IpmiDriver, LanProtocol, SYSTEM};
use pcg_provider::{conformance, BareMetal, BootDevice, BootOverride, BootSource, PowerAction};

const SETTLE: Duration = Duration::from_secs(10);

/// One test per peer for a check written once against [`LabBmc`].
macro_rules! on_both_peers {
    ($($check:ident),* $(,)?) => {
        mod on_ipmi_sim {
            $(
                #[tokio::test]
                async fn $check() {
                    let Some(bmc) = super::IpmiSim::start() else { return };
                    let _ = super::$check(bmc).await;
                }
            )*
        }
        mod on_pyghmi {
            $(
                #[tokio::test]
                async fn $check() {
                    let Some(bmc) = super::PyghmiBmc::start() else { return };
                    let _ = super::$check(bmc).await;
                }
            )*
        }
    };
}

on_both_peers!(
    enrol_records_profile,
    power_round_trip_read_back_by_ipmitool,
    reset_and_soft_shutdown,
    boot_override_read_back_by_ipmitool,
    provision_lifecycle_pxe,
    wrong_password_is_auth_error,
    session_replaced_after_bmc_restart,
    command_after_35_s_idle,
    baremetal_commands_through_the_service,
);

async fn enrol_records_profile(bmc: impl LabBmc) {
    let d = IpmiDriver::new(&bmc.endpoint()).unwrap();
    let caps = conformance::enrol(&d).await;
    assert_eq!(caps.systems, vec![SYSTEM.to_owned()]);
    assert_eq!(caps.details["device"]["ipmi_version"], "2.0", "{caps:?}");
    assert!(!caps.virtual_media);
    assert_eq!(
        caps.details["transport"],
        "lanplus",
        "{} offers RMCP+: {caps:?}",
        bmc.name()
    );
    assert_eq!(caps.details["cipher_suite"], 3);
    d.close().await.unwrap();
}

#[tokio::test]
async fn ipmi_v15_md5_when_asked_read_back_by_ipmitool_lan() {
    let Some(bmc) = IpmiSim::start() else { return };
    let d = IpmiDriver::new(&bmc.endpoint())
        .unwrap()
        .with_protocol(LanProtocol::Lan15);
    let caps = conformance::enrol(&d).await;
    assert_eq!(caps.details["transport"], "lan", "{caps:?}");
    conformance::power_round_trip(&d, SYSTEM, SETTLE).await;
    d.power(SYSTEM, PowerAction::On).await.unwrap();
    assert!(bmc
        .ipmitool_v15(&["chassis", "power", "status"])
        .contains("Chassis Power is on"));
    d.set_boot_override(SYSTEM, &BootOverride::once(BootDevice::Cd))
        .await
        .unwrap();
    let out = bmc.ipmitool_v15(&["chassis", "bootparam", "get", "5"]);
    assert!(out.contains("Force Boot from CD/DVD"), "{out}");
    d.close().await.unwrap();
    // A wrong password over v1.5 is an Auth error too.
    let mut ep = bmc.endpoint();
    ep.password = "not-the-password".into();
    ep.timeout_ms = Some(2_000);
    let e = IpmiDriver::new(&ep)
        .unwrap()
        .with_protocol(LanProtocol::Lan15)
        .enrol()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), pcg_provider::ErrorKind::Auth, "{e}");
    assert_eq!(
        bmc.active_sessions(),
        1,
        "only ipmitool's own session may be active"
    );
}

async fn power_round_trip_read_back_by_ipmitool(bmc: impl LabBmc) {
    let d = IpmiDriver::new(&bmc.endpoint()).unwrap();
    conformance::enrol(&d).await;
    conformance::power_round_trip(&d, SYSTEM, SETTLE).await;
    d.power(SYSTEM, PowerAction::On).await.unwrap();
    assert!(bmc
        .ipmitool(&["chassis", "power", "status"])
        .contains("Chassis Power is on"));
    d.power(SYSTEM, PowerAction::Off).await.unwrap();
    assert!(bmc
        .ipmitool(&["chassis", "power", "status"])
        .contains("Chassis Power is off"));
    // Idempotent on/off did not reach the BMC: exactly the expected power writes were made
    // (on, cycle, off, then on, off; ipmi_sim's chassis program sees a cycle as off + on).
    let cycle = if bmc.name() == "ipmi_sim" { 2 } else { 1 };
    assert_eq!(
        bmc.power_changes(),
        4 + cycle,
        "actions:\n{}",
        bmc.actions()
    );
    d.close().await.unwrap();
}

async fn reset_and_soft_shutdown(bmc: impl LabBmc) {
    let d = IpmiDriver::new(&bmc.endpoint()).unwrap();
    let caps = conformance::enrol(&d).await;
    conformance::power_reset(&d, SYSTEM, &caps, SETTLE).await;
    let log = bmc.actions();
    assert!(
        log.contains("reset") && log.contains("shutdown"),
        "actions:\n{log}"
    );
    d.close().await.unwrap();
}

async fn boot_override_read_back_by_ipmitool(bmc: impl LabBmc) {
    let d = IpmiDriver::new(&bmc.endpoint()).unwrap();
    let caps = conformance::enrol(&d).await;
    conformance::boot_override_round_trip(&d, SYSTEM, &caps, false).await;
    for (device, text) in [
        (BootDevice::Pxe, "Force PXE"),
        (BootDevice::Disk, "Force Boot from default Hard-Drive"),
        (BootDevice::Cd, "Force Boot from CD/DVD"),
        (BootDevice::BiosSetup, "Force Boot into BIOS Setup"),
        (BootDevice::None, "No override"),
    ] {
        d.set_boot_override(SYSTEM, &BootOverride::once(device))
            .await
            .unwrap();
        let out = bmc.ipmitool(&["chassis", "bootparam", "get", "5"]);
        assert!(out.contains(text), "set {device:?}, ipmitool reads:\n{out}");
    }
    d.close().await.unwrap();
}

async fn provision_lifecycle_pxe(bmc: impl LabBmc) {
    let d = IpmiDriver::new(&bmc.endpoint()).unwrap();
    conformance::enrol(&d).await;
    conformance::lifecycle(&d, SYSTEM, BootSource::Pxe, SETTLE).await;
    let log = bmc.actions();
    // ipmi_sim's chassis program and VirtualBMC name the devices differently.
    assert!(
        log.contains("set boot pxe") || log.contains("set boot network"),
        "actions:\n{log}"
    );
    assert!(
        log.contains("set boot none") || log.contains("set boot default"),
        "actions:\n{log}"
    );
    d.close().await.unwrap();
}

async fn wrong_password_is_auth_error(bmc: impl LabBmc) {
    for _ in 0..3 {
        conformance::wrong_password(&IpmiDriver::factory, &bmc.endpoint()).await;
    }
    assert!(bmc
        .ipmitool(&["chassis", "power", "status"])
        .contains("Chassis Power"));
}

#[tokio::test]
async fn ipmi_wrong_password_leaks_no_session() {
    let Some(bmc) = IpmiSim::start() else { return };
    for _ in 0..3 {
        conformance::wrong_password(&IpmiDriver::factory, &bmc.endpoint()).await;
    }
    assert_eq!(bmc.active_sessions(), 1, "only ipmitool's own session");
}

#[tokio::test]
async fn ipmi_unreachable_and_silent_bmc_fail_within_bound() {
    // Nothing listens on the port: ICMP port unreachable (or silence) ends it within the bound.
    let mut ep = pcg_provider::BmcEndpoint::new(
        format!("127.0.0.1:{}", common::free_udp_port()),
        "admin",
        "pw",
    );
    ep.timeout_ms = Some(2_000);
    conformance::unreachable(&IpmiDriver::factory, &ep, Duration::from_millis(500)).await;

    // A BMC that never answers: Timeout within the bound, naming the endpoint.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    ep.address = silent.local_addr().unwrap().to_string();
    let start = std::time::Instant::now();
    let e = IpmiDriver::new(&ep).unwrap().enrol().await.unwrap_err();
    assert_eq!(e.kind(), pcg_provider::ErrorKind::Timeout, "{e}");
    assert!(
        start.elapsed() < Duration::from_millis(2_500),
        "{:?}",
        start.elapsed()
    );
    assert!(e.to_string().contains(&ep.address), "{e}");
}

#[tokio::test]
async fn ipmi_no_session_leaked_after_1000_operations() {
    let Some(bmc) = IpmiSim::start() else { return };
    let ep = bmc.endpoint();
    let mut ops = 0;
    // One driver, one session, reused.
    let d = IpmiDriver::new(&ep).unwrap();
    for i in 0..800 {
        if i % 100 == 0 {
            let dev = if i % 200 == 0 {
                BootDevice::Pxe
            } else {
                BootDevice::Disk
            };
            d.set_boot_override(SYSTEM, &BootOverride::once(dev))
                .await
                .unwrap();
        } else {
            d.power_state(SYSTEM).await.unwrap();
        }
        ops += 1;
    }
    assert_eq!(d.stats().await.sessions_opened, 1, "{:?}", d.stats().await);
    d.close().await.unwrap();
    // 100 short-lived drivers, closed explicitly: more sessions than ipmi_sim has slots (63)
    // and many more than the user may hold at once (10).
    for _ in 0..100 {
        let d = IpmiDriver::new(&ep).unwrap();
        d.power_state(SYSTEM).await.unwrap();
        d.close().await.unwrap();
        ops += 1;
    }
    // 100 more, only dropped: drop sends Close Session.
    for _ in 0..100 {
        let d = IpmiDriver::new(&ep).unwrap();
        d.power_state(SYSTEM).await.unwrap();
        drop(d);
        ops += 1;
    }
    assert_eq!(ops, 1000);
    assert!(bmc
        .ipmitool(&["chassis", "power", "status"])
        .contains("Chassis Power"));
    assert_eq!(
        bmc.active_sessions(),
        1,
        "only ipmitool's own session may be active"
    );
}

/// Returns the BMC, for checks of its own afterwards.
async fn session_replaced_after_bmc_restart<B: LabBmc>(mut bmc: B) -> B {
    let d = IpmiDriver::new(&bmc.endpoint()).unwrap();
    d.power(SYSTEM, PowerAction::On).await.unwrap();
    // The BMC reboots: our session id means nothing to it any more.
    bmc.restart();
    let start = std::time::Instant::now();
    assert_eq!(
        d.power_state(SYSTEM).await.unwrap(),
        pcg_provider::PowerState::On
    );
    let took = start.elapsed();
    let stats = d.stats().await;
    assert_eq!(stats.sessions_opened, 2, "{stats:?}");
    assert_eq!(stats.sessions_replaced, 1, "{stats:?}");
    assert!(took < Duration::from_secs(10), "recovery took {took:?}");
    eprintln!("session replaced after BMC restart in {took:?}");
    d.close().await.unwrap();
    bmc
}

/// A BMC built on pyghmi takes a reopened session for the closed one its source port had; a
/// session opened after an idle spell must not depend on the BMC having forgotten the old one.
async fn command_after_35_s_idle(bmc: impl LabBmc) {
    let d = IpmiDriver::new(&bmc.endpoint()).unwrap();
    conformance::enrol(&d).await;
    d.power(SYSTEM, PowerAction::On).await.unwrap();
    // The idle spell itself is what is tested: past the driver's 30 s idle limit.
    tokio::time::sleep(Duration::from_secs(35)).await;
    let start = std::time::Instant::now();
    let state = d
        .power_state(SYSTEM)
        .await
        .unwrap_or_else(|e| panic!("first command after 35 s idle on {}: {e}", bmc.name()));
    eprintln!(
        "{}: first command after 35 s idle took {:?}",
        bmc.name(),
        start.elapsed()
    );
    assert_eq!(state, pcg_provider::PowerState::On);
    let stats = d.stats().await;
    assert_eq!(stats.sessions_opened, 2, "{stats:?}");
    assert_eq!(
        stats.sessions_replaced, 0,
        "no session presumed dead: {stats:?}"
    );
    d.set_boot_override(SYSTEM, &BootOverride::once(BootDevice::Disk))
        .await
        .unwrap();
    d.close().await.unwrap();
    assert!(bmc
        .ipmitool(&["chassis", "bootparam", "get", "5"])
        .contains("Force Boot from default Hard-Drive"));
}

#[tokio::test]
async fn ipmi_session_restart_leaves_no_session() {
    let Some(bmc) = IpmiSim::start() else { return };
    let bmc = session_replaced_after_bmc_restart(bmc).await;
    assert_eq!(
        bmc.active_sessions(),
        1,
        "only ipmitool's own session may be active"
    );
}

#[tokio::test]
async fn ipmi_no_session_slots_is_a_clear_error() {
    let Some(bmc) = IpmiSim::start() else { return };
    // ipmi_sim has 63 session slots and drops Open Session silently when they are all taken.
    let mut held = Vec::new();
    let mut err = None;
    let mut ep = bmc.endpoint();
    ep.timeout_ms = Some(3_000);
    for _ in 0..70 {
        let d = IpmiDriver::new(&ep).unwrap();
        match d.power_state(SYSTEM).await {
            Ok(_) => held.push(d),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let e = err.expect("the BMC ran out of session slots");
    eprintln!("held {} sessions before the error", held.len());
    assert_eq!(e.kind(), pcg_provider::ErrorKind::NoSessionSlots, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("no free session slot") && msg.contains("admin"),
        "{msg}"
    );
    eprintln!("held {} sessions, then: {msg}", held.len());
    for d in &held {
        d.close().await.unwrap();
    }
    drop(held);
    assert_eq!(
        bmc.active_sessions(),
        1,
        "only ipmitool's own session may be active"
    );
}

#[tokio::test]
async fn ipmi_completes_through_a_relay_dropping_20_percent() {
    use std::sync::atomic::Ordering;
    let Some(bmc) = IpmiSim::start() else { return };
    let upstream = format!("127.0.0.1:{}", bmc.port).parse().unwrap();
    let relay = common::LossyRelay::start(upstream, 0.2, 0x5eed).await;
    let mut ep = bmc.endpoint();
    ep.address = relay.addr.to_string();
    ep.timeout_ms = Some(10_000);
    let bound = Duration::from_millis(10_000);
    let d = IpmiDriver::new(&ep).unwrap();
    let start = std::time::Instant::now();
    let mut slowest = Duration::ZERO;
    const OPS: usize = 100;
    for i in 0..OPS {
        let t = std::time::Instant::now();
        match i % 10 {
            0 => d.enrol().await.map(|_| ()),
            1 => d.power(SYSTEM, PowerAction::On).await,
            2 => {
                d.set_boot_override(SYSTEM, &BootOverride::once(BootDevice::Pxe))
                    .await
            }
            3 => d.boot_override(SYSTEM).await.map(|_| ()),
            4 => d.power(SYSTEM, PowerAction::Off).await,
            _ => d.power_state(SYSTEM).await.map(|_| ()),
        }
        .unwrap_or_else(|e| panic!("operation {i} failed through the lossy relay: {e}"));
        let took = t.elapsed();
        assert!(
            took <= bound,
            "operation {i} took {took:?}, bound {bound:?}"
        );
        slowest = slowest.max(took);
    }
    let total = start.elapsed();
    let stats = d.stats().await;
    d.close().await.unwrap();
    let dropped = relay.dropped.load(Ordering::Relaxed);
    let passed = relay.passed.load(Ordering::Relaxed);
    eprintln!(
        "{OPS} operations through 20% loss: total {total:?}, slowest {slowest:?}, \
         relay dropped {dropped} of {} datagrams, {stats:?}",
        dropped + passed
    );
    assert!(dropped > 0, "the relay dropped nothing");
    assert!(
        total < Duration::from_secs(60),
        "{OPS} operations took {total:?}"
    );
    assert_eq!(
        d.power_state(SYSTEM).await.unwrap(),
        pcg_provider::PowerState::Off
    );
    assert!(bmc
        .ipmitool(&["chassis", "power", "status"])
        .contains("Chassis Power is off"));
}

async fn baremetal_commands_through_the_service(bmc: impl LabBmc) {
    use pcg_provider::command::{self, BareMetalService, Protocol};
    let svc = BareMetalService::new().with_factory(Protocol::Ipmi, IpmiDriver::factory);
    let ep = serde_json::to_value(bmc.endpoint()).unwrap();
    let out = svc
        .handle(
            command::ENROL,
            serde_json::json!({"name": "rack1", "protocol": "ipmi", "endpoint": ep}),
        )
        .await
        .unwrap();
    assert_eq!(out["capabilities"]["systems"][0], SYSTEM);
    let prov = serde_json::json!({"spec": {"name": "n1",
        "placement": {"provider": "bare_metal", "bmc": "rack1", "boot": "pxe"}}, "power_timeout_ms": 10000});
    let out = svc.handle(command::PROVISION, prov).await.unwrap();
    assert_eq!(out["power"], "on", "{out}");
    assert!(bmc
        .ipmitool(&["chassis", "power", "status"])
        .contains("Chassis Power is on"));
    assert!(bmc
        .ipmitool(&["chassis", "bootparam", "get", "5"])
        .contains("Force PXE"));
    let out = svc
        .handle(command::GET, serde_json::json!({"bmc": "rack1"}))
        .await
        .unwrap();
    assert_eq!(out["boot"]["device"], "pxe", "{out}");
    let out = svc
        .handle(command::DEPROVISION, serde_json::json!({"bmc": "rack1"}))
        .await
        .unwrap();
    assert_eq!(
        (out["power"].as_str(), out["boot"]["device"].as_str()),
        (Some("off"), Some("none")),
        "{out}"
    );

    // Power answers the state after the change (and the one before); `status` only reads.
    let out = svc
        .handle(
            command::POWER,
            serde_json::json!({"bmc": "rack1", "action": "on"}),
        )
        .await
        .unwrap();
    assert_eq!(
        (out["state"].as_str(), out["previous"].as_str()),
        (Some("on"), Some("off")),
        "{out}"
    );
    let changes = bmc.power_changes();
    let out = svc
        .handle(
            command::POWER,
            serde_json::json!({"bmc": "rack1", "action": "status"}),
        )
        .await
        .unwrap();
    assert_eq!(out["state"], "on", "{out}");

    // The boot override alone, without a power change, read back by ipmitool. Neither ipmi_sim
    // nor VirtualBMC keeps persistence or the EFI flag: the result says what the BMC kept.
    for (device, text) in [
        ("disk", "Force Boot from default Hard-Drive"),
        ("bios_setup", "Force Boot into BIOS Setup"),
        ("cd", "Force Boot from CD/DVD"),
        ("pxe", "Force PXE"),
    ] {
        let out = svc
            .handle(
                command::BOOT,
                serde_json::json!({"bmc": "rack1", "device": device,
                    "persistence": "continuous", "mode": "uefi"}),
            )
            .await
            .unwrap();
        assert_eq!(out["boot"]["device"], device, "{out}");
        assert_eq!(out["power"], "on", "{out}");
        let seen = bmc.ipmitool(&["chassis", "bootparam", "get", "5"]);
        assert!(seen.contains(text), "set {device}, ipmitool reads:\n{seen}");
    }
    assert_eq!(
        bmc.power_changes(),
        changes,
        "boot overrides and status changed the power:\n{}",
        bmc.actions()
    );
    // IPMI has no virtual media: refused, naming the BMC.
    let e = svc
        .handle(
            command::INSERT_MEDIA,
            serde_json::json!({"bmc": "rack1", "image_url": "http://127.0.0.1:1/boot.iso"}),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), pcg_provider::ErrorKind::Unsupported, "{e}");
    svc.driver("rack1").unwrap().close().await.unwrap();
}

#[tokio::test]
async fn ipmi_fresh_sessions_through_a_lossy_relay_leak_nothing() {
    let Some(bmc) = IpmiSim::start() else { return };
    let upstream = format!("127.0.0.1:{}", bmc.port).parse().unwrap();
    let relay = common::LossyRelay::start(upstream, 0.2, 0xfeed).await;
    let mut ep = bmc.endpoint();
    ep.address = relay.addr.to_string();
    // A generous bound: at 20 % loss each way about a third of the Open Session exchanges fail
    // and are retried on the Open Session timer (1.2 s, then up to 3 s); this test is about
    // what is left on the BMC, not speed.
    ep.timeout_ms = Some(20_000);
    let start = std::time::Instant::now();
    let mut restarts = 0;
    const SESSIONS: usize = 10;
    for i in 0..SESSIONS {
        // A new driver each time: a full handshake through the loss, then Close Session.
        let d = IpmiDriver::new(&ep).unwrap();
        d.power_state(SYSTEM)
            .await
            .unwrap_or_else(|e| panic!("session {i} through the lossy relay: {e}"));
        restarts += d.stats().await.handshake_restarts;
        d.close().await.unwrap();
    }
    let took = start.elapsed();
    // Every session pcg completed is closed again. An Open Session whose answer the relay
    // dropped leaves a half-open session on the BMC (no keys were agreed, so nobody can close
    // it; the BMC expires it): that is counted, not failed.
    let established = bmc.established_sessions();
    let half_open = bmc.half_open_sessions();
    eprintln!(
        "{SESSIONS} fresh sessions through 20% loss in {took:?}, {restarts} handshake restarts; \
         afterwards {established} established (ipmitool's own) and {half_open} half-open"
    );
    assert_eq!(
        established,
        1,
        "only ipmitool's own session may be established:\n{}",
        bmc.ipmitool(&["session", "info", "all"])
    );
    assert!(
        took < Duration::from_secs(120),
        "{SESSIONS} sessions took {took:?}"
    );
}

/// Waits (polling, up to well under ipmi_sim's 60 s session expiry) until ipmi_sim holds no
/// half-open session, then checks that only ipmitool's own session is established.
fn assert_nothing_left(bmc: &IpmiSim, what: &str) {
    let start = std::time::Instant::now();
    loop {
        let half_open = bmc.half_open_sessions();
        if half_open == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{what}: {half_open} half-open sessions left on the BMC:\n{}",
            bmc.ipmitool(&["session", "info", "all"])
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        bmc.established_sessions(),
        1,
        "{what}: only ipmitool's own session may be established:\n{}",
        bmc.ipmitool(&["session", "info", "all"])
    );
}

/// Open Session answers held back by `delay` (a BMC slow to open sessions, as real ones are):
/// one enrolment, then 100 commands across 10 idle gaps (each forcing a new session), leave no
/// session behind on ipmi_sim, which opens a session for every Open Session copy it gets.
async fn slow_open_session_leaves_nothing(delay: Duration) {
    use std::sync::atomic::Ordering;
    let Some(bmc) = IpmiSim::start() else { return };
    let upstream = format!("127.0.0.1:{}", bmc.port).parse().unwrap();
    let relay = common::LossyRelay::start_with(
        upstream,
        common::Faults {
            open_session_delay: delay,
            ..common::Faults::default()
        },
    )
    .await;
    let mut ep = bmc.endpoint();
    ep.address = relay.addr.to_string();

    let d = IpmiDriver::new(&ep).unwrap();
    conformance::enrol(&d).await;
    d.close().await.unwrap();
    let stats = d.stats().await;
    drop(d);
    let enrol_opens = relay.open_requests.load(Ordering::Relaxed);
    eprintln!("{delay:?}: one enrolment sent {enrol_opens} Open Session requests, {stats:?}");
    assert_nothing_left(
        &bmc,
        &format!("one enrolment, Open Session answers {delay:?} late"),
    );

    let idle_limit = Duration::from_millis(800);
    let d = IpmiDriver::new(&ep).unwrap().with_idle_limit(idle_limit);
    for gap in 0..10 {
        for i in 0..10 {
            match i % 5 {
                0 => d.power(SYSTEM, PowerAction::On).await,
                1 => {
                    d.set_boot_override(SYSTEM, &BootOverride::once(BootDevice::Pxe))
                        .await
                }
                _ => d.power_state(SYSTEM).await.map(|_| ()),
            }
            .unwrap_or_else(|e| panic!("gap {gap}, command {i}: {e}"));
        }
        // The idle spell is what is tested: past the idle limit, so the next command opens a
        // new session.
        tokio::time::sleep(idle_limit + Duration::from_millis(200)).await;
    }
    d.close().await.unwrap();
    let stats = d.stats().await;
    drop(d);
    let opens = relay.open_requests.load(Ordering::Relaxed) - enrol_opens;
    eprintln!(
        "{delay:?}: 100 commands across 10 idle gaps sent {opens} Open Session requests, {stats:?}"
    );
    assert_eq!(
        stats.sessions_opened, 10,
        "one session per stretch: {stats:?}"
    );
    assert_nothing_left(
        &bmc,
        &format!("100 commands across 10 idle gaps, Open Session answers {delay:?} late"),
    );
}

#[tokio::test]
async fn ipmi_open_session_answered_after_400_ms_leaves_nothing() {
    slow_open_session_leaves_nothing(Duration::from_millis(400)).await;
}

#[tokio::test]
async fn ipmi_open_session_answered_after_1_s_leaves_nothing() {
    slow_open_session_leaves_nothing(Duration::from_secs(1)).await;
}

/// Cipher suite 17 (RAKP-HMAC-SHA256, HMAC-SHA256-128, AES-CBC-128). No packaged BMC offers it
/// (ipmi_sim and pyghmi's server stop at suite 3): the peer is pyghmi's BMC server extended by
/// the project's peer script, which ipmitool -C 17 checks independently here first.
#[tokio::test]
async fn pyghmi_cipher_suite_17_checked_by_ipmitool() {
    let Some(bmc) = PyghmiBmc::start_with_suite_17() else {
        return;
    };
    // The independent client agrees with the peer on suite 17.
    let out = common::ipmitool_suite_at(bmc.port, 17, &["chassis", "power", "status"]).unwrap();
    assert!(out.contains("Chassis Power is off"), "{out}");
    // pcg picks suite 17 from Get Channel Cipher Suites and runs the conformance checks on it.
    let d = IpmiDriver::new(&bmc.endpoint()).unwrap();
    let caps = conformance::enrol(&d).await;
    assert_eq!(caps.details["cipher_suite"], 17, "{caps:?}");
    assert_eq!(
        d.cipher_suite().await,
        Some(pcg_ipmi::CipherSuite::Seventeen)
    );
    conformance::power_round_trip(&d, SYSTEM, SETTLE).await;
    d.power(SYSTEM, PowerAction::On).await.unwrap();
    d.set_boot_override(SYSTEM, &BootOverride::once(BootDevice::Cd))
        .await
        .unwrap();
    let out =
        common::ipmitool_suite_at(bmc.port, 17, &["chassis", "bootparam", "get", "5"]).unwrap();
    assert!(out.contains("Force Boot from CD/DVD"), "{out}");
    let out = common::ipmitool_suite_at(bmc.port, 17, &["chassis", "power", "status"]).unwrap();
    assert!(out.contains("Chassis Power is on"), "{out}");
    d.close().await.unwrap();
    // A wrong password fails as Auth under suite 17 too.
    conformance::wrong_password(&IpmiDriver::factory, &bmc.endpoint()).await;
    // Suite 3 when asked for it, on the same BMC.
    let d = IpmiDriver::new(&bmc.endpoint())
        .unwrap()
        .with_cipher_suite(pcg_ipmi::CipherSuite::Three);
    let caps = conformance::enrol(&d).await;
    assert_eq!(caps.details["cipher_suite"], 3, "{caps:?}");
    d.close().await.unwrap();
}

/// A BMC that does not offer suite 17 (ipmi_sim refuses its algorithms) is not asked for it when
/// it lists its suites, and refuses it cleanly when forced: no session is left.
#[tokio::test]
async fn ipmi_sim_without_suite_17() {
    let Some(bmc) = IpmiSim::start() else { return };
    let d = IpmiDriver::new(&bmc.endpoint())
        .unwrap()
        .with_cipher_suite(pcg_ipmi::CipherSuite::Seventeen);
    let e = d.enrol().await.unwrap_err();
    assert_eq!(e.kind(), pcg_provider::ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("0x04"), "{e}");
    assert_eq!(bmc.active_sessions(), 1, "only ipmitool's own session");
}
