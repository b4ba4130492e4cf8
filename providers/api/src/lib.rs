//! pcg-provider: the contract between the gateway and its providers.
//!
//! # Contract
//!
//! A bare-metal driver ([`BareMetal`]) is bound to one BMC (one [`BmcEndpoint`]). Every request
//! to the BMC is bounded in time (the endpoint's `timeout_ms` or the driver's default; an
//! operation makes a few requests, and waits such as `wait_power` take their own bound), and
//! every operation fails with one [`ProviderError`], whose message names the endpoint (and user, for credentials) and says what to
//! do. Passwords never appear in messages, logs or `Debug` output ([`Secret`]).
//!
//! - **enrol** logs in (so a wrong password fails here, as `Auth`), discovers the systems behind
//!   the BMC and records a [`Capabilities`] profile (power actions, boot devices, virtual media,
//!   settle times, protocol details). Repeating it refreshes the profile; it changes nothing on the
//!   BMC.
//! - **power_state** reads; it never changes anything.
//! - **power** asks for one action and returns when the BMC accepted it (and any task it started
//!   finished). `On` and `Off` are idempotent: already in that state is success without action.
//!   `Cycle` and `Reset` act every time they are called — the gateway's journal, not the driver,
//!   makes a command act once. The state may settle later: use **wait_power**, which polls.
//! - **set_boot_override** is idempotent (setting the same override twice is one override);
//!   `BootDevice::None` clears it. **boot_override** reads it back.
//! - **insert_media** replaces whatever image was inserted; inserting the same image again is a
//!   no-op in effect. **eject_media** with nothing inserted succeeds. Where the BMC has no virtual
//!   media both fail with `Unsupported`.
//! - **provision** = boot source (PXE, or virtual-media ISO + boot from CD once) + power cycle (power
//!   on when off) + wait for power on within the bound. Re-running it reboots the machine again.
//! - **deprovision** = hard power off + wait for off + clear the boot override + eject media. It is
//!   idempotent.
//! - **get** reads power, boot override and media.
//! - **close** releases every session the driver holds on the BMC; drivers also release sessions
//!   on drop where they can, and never leave a session open after an error.
//!
//! Command payloads for the gateway's executor are in [`command`] (with
//! [`command::BareMetalService`], enrolled BMCs by name); the conformance suite every driver runs
//! against its real peer is in `conformance` (feature `conformance`).

pub mod baremetal;
pub mod command;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod error;
pub mod sessions;
pub mod tls;
pub mod types;
pub mod vm;

pub use baremetal::{BareMetal, DriverFactory, DEFAULT_POWER_WAIT};
pub use error::{Component, ErrorKind, ProviderError, Result};
pub use sessions::Sessions;
pub use types::*;

/// Re-exported so drivers implement [`BareMetal`] with the same macro.
pub use async_trait::async_trait;
