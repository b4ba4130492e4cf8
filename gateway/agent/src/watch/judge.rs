//! What the watch loop makes of one observation of one machine: its state, its drift, the events
//! to record, and the action to take (converge to a new declaration, or heal by policy within
//! the budget). No I/O here: [`judge`] is a function of the machine as kept and what was seen,
//! so every rule is tested on its own.
//!
//! The rules:
//! - A machine is *converged* to its declaration's generation once it was created (or adopted)
//!   and powered as declared. Converging (the first create, a power change by `PUT`, a VM created
//!   again after a `PUT`) is always done, whatever the policy.
//! - Once converged, a difference is a *drift*: a VM gone (`present`), the power state, or the
//!   CPU count or memory where the provider reports them. The first observation of a drift (or of
//!   a changed one) records `machine.drift` with before and after; then the policy: `observe`
//!   records only; `alert` adds `machine.alert`; `heal` powers the machine back or creates the
//!   VM again (the old id is kept in `previous_ids`), unless the heal budget is used up: then
//!   `machine.heal_budget_exhausted` (an alert) and no more heals until the declaration is
//!   updated. CPU and memory are reported, never changed (resizing a VM needs it off): under
//!   `heal` such a drift is alerted.
//! - A power state in transition (powering on or off, unknown) is not judged: the next cycle
//!   looks again.

use pcg_proto::machines::{
    kinds, DesiredPower, Drift, HealUse, MachineState, Observed, Policy, Provider,
};
use pcg_provider::PowerState;
use serde_json::{json, Value};

use crate::store::machines::{Action, LocalMachine};

/// What a watch cycle saw of one machine.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// The VM, found by its id, the id to adopt, or the mark of its create.
    Vm {
        id: String,
        power: PowerState,
        name: String,
        cpus: Option<u32>,
        memory_mib: Option<u64>,
    },
    /// A bare-metal system's power state.
    Node { system: String, power: PowerState },
    /// The endpoint answered and does not have the VM.
    Missing,
    /// The endpoint could not be read.
    Unreachable(String),
    /// The declaration cannot be applied (an endpoint not enrolled, a spec the driver refuses).
    Invalid(String),
}

/// An event to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub kind: &'static str,
    pub alert: bool,
    pub message: String,
    pub details: Value,
}

/// An action to start.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub action: Action,
    /// Counted in the heal budget.
    pub heal: bool,
}

/// The judgement of one observation.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub observed: Observed,
    pub events: Vec<NewEvent>,
    pub plan: Option<Plan>,
    /// The machine is deleted: report it and forget it.
    pub forget: bool,
}

fn power_str(p: PowerState) -> &'static str {
    match p {
        PowerState::On => "on",
        PowerState::Off => "off",
        PowerState::PoweringOn => "powering_on",
        PowerState::PoweringOff => "powering_off",
        PowerState::Unknown => "unknown",
    }
}

/// What was seen, as the `before`/`after` of events.
pub fn snapshot(seen: &Seen) -> Value {
    match seen {
        Seen::Vm {
            id,
            power,
            cpus,
            memory_mib,
            ..
        } => json!({"present": true, "id": id, "power": power_str(*power),
            "cpus": cpus, "memory_mib": memory_mib}),
        Seen::Node { system, power } => {
            json!({"present": true, "id": system, "power": power_str(*power)})
        }
        Seen::Missing => json!({"present": false}),
        Seen::Unreachable(e) | Seen::Invalid(e) => json!({"error": e}),
    }
}

