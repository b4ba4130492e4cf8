//! pcg-redfish: the bare-metal driver for Redfish BMCs.
//!
//! [`RedfishDriver`] implements [`pcg_provider::BareMetal`] on a thin client of our own
//! ([`client::Client`]: reqwest + rustls with manual roots, serde models in [`model`]). Enrolment
//! logs in (session, or basic auth where the service has no SessionService), discovers Systems and
//! Managers, and records a capability profile: reset types from `ResetType@Redfish.AllowableValues`,
//! boot override targets, where virtual media lives (under the System or its Manager), whether
//! the service gives ETags, and the auth mode. Operations use that profile.

pub mod client;
pub mod model;
pub mod tls;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use pcg_provider::{
    async_trait, BareMetal, BmcEndpoint, BootDevice, BootMode, BootOverride, BootPersistence,
    Capabilities, MediaState, PowerAction, PowerState, ProviderError, Result,
};
use reqwest::Method;
use serde_json::{json, Value};

use crate::client::Client;
use crate::model::{Collection, Link, Manager, System, VirtualMedia};

/// How long a power change may take to show on a Redfish service (some apply it seconds after
/// the Reset answered).
pub const POWER_SETTLE: Duration = Duration::from_secs(30);

/// What enrolment learnt about one system.
#[derive(Debug, Clone, Default)]
struct SystemInfo {
    /// `@odata.id` of the ComputerSystem.
    path: String,
    /// Reset action target.
    reset_target: String,
    /// Allowed ResetType values (empty: the service did not say; standard values assumed).
    reset_types: Vec<String>,
    /// Allowed boot override targets (empty: not stated).
    boot_targets: Vec<String>,
    /// VirtualMedia collection (under the System or its Manager).
    media_collection: Option<String>,
    /// The CD/DVD slot, found on first use.
    media_slot: Option<String>,
}

impl SystemInfo {
    fn allows(&self, reset: &str) -> bool {
        if self.reset_types.is_empty() {
            matches!(
                reset,
                "On" | "ForceOff" | "GracefulShutdown" | "ForceRestart" | "GracefulRestart"
            )
        } else {
            self.reset_types.iter().any(|t| t == reset)
        }
    }
}

/// A Redfish driver bound to one service.
#[derive(Debug)]
pub struct RedfishDriver {
    client: Client,
    systems: Mutex<HashMap<String, SystemInfo>>,
    caps: Mutex<Option<Capabilities>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means another task panicked mid-update of a cache; the data is
    // still a valid cache.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn device_to_target(d: BootDevice) -> &'static str {
    match d {
        BootDevice::None => "None",
        BootDevice::Pxe => "Pxe",
        BootDevice::Disk => "Hdd",
        BootDevice::Cd => "Cd",
        BootDevice::BiosSetup => "BiosSetup",
    }
}

fn target_to_device(t: &str) -> Option<BootDevice> {
    Some(match t {
        "None" => BootDevice::None,
        "Pxe" => BootDevice::Pxe,
        "Hdd" => BootDevice::Disk,
        "Cd" => BootDevice::Cd,
        "BiosSetup" => BootDevice::BiosSetup,
        _ => return None,
    })
}

fn power_state(s: Option<&str>) -> PowerState {
    match s {
        Some("On") => PowerState::On,
        Some("Off") => PowerState::Off,
        Some("PoweringOn") => PowerState::PoweringOn,
        Some("PoweringOff") => PowerState::PoweringOff,
        _ => PowerState::Unknown,
    }
}

impl RedfishDriver {
    /// Creates a driver for `ep` (`https://host[:port]` with `tls` trust). Does no I/O.
    pub fn new(ep: &BmcEndpoint) -> Result<Self> {
        Ok(Self {
            client: Client::new(ep)?,
            systems: Mutex::new(HashMap::new()),
            caps: Mutex::new(None),
        })
    }

    /// A factory for the conformance suite and the gateway's registry.
    pub fn factory(ep: BmcEndpoint) -> Result<Box<dyn BareMetal>> {
        Ok(Box::new(Self::new(&ep)?))
    }

    /// The HTTP client (for callers that need a raw resource).
    pub fn client(&self) -> &Client {
        &self.client
    }

    async fn get_as<T: serde::de::DeserializeOwned + Default>(
        &self,
        path: &str,
    ) -> Result<(T, Option<String>)> {
        let r = self.client.get(path).await?;
        let v = model::parse(&r.body).map_err(|e| ProviderError::ProviderFault {
            endpoint: self.client.endpoint().to_owned(),
            message: format!("GET {path}: unexpected body: {e}"),
        })?;
        Ok((v, r.etag))
    }

