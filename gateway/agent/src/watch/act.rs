//! Converging actions against the providers, through the same drivers and sessions as the
//! commands: create a VM (marked with the machine's incarnation, so a create repeated after a
//! restart finds the VM instead of making a twin), power a VM or a bare-metal system, delete a VM.
//! Each is journaled before it starts and again with its result (see [`super`]).

use std::sync::Arc;
use std::time::Duration;

use pcg_proto::machines::{DesiredPower, Provider};
use pcg_provider::vm::{VmProvider, VmSpec};
use pcg_provider::{no_progress, PowerAction, PowerState};

use crate::store::machines::{Action, LocalMachine};
use crate::Gateway;

/// How long a bare-metal power change may take to show.
const NODE_POWER_WAIT: Duration = Duration::from_secs(60);

/// The VM driver of a vCenter or cloud enrolled as `name`.
async fn vm_driver(
    gw: &Gateway,
    provider: Provider,
    name: &str,
) -> Result<Arc<dyn VmProvider>, String> {
    match provider {
        Provider::Vsphere => {
            let ep: pcg_vsphere::VsphereEndpoint = crate::vsphere::ENROLLED
                .get(&gw.store, name)
                .map_err(|e| e.message)?;
            let d = crate::vsphere::service()
                .driver(&ep)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Arc::new(d))
        }
        Provider::Openstack => {
            let entry = crate::openstack::enrolled_entry(&gw.store, name).map_err(|e| e.message)?;
            let os = crate::openstack::service()
                .client(&entry)
                .await
                .map_err(|e| e.to_string())?;
            Ok(os)
        }
        Provider::BareMetal => Err("a bare-metal node is not a VM".into()),
    }
}

fn power_action(to: DesiredPower) -> (PowerAction, PowerState) {
    match to {
        DesiredPower::On => (PowerAction::On, PowerState::On),
        DesiredPower::Off => (PowerAction::Off, PowerState::Off),
    }
}

/// Runs `action` for `m`; the VM's id when it created one.
pub async fn execute(
    gw: &Gateway,
    m: &LocalMachine,
    action: &Action,
) -> Result<Option<String>, String> {
    let d = m
        .declaration
        .as_ref()
        .ok_or_else(|| "the machine has no declaration".to_string())?;
    let provider = d.provider();
    if provider == Provider::BareMetal {
        let Action::Power { to, provider_id } = action else {
            return Err(format!(
                "{} is not done to a bare-metal node",
                action.describe()
            ));
        };
        let driver = gw
            .bare_metal
            .driver(d.endpoint())
            .map_err(|e| e.to_string())?;
        let (act, want) = power_action(*to);
        driver
            .power(provider_id, act)
            .await
            .map_err(|e| e.to_string())?;
        driver
            .wait_power(provider_id, want, NODE_POWER_WAIT)
            .await
            .map_err(|e| e.to_string())?;
        return Ok(None);
    }
    let vm = vm_driver(gw, provider, d.endpoint()).await?;
    match action {
        Action::Create { mark, .. } => {
            let mut spec = d.vm().map(|t| t.vm.clone()).unwrap_or_default();
            if let Some(o) = spec.as_object_mut() {
                o.insert(
                    "power_on".into(),
                    serde_json::Value::Bool(d.power == DesiredPower::On),
                );
            }
            let spec: VmSpec = serde_json::from_value(spec)
                .map_err(|e| format!("the VM spec of the declaration: {e}"))?;
            let info = vm
                .create(mark, &spec, &no_progress)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Some(info.id))
        }
        Action::Power { to, provider_id } => {
            vm.power(provider_id, power_action(*to).0)
                .await
                .map_err(|e| e.to_string())?;
            Ok(None)
        }
        Action::Delete { provider_id } => {
            vm.delete(provider_id, &no_progress)
                .await
                .map_err(|e| e.to_string())?;
            Ok(None)
        }
    }
}
