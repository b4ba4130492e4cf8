//! The `BareMetal` trait: one BMC, its systems, and the machine lifecycle built on its primitives.

use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::error::{ProviderError, Result};
use crate::types::{
    BootDevice, BootOverride, BootPersistence, BootSource, Capabilities, MachineStatus, MediaState,
    PowerAction, PowerState, ProgressSink, ProvisionRequest, TaskProgress, TaskState,
};

/// Default bound on waiting for a power state after a provision's power cycle.
pub const DEFAULT_POWER_WAIT: Duration = Duration::from_secs(60);

/// A driver bound to one BMC. See the crate documentation for the contract of each operation.
#[async_trait]
pub trait BareMetal: Send + Sync {
    /// The BMC address as configured (for messages).
    fn endpoint(&self) -> &str;

    /// Logs in (checking the credentials), discovers the systems and records what the BMC offers.
    async fn enrol(&self) -> Result<Capabilities>;

    /// The capability profile recorded by the last successful [`BareMetal::enrol`], if any.
    fn capabilities(&self) -> Option<Capabilities>;

    /// The current power state of `system`.
    async fn power_state(&self, system: &str) -> Result<PowerState>;

    /// Requests a power action. Returns once the BMC accepted it (and any task it started has
    /// finished); the state may settle later (see [`BareMetal::wait_power`]). `On` and `Off` are
    /// no-ops when the machine is already in that state.
    async fn power(&self, system: &str, action: PowerAction) -> Result<()>;

    /// Sets the boot override (device, persistence, mode). `BootDevice::None` clears it.
    async fn set_boot_override(&self, system: &str, boot: &BootOverride) -> Result<()>;

    /// Reads the boot override back.
    async fn boot_override(&self, system: &str) -> Result<BootOverride>;

    /// Inserts a virtual-media image (CD/DVD) fetched by the BMC from `image_url`, replacing any
    /// other image. `Unsupported` where the BMC has no virtual media.
    async fn insert_media(&self, system: &str, image_url: &str) -> Result<()>;

    /// Ejects the virtual-media image; a no-op when none is inserted.
    async fn eject_media(&self, system: &str) -> Result<()>;

    /// The virtual-media state, `None` where the BMC has no virtual media.
    async fn media_state(&self, system: &str) -> Result<Option<MediaState>>;

    /// Releases every session held on the BMC. The driver stays usable (it logs in again).
    async fn close(&self) -> Result<()>;

    /// Convenience: power on.
    async fn power_on(&self, system: &str) -> Result<()> {
        self.power(system, PowerAction::On).await
    }

    /// Convenience: hard power off.
    async fn power_off(&self, system: &str) -> Result<()> {
        self.power(system, PowerAction::Off).await
    }

    /// Polls the power state until it equals `want` or `bound` passes (then `Timeout`).
    async fn wait_power(&self, system: &str, want: PowerState, bound: Duration) -> Result<()> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            if self.power_state(system).await? == want {
                return Ok(());
            }
            if start.elapsed() >= bound {
                return Err(ProviderError::Timeout {
                    component: crate::Component::Bmc,
                    endpoint: self.endpoint().to_owned(),
                    operation: format!("waiting for power {want:?} of system {system}"),
                    after: bound,
                });
            }
            tokio::time::sleep(delay.min(bound.saturating_sub(start.elapsed()))).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }

    /// The observed state of `system`: power, boot override and media.
    async fn get(&self, system: &str) -> Result<MachineStatus> {
        Ok(MachineStatus {
            system: system.to_owned(),
            power: self.power_state(system).await?,
            boot: self.boot_override(system).await?,
            media: self.media_state(system).await?,
        })
    }

    /// Provision: set the boot source (PXE, or insert the ISO and boot from CD once), power cycle
    /// (or power on when off), and wait until the machine reports power on.
    async fn provision(
        &self,
        system: &str,
        req: &ProvisionRequest,
        progress: ProgressSink<'_>,
    ) -> Result<MachineStatus> {
        let device = match &req.boot {
            BootSource::Pxe => BootDevice::Pxe,
            BootSource::VirtualMedia { image_url } => {
                progress(&TaskProgress::running(10, format!("inserting {image_url}")));
                self.insert_media(system, image_url).await?;
                BootDevice::Cd
            }
        };
        progress(&TaskProgress::running(
            30,
            format!("boot override {device:?}"),
        ));
        self.set_boot_override(
            system,
            &BootOverride {
                device,
                persistence: BootPersistence::Once,
                mode: req.boot_mode,
            },
        )
        .await?;
        let action = match self.power_state(system).await? {
            PowerState::Off | PowerState::PoweringOff => PowerAction::On,
            _ => PowerAction::Cycle,
        };
        progress(&TaskProgress::running(50, format!("power {action:?}")));
        self.power(system, action).await?;
        let bound = req
            .power_timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_POWER_WAIT);
        progress(&TaskProgress::running(70, "waiting for power on"));
        self.wait_power(system, PowerState::On, bound).await?;
        let status = self.get(system).await?;
        progress(&TaskProgress {
            state: TaskState::Completed,
            percent: Some(100),
            message: "provisioned".into(),
        });
        Ok(status)
    }

    /// Deprovision: hard power off, wait for off, clear the boot override and eject any media.
    /// Idempotent.
    async fn deprovision(&self, system: &str, bound: Duration) -> Result<MachineStatus> {
        self.power(system, PowerAction::Off).await?;
        self.wait_power(system, PowerState::Off, bound).await?;
        self.set_boot_override(system, &BootOverride::NONE).await?;
        if self.media_state(system).await?.is_some_and(|m| m.inserted) {
            self.eject_media(system).await?;
        }
        self.get(system).await
    }
}

/// Makes a driver for an endpoint (used by the conformance suite and by the gateway's registry).
pub type DriverFactory =
    dyn Fn(crate::types::BmcEndpoint) -> Result<Box<dyn BareMetal>> + Send + Sync;