    async fn info(&self, system: &str) -> Result<SystemInfo> {
        if lock(&self.systems).is_empty() {
            self.enrol().await?;
        }
        lock(&self.systems)
            .get(system)
            .cloned()
            .ok_or_else(|| ProviderError::NotFound {
                component: pcg_provider::Component::Bmc,
                endpoint: self.client.endpoint().to_owned(),
                what: format!("system {system:?}"),
            })
    }

    async fn system(&self, system: &str) -> Result<(System, Option<String>, SystemInfo)> {
        let info = self.info(system).await?;
        let (s, etag) = self.get_as::<System>(&info.path).await?;
        Ok((s, etag, info))
    }

    async fn reset(&self, info: &SystemInfo, reset_type: &str) -> Result<()> {
        tracing::debug!(endpoint = %self.client.endpoint(), system = %info.path, reset_type, "redfish reset");
        let r = self
            .client
            .act(
                Method::POST,
                &info.reset_target,
                &json!({ "ResetType": reset_type }),
                None,
                POWER_SETTLE,
            )
            .await?;
        // Record how this service answers a Reset (200, 202 + task, 204) in the profile.
        if let Some(caps) = lock(&self.caps).as_mut() {
            caps.details["reset_answer"] = json!(r.status.as_u16());
        }
        Ok(())
    }

    fn unsupported(&self, what: String) -> ProviderError {
        ProviderError::Unsupported {
            endpoint: self.client.endpoint().to_owned(),
            what,
        }
    }

    /// Finds (and caches) the CD/DVD virtual media slot of a system.
    async fn media_slot(&self, system: &str) -> Result<Option<String>> {
        let info = self.info(system).await?;
        if let Some(slot) = info.media_slot {
            return Ok(Some(slot));
        }
        let Some(coll) = info.media_collection else {
            return Ok(None);
        };
        let (c, _) = self.get_as::<Collection>(&coll).await?;
        let mut chosen = None;
        for m in &c.members {
            let (vm, _) = self.get_as::<VirtualMedia>(&m.odata_id).await?;
            let is_cd = vm.media_types.iter().any(|t| t == "CD" || t == "DVD");
            if is_cd || vm.id.eq_ignore_ascii_case("cd") {
                chosen = Some(m.odata_id.clone());
                break;
            }
        }
        if let Some(slot) = &chosen {
            if let Some(i) = lock(&self.systems).get_mut(system) {
                i.media_slot = Some(slot.clone());
            }
        }
        Ok(chosen)
    }

    async fn require_slot(&self, system: &str) -> Result<String> {
        self.media_slot(system)
            .await?
            .ok_or_else(|| self.unsupported(format!("virtual media (CD/DVD) for system {system}")))
    }
}

#[async_trait]
impl BareMetal for RedfishDriver {
    fn endpoint(&self) -> &str {
        self.client.endpoint()
    }

