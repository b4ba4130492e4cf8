//! Bare-metal commands (`baremetal.enrol`, `.power`, `.provision`, `.deprovision`, `.get`) in the
//! executor, on the IPMI and Redfish drivers.
//!
//! `baremetal.enrol` checks the credentials, records the BMC's capability profile, and stores the
//! endpoint under a name (its password sealed like the gateway's private key); the other commands
//! name that BMC. One driver per BMC is kept, so sessions are shared and reused.
//!
//! Exactly once in effect: after a restart, a journaled command that was interrupted is executed
//! again only when doing so cannot repeat an effect (enrol, get, power on/off, soft shutdown and
//! deprovision converge to the same state). An interrupted power cycle, reset or provision (which
//! power-cycles) fails with `interrupted` and the machine's current state instead, so no server is
//! rebooted twice; the operator decides whether to send it again.

use std::collections::HashMap;
use std::sync::Arc;

use pcg_provider::command::{self, BareMetalCommand, Protocol};
use pcg_provider::{BareMetal, BmcEndpoint, PowerAction, ProviderError};
use serde_json::{json, Value};

use crate::executor::{ExecContext, ExecError, Registry};
use crate::store::{now_ms, BmcRecord};
use crate::Gateway;

/// Drivers of enrolled BMCs, by name.
#[derive(Default)]
pub struct Drivers(tokio::sync::Mutex<HashMap<String, Arc<dyn BareMetal>>>);

fn driver_for(protocol: Protocol, ep: &BmcEndpoint) -> Result<Arc<dyn BareMetal>, ProviderError> {
    Ok(match protocol {
        Protocol::Ipmi => Arc::new(pcg_ipmi::IpmiDriver::new(ep)?),
        Protocol::Redfish => Arc::new(pcg_redfish::RedfishDriver::new(ep)?),
    })
}

fn exec_error(e: ProviderError) -> ExecError {
    let class = serde_json::to_value(e.kind())
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "provider".into());
    ExecError::new(&class, e.to_string())
}

fn protocol_name(p: Protocol) -> String {
    serde_json::to_value(p)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Whether running `cmd` a second time could repeat an effect.
fn repeats_an_effect(cmd: &BareMetalCommand) -> bool {
    match cmd {
        BareMetalCommand::Power(p) => matches!(p.action, PowerAction::Cycle | PowerAction::Reset),
        BareMetalCommand::Provision(_) => true,
        _ => false,
    }
}

impl Drivers {
    /// The driver of the BMC enrolled as `name`.
    async fn get(&self, gw: &Gateway, name: &str) -> Result<Arc<dyn BareMetal>, ExecError> {
        let mut m = self.0.lock().await;
        if let Some(d) = m.get(name) {
            return Ok(d.clone());
        }
        let rec = gw
            .store
            .bmc(name)
            .map_err(|e| ExecError::new("storage", e.to_string()))?
            .ok_or_else(|| {
                let known = gw.store.bmc_names();
                ExecError::new(
                    "not_found",
                    format!(
                        "no BMC is enrolled as {name:?} on this gateway (enrolled: {}); send baremetal.enrol first",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    ),
                )
            })?;
        let ep: BmcEndpoint = gw
            .store
            .unseal(&rec.endpoint_sealed)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| {
                ExecError::new(
                    "storage",
                    format!(
                        "the stored credentials of BMC {name:?} cannot be read; enrol it again"
                    ),
                )
            })?;
        let protocol: Protocol = serde_json::from_value(Value::String(rec.protocol.clone()))
            .map_err(|e| ExecError::new("storage", e.to_string()))?;
        let d = driver_for(protocol, &ep).map_err(exec_error)?;
        m.insert(name.to_string(), d.clone());
        Ok(d)
    }
}

async fn handle(ctx: ExecContext, payload: Value) -> Result<Value, ExecError> {
    let gw = ctx.gateway.clone();
    let cmd = BareMetalCommand::parse_value(&ctx.kind, payload)
        .map_err(exec_error)?
        .ok_or_else(|| {
            ExecError::new(
                "unknown_kind",
                format!("{} is not a bare-metal command", ctx.kind),
            )
        })?;
    if let BareMetalCommand::Enrol(c) = &cmd {
        let driver = driver_for(c.protocol, &c.endpoint).map_err(exec_error)?;
        let out = command::execute(driver.as_ref(), &cmd, &pcg_provider::no_progress)
            .await
            .map_err(exec_error)?;
        let rec = BmcRecord {
            name: c.name.clone(),
            protocol: protocol_name(c.protocol),
            endpoint_sealed: gw
                .store
                .seal(&serde_json::to_vec(&c.endpoint).expect("endpoints serialise")),
            capabilities: out.get("capabilities").cloned().unwrap_or(Value::Null),
            enrolled_ms: now_ms(),
        };
        gw.store
            .put_bmc(&rec)
            .map_err(|e| ExecError::new("storage", e.to_string()))?;
        gw.store
            .flush()
            .await
            .map_err(|e| ExecError::new("storage", e.to_string()))?;
        gw.drivers.0.lock().await.insert(c.name.clone(), driver);
        return Ok(out);
    }
    let driver = gw.drivers.get(&gw, cmd.bmc()).await?;
    if ctx.recovered && repeats_an_effect(&cmd) {
        let state = match &cmd {
            BareMetalCommand::Power(p) => p.system.clone(),
            _ => None,
        };
        let current = match state.or_else(|| {
            driver
                .capabilities()
                .and_then(|c| c.default_system().map(str::to_owned))
        }) {
            Some(system) => driver.power_state(&system).await.ok().map(|s| json!(s)),
            None => None,
        };
        return Err(ExecError::new(
            "interrupted",
            format!(
                "the gateway restarted while this {} was running on BMC {:?}; it may or may not have taken effect, so it is not repeated (current power state: {}); send it again if needed",
                cmd.kind(),
                cmd.bmc(),
                current.map(|v| v.to_string()).unwrap_or_else(|| "unknown".into())
            ),
        ));
    }
    command::execute(driver.as_ref(), &cmd, &pcg_provider::no_progress)
        .await
        .map_err(exec_error)
}

/// Adds the bare-metal commands to `r`.
pub fn register(r: &mut Registry) {
    for kind in command::KINDS {
        r.register(kind, handle);
    }
}