fn drift_of(m: &LocalMachine, seen: &Seen) -> Vec<Drift> {
    let Some(d) = &m.declaration else {
        return Vec::new();
    };
    let want = d.power;
    let mut out = Vec::new();
    let (power, cpus, memory) = match seen {
        Seen::Vm {
            power,
            cpus,
            memory_mib,
            ..
        } => (*power, *cpus, *memory_mib),
        Seen::Node { power, .. } => (*power, None, None),
        Seen::Missing => {
            return vec![Drift {
                field: "present".into(),
                desired: json!(true),
                observed: json!(false),
            }]
        }
        Seen::Unreachable(_) | Seen::Invalid(_) => return Vec::new(),
    };
    let matches = matches!(
        (want, power),
        (DesiredPower::On, PowerState::On) | (DesiredPower::Off, PowerState::Off)
    );
    if !matches {
        out.push(Drift {
            field: "power".into(),
            desired: json!(want.as_str()),
            observed: json!(power_str(power)),
        });
    }
    let spec = d.vm().map(|t| &t.vm);
    let declared = |k: &str| spec.and_then(|s| s.get(k)).and_then(Value::as_u64);
    if let (Some(want), Some(seen)) = (declared("cpus"), cpus) {
        if want != u64::from(seen) {
            out.push(Drift {
                field: "cpus".into(),
                desired: json!(want),
                observed: json!(seen),
            });
        }
    }
    if let (Some(want), Some(seen)) = (declared("memory_mib"), memory) {
        if want != seen {
            out.push(Drift {
                field: "memory_mib".into(),
                desired: json!(want),
                observed: json!(seen),
            });
        }
    }
    out
}