    async fn enrol(&self) -> Result<Capabilities> {
        self.client.login().await?;
        let (root, _) = self.get_as::<model::ServiceRoot>("/redfish/v1/").await?;
        let systems_path = root
            .systems
            .map(|l| l.odata_id)
            .unwrap_or_else(|| "/redfish/v1/Systems".into());
        let (coll, _) = self.get_as::<Collection>(&systems_path).await?;
        let mut infos = HashMap::new();
        let mut ids = Vec::new();
        let mut first: Option<System> = None;
        let mut etags = false;
        let mut media_under = None;
        let mut manager: Option<Manager> = None;
        for Link { odata_id } in &coll.members {
            let (s, etag) = self.get_as::<System>(odata_id).await?;
            etags |= etag.is_some();
            let id = if s.id.is_empty() {
                odata_id.rsplit('/').next().unwrap_or_default().to_owned()
            } else {
                s.id.clone()
            };
            let mut reset = s
                .actions
                .as_ref()
                .and_then(|a| a.reset.clone())
                .unwrap_or_default();
            if reset.allowable.is_empty() {
                // Some services list the reset types in an ActionInfo resource instead.
                if let Some(info) = reset.action_info.clone() {
                    let (ai, _) = self.get_as::<model::ActionInfo>(&info).await?;
                    reset.allowable = ai.allowable("ResetType");
                }
            }
            let mut media_collection = s.virtual_media.as_ref().map(|l| l.odata_id.clone());
            if media_collection.is_some() {
                media_under.get_or_insert("Systems");
            }
            let managed_by = s.links.as_ref().and_then(|l| l.managed_by.first().cloned());
            if let Some(m) = managed_by {
                if media_collection.is_none() || manager.is_none() {
                    let (mgr, _) = self.get_as::<Manager>(&m.odata_id).await?;
                    if media_collection.is_none() {
                        media_collection = mgr.virtual_media.as_ref().map(|l| l.odata_id.clone());
                        if media_collection.is_some() {
                            media_under.get_or_insert("Managers");
                        }
                    }
                    manager.get_or_insert(mgr);
                }
            }
            let info = SystemInfo {
                path: odata_id.clone(),
                reset_target: if reset.target.is_empty() {
                    format!("{odata_id}/Actions/ComputerSystem.Reset")
                } else {
                    reset.target
                },
                reset_types: reset.allowable,
                boot_targets: s
                    .boot
                    .as_ref()
                    .map(|b| b.allowable_targets.clone())
                    .unwrap_or_default(),
                media_collection,
                media_slot: None,
            };
            infos.insert(id.clone(), info);
            ids.push(id);
            first.get_or_insert(s);
        }
        let first_info = ids
            .first()
            .and_then(|id| infos.get(id))
            .cloned()
            .unwrap_or_default();
        let mut power_actions = vec![PowerAction::On, PowerAction::Off];
        if first_info.allows("GracefulShutdown") {
            power_actions.push(PowerAction::SoftShutdown);
        }
        power_actions.push(PowerAction::Cycle);
        if first_info.allows("ForceRestart")
            || first_info.allows("PowerCycle")
            || first_info.allows("GracefulRestart")
        {
            power_actions.push(PowerAction::Reset);
        }
        let mut boot_devices = vec![BootDevice::None];
        if first_info.boot_targets.is_empty() {
            boot_devices.extend([
                BootDevice::Pxe,
                BootDevice::Disk,
                BootDevice::Cd,
                BootDevice::BiosSetup,
            ]);
        } else {
            boot_devices.extend(
                first_info
                    .boot_targets
                    .iter()
                    .filter_map(|t| target_to_device(t))
                    .filter(|d| *d != BootDevice::None),
            );
        }
        let caps = Capabilities {
            protocol: "redfish".into(),
            vendor: first.as_ref().and_then(|s| s.manufacturer.clone()),
            model: first.as_ref().and_then(|s| s.model.clone()),
            firmware: manager.as_ref().and_then(|m| m.firmware_version.clone()),
            systems: ids,
            power_actions,
            boot_devices,
            virtual_media: infos.values().any(|i| i.media_collection.is_some()),
            power_settle_ms: POWER_SETTLE.as_millis() as u64,
            details: json!({
                "redfish_version": root.redfish_version,
                "auth": self.client.auth_mode().await,
                "reset_types": first_info.reset_types,
                "boot_targets": first_info.boot_targets,
                "virtual_media_under": media_under,
                "etag": etags,
            }),
        };
        *lock(&self.systems) = infos;
        *lock(&self.caps) = Some(caps.clone());
        Ok(caps)
    }

    fn capabilities(&self) -> Option<Capabilities> {
        lock(&self.caps).clone()
    }

    async fn power_state(&self, system: &str) -> Result<PowerState> {
        let (s, _, _) = self.system(system).await?;
        Ok(power_state(s.power_state.as_deref()))
    }

