//! Bare-metal commands (`baremetal.enrol`, `.power`, `.boot`, `.insert_media`, `.eject_media`,
//! `.provision`, `.deprovision`, `.get`) in the executor, on pcg-provider's `BareMetalService`
//! with the IPMI and Redfish drivers.
//!
//! `baremetal.enrol` checks the credentials and records the BMC's capability profile; the gateway
//! then stores the endpoint under its name (password sealed like the gateway's private key) and
//! restores every enrolled BMC at start, so later commands only name the BMC.
//!
//! Exactly once in effect: after a restart, a journaled command that was interrupted is executed
//! again only when doing so cannot repeat an effect (`BareMetalCommand::repeats_an_effect`, the
//! one place that rule lives: enrol, reads, power on/off, soft shutdown, boot override, media
//! insert/eject and deprovision converge to the same state). An interrupted power cycle, reset or
//! provision (which power-cycles) fails with `interrupted` and the machine's current power state
//! instead, so no server is rebooted twice; the operator decides whether to send it again.

use std::sync::Arc;

use pcg_provider::command::{BareMetalCommand, BareMetalService, EnrolCommand, Protocol, KINDS};
use pcg_provider::ErrorKind;
use serde_json::Value;

use crate::executor::{ExecContext, ExecError, Registry};
use crate::store::{now_ms, BmcRecord, Store};

/// The service with every bare-metal driver this gateway has.
pub fn service() -> Arc<BareMetalService> {
    Arc::new(
        BareMetalService::new()
            .with_factory(Protocol::Ipmi, pcg_ipmi::IpmiDriver::factory)
            .with_factory(Protocol::Redfish, pcg_redfish::RedfishDriver::factory),
    )
}

/// Puts back every BMC enrolled before a restart (no I/O to the BMCs).
pub fn restore(svc: &BareMetalService, store: &Store) {
    for name in store.bmc_names() {
        let restored = store
            .bmc(&name)
            .ok()
            .flatten()
            .and_then(|rec| {
                let endpoint =
                    serde_json::from_slice(&store.unseal(&rec.endpoint_sealed).ok()?).ok()?;
                let protocol = serde_json::from_value(Value::String(rec.protocol)).ok()?;
                Some(EnrolCommand {
                    name: name.clone(),
                    protocol,
                    endpoint,
                })
            })
            .map(|c| svc.restore(&c));
        if !matches!(restored, Some(Ok(()))) {
            tracing::warn!(bmc = %name, "cannot restore this enrolled BMC; enrol it again");
        }
    }
}

/// The power state of the system a command is for (its BMC's default system when it names
/// none: asked of the BMC when the driver does not know its systems yet, as after a restart);
/// `None` when it cannot be read.
async fn power_now(svc: &BareMetalService, cmd: &BareMetalCommand) -> Option<String> {
    let read = async {
        let driver = svc.driver(cmd.bmc())?;
        let system = pcg_provider::command::system_of(&*driver, cmd.system()).await?;
        driver.power_state(&system).await
    };
    match read.await {
        Ok(state) => Some(format!(
            "power state {}",
            serde_json::to_string(&state).unwrap_or_default()
        )),
        Err(e) => {
            tracing::warn!(bmc = %cmd.bmc(), "cannot read the power state of an interrupted command's machine: {e}");
            None
        }
    }
}

async fn handle(ctx: ExecContext, payload: Value) -> Result<Value, ExecError> {
    let gw = ctx.gateway.clone();
    let svc = gw.bare_metal.clone();
    let cmd = BareMetalCommand::parse_value(&ctx.kind, payload.clone())
        .map_err(ExecError::from)?
        .ok_or_else(|| {
            ExecError::new(
                "unknown_kind",
                format!("{} is not a bare-metal command", ctx.kind),
            )
        })?;
    if cmd.repeats_an_effect() {
        ctx.not_repeated(
            &format!("{} on BMC {:?}", cmd.kind(), cmd.bmc()),
            power_now(&svc, &cmd),
        )
        .await?;
    }
    let progress = ctx.progress_sink();
    let out = svc.handle_with(&ctx.kind, payload, &progress).await.map_err(|e| {
        if e.kind() == ErrorKind::NotFound && svc.driver(cmd.bmc()).is_err() {
            let names = svc.names();
            ExecError::new(
                "not_found",
                format!(
                    "no BMC is enrolled as {:?} on this gateway (enrolled: {}); send baremetal.enrol first",
                    cmd.bmc(),
                    if names.is_empty() { "none".into() } else { names.join(", ") }
                ),
            )
        } else {
            ExecError::from(e)
        }
    })?;
    if let BareMetalCommand::Enrol(c) = &cmd {
        let rec = BmcRecord {
            name: c.name.clone(),
            protocol: serde_json::to_value(c.protocol)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
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
    }
    Ok(out)
}

/// Adds the bare-metal commands to `r`.
pub fn register(r: &mut Registry) {
    for kind in KINDS {
        r.register(kind, handle);
    }
}