fn describe(drift: &[Drift]) -> String {
    drift
        .iter()
        .map(|d| match d.field.as_str() {
            "present" => "the VM is gone".to_string(),
            f => format!("{f} is {} (declared {})", d.observed, d.desired),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn healable(drift: &[Drift]) -> bool {
    drift
        .iter()
        .any(|d| d.field == "present" || d.field == "power")
}

/// The action that heals (or converges) `drift`: create the VM again, or power it.
fn repair(m: &mut LocalMachine, seen: &Seen, drift: &[Drift]) -> Option<Action> {
    let d = m.declaration.as_ref()?;
    if drift.iter().any(|x| x.field == "present") {
        // A VM that existed and is gone is replaced by a new incarnation (a new mark); a create
        // that never finished keeps its mark, so the VM it may have made is found, not twinned.
        let previous_id = m.provider_id.take();
        if let Some(p) = &previous_id {
            if !m.previous_ids.contains(p) {
                m.previous_ids.push(p.clone());
            }
            m.incarnation += 1;
        }
        return Some(Action::Create {
            mark: m.mark(),
            previous_id,
        });
    }
    if drift.iter().any(|x| x.field == "power") {
        let provider_id = match seen {
            Seen::Vm { id, .. } => id.clone(),
            Seen::Node { system, .. } => system.clone(),
            _ => return None,
        };
        return Some(Action::Power {
            to: d.power,
            provider_id,
        });
    }
    None
}

/// Judges one observation of `m`, updating what is kept about it.
pub fn judge(m: &mut LocalMachine, seen: &Seen, now: i64) -> Verdict {
    let label = m
        .declaration
        .as_ref()
        .map(|d| format!("machine {} ({})", m.id, d.name))
        .unwrap_or_else(|| format!("machine {}", m.id));
    let mut events = Vec::new();
    let mut plan: Option<Plan> = None;
    let mut forget = false;
    let mut ev = |kind: &'static str, alert: bool, message: String, details: Value| {
        events.push(NewEvent {
            kind,
            alert,
            message,
            details,
        });
    };
    let mut state = MachineState::InSync;
    let mut error = None;
    if let Seen::Vm { .. } | Seen::Node { .. } = seen {
        m.last_seen_ms = Some(now);
    }
    let is_vm = m.declaration.as_ref().is_some_and(|d| d.vm().is_some());
    if m.deleted {
        match seen {
            Seen::Vm { id, .. } if is_vm => {
                state = MachineState::Deleting;
                plan = Some(Plan {
                    action: Action::Delete {
                        provider_id: id.clone(),
                    },
                    heal: false,
                });
            }
            Seen::Unreachable(e) => {
                state = MachineState::Deleting;
                error = Some(e.clone());
            }
            _ => {
                state = MachineState::Deleted;
                forget = true;
                ev(
                    kinds::DELETED,
                    false,
                    format!(
                        "{label} deleted{}",
                        if is_vm {
                            ""
                        } else {
                            "; the node was left as it is"
                        }
                    ),
                    json!({"provider_id": m.provider_id, "previous_ids": m.previous_ids}),
                );
            }
        }
    } else if let Some(d) = m.declaration.clone() {
        let adopt = d.vm().and_then(|t| t.adopt_id.clone());
        match seen {
            Seen::Unreachable(e) => {
                state = MachineState::Unreachable;
                error = Some(e.clone());
            }
            Seen::Invalid(e) => {
                state = MachineState::Invalid;
                error = Some(e.clone());
            }
            Seen::Missing if m.provider_id.is_none() && adopt.is_some() => {
                state = MachineState::Invalid;
                error = Some(format!(
                    "the VM to adopt ({}) does not exist on {}; declare a VM to create instead, or fix adopt_id",
                    adopt.unwrap_or_default(),
                    d.endpoint()
                ));
            }
            Seen::Missing
                if (m.provider_id.is_none() && m.previous_ids.is_empty())
                    || m.converged_generation < m.generation =>
            {
                // Never created (or a new declaration for a VM that is gone): converge.
                state = MachineState::Converging;
                if m.retry_at_ms.is_none_or(|t| now >= t) {
                    let drift = drift_of(m, seen);
                    plan = repair(m, seen, &drift).map(|action| Plan {
                        action,
                        heal: false,
                    });
                } else {
                    error = m.last_error.clone();
                }
            }
            _ => {
                if let Seen::Vm { id, .. } | Seen::Node { system: id, .. } = seen {
                    if m.provider_id.as_deref() != Some(id) {
                        m.provider_id = Some(id.clone());
                    }
                }
                let transitional = matches!(
                    seen,
                    Seen::Vm { power, .. } | Seen::Node { power, .. }
                        if !matches!(power, PowerState::On | PowerState::Off)
                );
                let drift = drift_of(m, seen);
                if transitional {
                    state = MachineState::Converging;
                } else if drift.is_empty() {
                    if !m.drift.is_empty() {
                        ev(
                            kinds::DRIFT_RESOLVED,
                            false,
                            format!("{label} matches its declaration again"),
                            json!({"was": m.drift, "now": snapshot(seen)}),
                        );
                        m.drift.clear();
                    }
                    m.in_sync = Some(snapshot(seen));
                    m.converged_generation = m.generation;
                } else if m.converged_generation < m.generation && healable(&drift) {
                    // A new declaration: power it as declared (not a heal).
                    state = MachineState::Converging;
                    if m.retry_at_ms.is_none_or(|t| now >= t) {
                        plan = repair(m, seen, &drift).map(|action| Plan {
                            action,
                            heal: false,
                        });
                    } else {
                        error = m.last_error.clone();
                    }
                } else {
                    // Converged before (or nothing to converge but the size): this is drift.
                    m.converged_generation = m.converged_generation.max(m.generation);
                    state = MachineState::Drifted;
                    let changed = m.drift != drift;
                    if changed {
                        ev(
                            kinds::DRIFT,
                            false,
                            format!("{label} drifted: {}", describe(&drift)),
                            json!({"before": m.in_sync, "after": snapshot(seen), "drift": drift}),
                        );
                        m.drift = drift.clone();
                    }
                    let budget = d.heal_budget;
                    match d.policy {
                        Policy::Observe => {}
                        Policy::Alert => {
                            if changed {
                                ev(
                                    kinds::ALERT,
                                    true,
                                    format!(
                                        "{label} drifted ({}); policy alert: nothing changed",
                                        describe(&drift)
                                    ),
                                    json!({"drift": drift, "policy": "alert"}),
                                );
                            }
                        }
                        Policy::Heal if !healable(&drift) => {
                            if changed {
                                ev(
                                    kinds::ALERT,
                                    true,
                                    format!(
                                        "{label} drifted ({}); pcg does not resize VMs, so this is not healed",
                                        describe(&drift)
                                    ),
                                    json!({"drift": drift, "policy": "heal", "healable": false}),
                                );
                            }
                        }
                        Policy::Heal if m.suspended() => {
                            if changed {
                                ev(
                                    kinds::ALERT,
                                    true,
                                    format!(
                                        "{label} drifted ({}); not healed: its heal budget ran out (update the declaration to resume healing)",
                                        describe(&drift)
                                    ),
                                    json!({"drift": drift, "policy": "heal", "suspended": true}),
                                );
                            }
                        }
                        Policy::Heal => {
                            let used = m.heals_within(budget.window_seconds, now);
                            if used < budget.max_heals {
                                if let Some(action) = repair(m, seen, &drift) {
                                    m.heals.push(now);
                                    state = MachineState::Converging;
                                    plan = Some(Plan { action, heal: true });
                                }
                            } else {
                                m.suspended_at = Some(m.generation);
                                ev(
                                    kinds::HEAL_BUDGET_EXHAUSTED,
                                    true,
                                    format!(
                                        "{label} drifted ({}) but was healed {used} times within {} s (budget {}); not healed, and no more heals until the declaration is updated",
                                        describe(&drift),
                                        budget.window_seconds,
                                        budget.max_heals
                                    ),
                                    json!({"drift": drift, "heals_used": used,
                                        "max_heals": budget.max_heals,
                                        "window_seconds": budget.window_seconds}),
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    // Heals older than the longest window are of no use.
    let window = m
        .declaration
        .as_ref()
        .map_or(3600, |d| d.heal_budget.window_seconds);
    let keep_from = now - i64::try_from(window.saturating_mul(1000)).unwrap_or(i64::MAX);
    m.heals.retain(|t| *t > keep_from);
    let (used, max_heals) = m.declaration.as_ref().map_or((0, 0), |d| {
        (
            m.heals_within(d.heal_budget.window_seconds, now),
            d.heal_budget.max_heals,
        )
    });
    let mut v = Verdict {
        observed: Observed {
            generation: m.generation,
            observed_ms: now,
            ..Observed::default()
        },
        events,
        plan,
        forget,
    };
    let o = &mut v.observed;
    o.state = state;
    o.converged_generation = m.converged_generation;
    o.provider_id = m.provider_id.clone();
    o.previous_ids = m.previous_ids.clone();
    o.last_seen_ms = m.last_seen_ms;
    o.drift = if state == MachineState::Drifted {
        m.drift.clone()
    } else {
        Vec::new()
    };
    o.error = error.or_else(|| {
        (state != MachineState::InSync)
            .then(|| m.last_error.clone())
            .flatten()
    });
    o.heals = HealUse {
        used,
        max_heals,
        window_seconds: window,
        suspended: m.suspended(),
        last_heal_ms: m.heals.last().copied(),
    };
    match seen {
        Seen::Vm {
            power,
            name,
            cpus,
            memory_mib,
            ..
        } => {
            o.present = Some(true);
            o.power = Some(power_str(*power).into());
            o.vm_name = Some(name.clone());
            o.cpus = *cpus;
            o.memory_mib = *memory_mib;
        }
        Seen::Node { power, .. } => {
            o.present = Some(true);
            o.power = Some(power_str(*power).into());
        }
        Seen::Missing => o.present = Some(false),
        Seen::Unreachable(_) | Seen::Invalid(_) => {}
    }
    v
}

/// The provider of a kept machine (its declaration's).
pub fn provider(m: &LocalMachine) -> Option<Provider> {
    m.declaration.as_ref().map(|d| d.provider())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcg_proto::machines::Declaration;

    fn machine(policy: &str, budget: u32) -> LocalMachine {
        let d: Declaration = serde_json::from_value(json!({
            "name": "web", "policy": policy,
            "heal_budget": {"max_heals": budget, "window_seconds": 3600},
            "vsphere": {"endpoint": "lab", "vm": {"name": "w", "source": "t", "cpus": 2,
                "placement": {"provider": "vsphere"}}},
        }))
        .expect("declaration");
        LocalMachine {
            id: "mach_1".into(),
            generation: 1,
            declaration: Some(d),
            deleted: false,
            incarnation: 1,
            provider_id: None,
            previous_ids: Vec::new(),
            converged_generation: 0,
            heals: Vec::new(),
            suspended_at: None,
            drift: Vec::new(),
            in_sync: None,
            last_seen_ms: None,
            last_error: None,
            failures: 0,
            retry_at_ms: None,
        }
    }

    fn vm(power: PowerState) -> Seen {
        Seen::Vm {
            id: "vm-7".into(),
            power,
            name: "w".into(),
            cpus: Some(2),
            memory_mib: None,
        }
    }

    fn kinds_of(v: &Verdict) -> Vec<&str> {
        v.events.iter().map(|e| e.kind).collect()
    }

    #[test]
    fn a_new_machine_is_created_then_converged() {
        let mut m = machine("alert", 3);
        let v = judge(&mut m, &Seen::Missing, 1);
        assert_eq!(
            v.plan,
            Some(Plan {
                action: Action::Create {
                    mark: "mach_1.1".into(),
                    previous_id: None
                },
                heal: false
            })
        );
        assert_eq!(v.observed.state, MachineState::Converging);
        assert!(v.events.is_empty());
        // The create is done (its result sets the id); the next look finds it in sync.
        m.provider_id = Some("vm-7".into());
        let v = judge(&mut m, &vm(PowerState::On), 2);
        assert_eq!(v.observed.state, MachineState::InSync);
        assert_eq!(m.converged_generation, 1);
        assert_eq!(v.observed.last_seen_ms, Some(2));
    }

    #[test]
    fn alert_policy_records_and_alerts_once_and_changes_nothing() {
        let mut m = machine("alert", 3);
        m.provider_id = Some("vm-7".into());
        judge(&mut m, &vm(PowerState::On), 1);
        let v = judge(&mut m, &vm(PowerState::Off), 2);
        assert_eq!(kinds_of(&v), vec![kinds::DRIFT, kinds::ALERT]);
        assert!(v.events[1].alert && !v.events[0].alert);
        assert_eq!(v.events[0].details["before"]["power"], "on");
        assert_eq!(v.events[0].details["after"]["power"], "off");
        assert!(v.plan.is_none());
        assert_eq!(v.observed.state, MachineState::Drifted);
        // The same drift again: nothing new.
        let v = judge(&mut m, &vm(PowerState::Off), 3);
        assert!(v.events.is_empty() && v.plan.is_none());
        // Fixed by someone else: resolved.
        let v = judge(&mut m, &vm(PowerState::On), 4);
        assert_eq!(kinds_of(&v), vec![kinds::DRIFT_RESOLVED]);
        assert_eq!(v.observed.state, MachineState::InSync);
    }

    #[test]
    fn heal_policy_heals_within_the_budget_then_stops_until_updated() {
        let mut m = machine("heal", 2);
        m.provider_id = Some("vm-7".into());
        judge(&mut m, &vm(PowerState::On), 1);
        for round in 0..2 {
            let v = judge(&mut m, &vm(PowerState::Off), 10 + round);
            assert_eq!(kinds_of(&v), vec![kinds::DRIFT], "round {round}");
            assert_eq!(
                v.plan,
                Some(Plan {
                    action: Action::Power {
                        to: DesiredPower::On,
                        provider_id: "vm-7".into()
                    },
                    heal: true
                })
            );
            assert_eq!(v.observed.heals.used, round as u32 + 1);
            let v = judge(&mut m, &vm(PowerState::On), 20 + round);
            assert_eq!(kinds_of(&v), vec![kinds::DRIFT_RESOLVED]);
        }
        let v = judge(&mut m, &vm(PowerState::Off), 30);
        assert_eq!(
            kinds_of(&v),
            vec![kinds::DRIFT, kinds::HEAL_BUDGET_EXHAUSTED]
        );
        assert!(v.events[1].alert);
        assert!(v.plan.is_none());
        assert!(v.observed.heals.suspended);
        // Suspended: a later drift is alerted, not healed.
        judge(&mut m, &vm(PowerState::On), 31);
        let v = judge(&mut m, &vm(PowerState::Off), 32);
        assert_eq!(kinds_of(&v), vec![kinds::DRIFT, kinds::ALERT]);
        assert!(v.plan.is_none());
        // An update (a new generation) converges it again.
        m.generation = 2;
        m.suspended_at = None;
        m.heals.clear();
        let v = judge(&mut m, &vm(PowerState::Off), 40);
        assert_eq!(v.plan.as_ref().map(|p| p.heal), Some(false));
    }

    #[test]
    fn a_vm_gone_is_created_again_and_its_old_id_kept() {
        let mut m = machine("heal", 3);
        m.provider_id = Some("vm-7".into());
        judge(&mut m, &vm(PowerState::On), 1);
        let v = judge(&mut m, &Seen::Missing, 2);
        assert_eq!(kinds_of(&v), vec![kinds::DRIFT]);
        assert_eq!(
            v.plan,
            Some(Plan {
                action: Action::Create {
                    mark: "mach_1.2".into(),
                    previous_id: Some("vm-7".into())
                },
                heal: true
            })
        );
        assert_eq!(m.previous_ids, vec!["vm-7"]);
        assert_eq!(m.provider_id, None);
        // Under observe: only the drift.
        let mut m = machine("observe", 3);
        m.provider_id = Some("vm-7".into());
        judge(&mut m, &vm(PowerState::On), 1);
        let v = judge(&mut m, &Seen::Missing, 2);
        assert_eq!(kinds_of(&v), vec![kinds::DRIFT]);
        assert!(v.plan.is_none());
        assert_eq!(v.observed.present, Some(false));
    }

    #[test]
    fn size_drift_is_reported_never_healed_and_transitions_are_not_judged() {
        let mut m = machine("heal", 3);
        m.provider_id = Some("vm-7".into());
        judge(&mut m, &vm(PowerState::On), 1);
        let bigger = Seen::Vm {
            id: "vm-7".into(),
            power: PowerState::On,
            name: "w".into(),
            cpus: Some(4),
            memory_mib: None,
        };
        let v = judge(&mut m, &bigger, 2);
        assert_eq!(kinds_of(&v), vec![kinds::DRIFT, kinds::ALERT]);
        assert!(v.plan.is_none());
        let v = judge(&mut m, &vm(PowerState::PoweringOff), 3);
        assert_eq!(v.observed.state, MachineState::Converging);
        assert!(v.events.is_empty() && v.plan.is_none());
    }

    #[test]
    fn deleted_machines_are_deleted_then_forgotten() {
        let mut m = machine("heal", 3);
        m.deleted = true;
        let v = judge(&mut m, &vm(PowerState::On), 1);
        assert_eq!(
            v.plan.map(|p| p.action),
            Some(Action::Delete {
                provider_id: "vm-7".into()
            })
        );
        let v = judge(&mut m, &Seen::Missing, 2);
        assert!(v.forget);
        assert_eq!(v.observed.state, MachineState::Deleted);
        assert_eq!(kinds_of(&v), vec![kinds::DELETED]);
    }
}