    async fn power(&self, system: &str, action: PowerAction) -> Result<()> {
        let (s, _, info) = self.system(system).await?;
        let now = power_state(s.power_state.as_deref());
        let pick = |cands: &[&'static str]| cands.iter().copied().find(|c| info.allows(c));
        match action {
            PowerAction::On | PowerAction::Cycle if now == PowerState::Off => {
                let t = pick(&["On", "ForceOn"])
                    .ok_or_else(|| self.unsupported("ResetType On".into()))?;
                self.reset(&info, t).await
            }
            PowerAction::On => Ok(()),
            PowerAction::Off if now == PowerState::Off => Ok(()),
            PowerAction::Off => {
                let t = pick(&["ForceOff"])
                    .ok_or_else(|| self.unsupported("ResetType ForceOff".into()))?;
                self.reset(&info, t).await
            }
            PowerAction::SoftShutdown if now == PowerState::Off => Ok(()),
            PowerAction::SoftShutdown => {
                let t = pick(&["GracefulShutdown"])
                    .ok_or_else(|| self.unsupported("ResetType GracefulShutdown".into()))?;
                self.reset(&info, t).await
            }
            PowerAction::Cycle => {
                if info.allows("PowerCycle") {
                    return self.reset(&info, "PowerCycle").await;
                }
                // No PowerCycle: hard off, wait until off, on.
                self.reset(&info, "ForceOff").await?;
                self.wait_power(system, PowerState::Off, POWER_SETTLE)
                    .await?;
                let t = pick(&["On", "ForceOn"])
                    .ok_or_else(|| self.unsupported("ResetType On".into()))?;
                self.reset(&info, t).await
            }
            PowerAction::Reset => {
                let t = pick(&["ForceRestart", "PowerCycle", "GracefulRestart"])
                    .ok_or_else(|| self.unsupported("a hard reset ResetType".into()))?;
                self.reset(&info, t).await
            }
        }
    }

    async fn set_boot_override(&self, system: &str, boot: &BootOverride) -> Result<()> {
        let info = self.info(system).await?;
        let target = device_to_target(boot.device);
        let body = if boot.device == BootDevice::None {
            json!({"Boot": {"BootSourceOverrideEnabled": "Disabled", "BootSourceOverrideTarget": "None"}})
        } else {
            if !info.boot_targets.is_empty() && !info.boot_targets.iter().any(|t| t == target) {
                return Err(ProviderError::invalid(
                    "boot.device",
                    format!(
                        "{} accepts boot targets {:?}, not {target}",
                        self.endpoint(),
                        info.boot_targets
                    ),
                ));
            }
            let mut b = json!({
                "BootSourceOverrideEnabled": match boot.persistence {
                    BootPersistence::Once => "Once",
                    BootPersistence::Continuous => "Continuous",
                },
                "BootSourceOverrideTarget": target,
            });
            if let Some(mode) = boot.mode {
                b["BootSourceOverrideMode"] = Value::from(match mode {
                    BootMode::Legacy => "Legacy",
                    BootMode::Uefi => "UEFI",
                });
            }
            json!({ "Boot": b })
        };
        // PATCH with If-Match when the service gives ETags; one retry on a lost race (412).
        for attempt in 0..2 {
            let (_, etag, _) = self.system(system).await?;
            match self
                .client
                .act(
                    Method::PATCH,
                    &info.path,
                    &body,
                    etag.as_deref(),
                    POWER_SETTLE,
                )
                .await
            {
                Err(ProviderError::Conflict { .. }) if attempt == 0 && etag.is_some() => continue,
                other => return other.map(|_| ()),
            }
        }
        Ok(())
    }

    async fn boot_override(&self, system: &str) -> Result<BootOverride> {
        let (s, _, _) = self.system(system).await?;
        let b = s.boot.unwrap_or_default();
        let enabled = b.enabled.as_deref().unwrap_or("Disabled");
        let device = match (enabled, b.target.as_deref()) {
            ("Disabled", _) | (_, None) => BootDevice::None,
            (_, Some(t)) => target_to_device(t).unwrap_or(BootDevice::None),
        };
        Ok(BootOverride {
            device,
            persistence: if enabled == "Continuous" {
                BootPersistence::Continuous
            } else {
                BootPersistence::Once
            },
            mode: match b.mode.as_deref() {
                Some("UEFI") => Some(BootMode::Uefi),
                Some("Legacy") => Some(BootMode::Legacy),
                _ => None,
            },
        })
    }

    async fn insert_media(&self, system: &str, image_url: &str) -> Result<()> {
        let slot = self.require_slot(system).await?;
        let (vm, _) = self.get_as::<VirtualMedia>(&slot).await?;
        if vm.inserted == Some(true) {
            if vm.image.as_deref() == Some(image_url) {
                return Ok(());
            }
            self.eject_media(system).await?;
        }
        let insert = vm.actions.as_ref().and_then(|a| a.insert.clone());
        match insert {
            Some(a) if !a.target.is_empty() => {
                let body = json!({"Image": image_url, "Inserted": true, "WriteProtected": true});
                self.client
                    .act(Method::POST, &a.target, &body, None, POWER_SETTLE)
                    .await?;
            }
            _ => {
                let body = json!({"Image": image_url, "Inserted": true});
                self.client
                    .act(Method::PATCH, &slot, &body, None, POWER_SETTLE)
                    .await?;
            }
        }
        Ok(())
    }

    async fn eject_media(&self, system: &str) -> Result<()> {
        let slot = self.require_slot(system).await?;
        let (vm, _) = self.get_as::<VirtualMedia>(&slot).await?;
        let has_image = vm.image.as_deref().is_some_and(|i| !i.is_empty());
        if vm.inserted != Some(true) && !has_image {
            return Ok(());
        }
        let eject = vm.actions.as_ref().and_then(|a| a.eject.clone());
        match eject {
            Some(a) if !a.target.is_empty() => {
                self.client
                    .act(Method::POST, &a.target, &json!({}), None, POWER_SETTLE)
                    .await?;
            }
            _ => {
                let body = json!({"Image": null, "Inserted": false});
                self.client
                    .act(Method::PATCH, &slot, &body, None, POWER_SETTLE)
                    .await?;
            }
        }
        Ok(())
    }

    async fn media_state(&self, system: &str) -> Result<Option<MediaState>> {
        let Some(slot) = self.media_slot(system).await? else {
            return Ok(None);
        };
        let (vm, _) = self.get_as::<VirtualMedia>(&slot).await?;
        let image = vm.image.filter(|i| !i.is_empty());
        Ok(Some(MediaState {
            inserted: vm.inserted.unwrap_or(image.is_some()),
            image,
        }))
    }

    async fn close(&self) -> Result<()> {
        self.client.logout().await
    }
}
