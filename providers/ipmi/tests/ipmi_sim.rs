//! pcg-ipmi against its real peer, ipmi_sim, with ipmitool as the reference reader: the provider
//! conformance suite, read-back by ipmitool, session hygiene and loss tolerance.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::IpmiSim;
use pcg_ipmi::{IpmiDriver, SYSTEM};
use pcg_provider::{conformance, BareMetal, BootDevice, BootOverride, BootSource, PowerAction};

const SETTLE: Duration = Duration::from_secs(10);

#[tokio::test]
async fn ipmi_enrol_records_profile() {
    let Some(bmc) = IpmiSim::start() else { return };
    let d = IpmiDriver::new(&bmc.endpoint()).unwrap();
    let caps = conformance::enrol(&d).await;
    assert_eq!(caps.systems, vec![SYSTEM.to_owned()]);
    assert_eq!(caps.details["device"]["ipmi_version"], "2.0", "{caps:?}");
    assert!(!caps.virtual_media);
    d.close().await.unwrap();
}

#[tokio::test]
async fn ipmi_power_round_trip_read_back_by_ipmitool() {
    let Some(bmc) = IpmiSim::start() else { return };
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
    // (on, cycle = off + on, off, then on, off).
    let sets = bmc
        .actions()
        .lines()
        .filter(|l| l.contains(" set power "))
        .count();
    assert_eq!(sets, 6, "actions:\n{}", bmc.actions());
    d.close().await.unwrap();
}

#[tokio::test]
async fn ipmi_reset_and_soft_shutdown() {
    let Some(bmc) = IpmiSim::start() else { return };
    let d = IpmiDriver::new(&bmc.endpoint()).unwrap();
    let caps = conformance::enrol(&d).await;
    conformance::power_reset(&d, SYSTEM, &caps, SETTLE).await;
    let log = bmc.actions();
    assert!(
        log.contains("set reset") && log.contains("set shutdown"),
        "actions:\n{log}"
    );
    d.close().await.unwrap();
}

#[tokio::test]
async fn ipmi_boot_override_read_back_by_ipmitool() {
    let Some(bmc) = IpmiSim::start() else { return };
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

#[tokio::test]
async fn ipmi_provision_lifecycle_pxe() {
    let Some(bmc) = IpmiSim::start() else { return };
    let d = IpmiDriver::new(&bmc.endpoint()).unwrap();
    conformance::enrol(&d).await;
    conformance::lifecycle(&d, SYSTEM, BootSource::Pxe, SETTLE).await;
    let log = bmc.actions();
    assert!(log.contains("set boot pxe"), "actions:\n{log}");
    assert!(log.contains("set boot none"), "actions:\n{log}");
    d.close().await.unwrap();
}

#[tokio::test]
async fn ipmi_wrong_password_is_auth_error_and_leaks_nothing() {
    let Some(bmc) = IpmiSim::start() else { return };
    for _ in 0..3 {
        conformance::wrong_password(&IpmiDriver::factory, &bmc.endpoint()).await;
    }
    assert!(bmc
        .ipmitool(&["chassis", "power", "status"])
        .contains("Chassis Power"));
    assert_eq!(bmc.active_sessions(), 1, "only ipmitool's own session");
}
