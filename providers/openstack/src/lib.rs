//! pcg-openstack: the OpenStack driver. Keystone v3 authentication (password, application
//! credential; clouds.yaml or `OS_*` variables, read as openstackclient reads them) and Nova
//! servers (create idempotent by command id, get, list, delete, power, waits), through osauth's
//! session on rustls.
//!
//! - [`config`]: where the cloud is and how to log in ([`CloudRef`], [`CloudEntry`]).
//! - [`client`]: [`OpenStack`], the Nova/Glance/Neutron calls on one session.
//! - [`vm`]: the [`pcg_provider::vm::VmProvider`] implementation.
//! - [`command`]: the `openstack.*` command payloads the gateway executes.

pub mod client;
pub mod command;
pub mod config;
mod error;
pub mod vm;

pub use client::{Named, OpenStack, Server, ServerSpec, COMMAND_ID_KEY};
pub use config::{CloudEntry, CloudRef};
