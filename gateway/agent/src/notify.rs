//! systemd integration over sd_notify: `READY=1` once the store is open and the loops run,
//! `WATCHDOG=1` only while the tunnel loop and the executor's durable path are alive, `STATUS=`
//! with the tunnel state (shown by `systemctl status pcg-gateway`), `STOPPING=1` on shutdown.
//! Outside systemd (no `NOTIFY_SOCKET`) every call is a no-op.
//!
//! Liveness, checked before each watchdog ping:
//! - the tunnel task has not ended, and has made progress (any tunnel status update: a broker
//!   heartbeat, a state change) within the bound its state allows: three heartbeat intervals
//!   when connected (the loop itself drops a tunnel silent that long), three connect timeouts
//!   when connecting, the backoff cap when waiting to redial; an unpaired or revoked gateway
//!   waits for an event and has nothing to be late for;
//! - the executor's durable path answers: a store flush (what every journal write and result
//!   waits on) completes within the check's bound.
//!
//! When a check fails the pings stop, systemd's `WatchdogSec` expires, and systemd restarts the
//! service (`Restart=on-failure`); the reason is logged and sent as `STATUS=`.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::status::{TunnelState, TunnelStatus};
use crate::store::now_ms;
use crate::Gateway;

/// Extra time on top of every bound: a busy machine is not a hung loop.
const SLACK_MS: i64 = 30_000;

/// Tells systemd the gateway is ready (no-op outside systemd).
pub fn ready() {
    send(&[
        NotifyState::Ready,
        NotifyState::Status("store open, tunnel starting"),
    ]);
}

/// Tells systemd the gateway is stopping (no-op outside systemd).
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// Why the tunnel loop counts as stuck, if it does. `progress_ms` is the last tunnel status
/// update.
pub fn tunnel_stall(
    gw: &Gateway,
    tunnel: &TunnelStatus,
    progress_ms: i64,
    now: i64,
) -> Option<String> {
    let ms = |d: u64| i64::try_from(d).unwrap_or(i64::MAX / 4);
    let state = tunnel.state;
    let bound = match state {
        TunnelState::Unpaired | TunnelState::Revoked | TunnelState::Stopped => return None,
        TunnelState::Connected => {
            ms(tunnel.heartbeat_interval_ms.unwrap_or(10_000)).saturating_mul(3)
        }
        TunnelState::Connecting => ms(gw.cfg.connect_timeout_ms).saturating_mul(3),
        // Until the redial it announced (the broker may ask for a longer pause than the cap).
        TunnelState::Backoff => tunnel
            .next_attempt_ms
            .map(|n| (n - progress_ms).max(0))
            .unwrap_or_else(|| ms(gw.cfg.backoff_cap_ms.max(gw.cfg.backoff_base_ms))),
    }
    .saturating_add(SLACK_MS);
    let idle = now - progress_ms;
    (idle > bound).then(|| {
        format!("the tunnel loop made no progress for {idle} ms while {state:?} (bound {bound} ms)")
    })
}

/// Pings the systemd watchdog every `interval / 3` while the loops are alive; returns (and
/// stops pinging) when `alive` says a loop task has ended.
pub async fn run(gw: Arc<Gateway>, interval: Duration, alive: impl Fn() -> Result<(), String>) {
    let period = (interval / 3).max(Duration::from_millis(100));
    let mut t = tokio::time::interval(period);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status = String::new();
    loop {
        t.tick().await;
        let tunnel = gw.status().tunnel;
        let check = alive()
            .and_then(
                |()| match tunnel_stall(&gw, &tunnel, gw.tunnel_progress_ms(), now_ms()) {
                    Some(why) => Err(why),
                    None => Ok(()),
                },
            )
            .map_err(|e| e.to_string());
        let check = match check {
            Ok(()) => match tokio::time::timeout(period, gw.store.flush()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("the store cannot commit: {e}")),
                Err(_) => Err(format!(
                    "a store commit took longer than {} ms",
                    period.as_millis()
                )),
            },
            Err(e) => Err(e),
        };
        match check {
            Ok(()) => {
                let status = format!("tunnel {:?}", tunnel.state).to_lowercase();
                if status != last_status {
                    send(&[NotifyState::Watchdog, NotifyState::Status(&status)]);
                    last_status = status;
                } else {
                    send(&[NotifyState::Watchdog]);
                }
            }
            Err(why) => {
                tracing::error!("watchdog: not alive, no longer pinging systemd: {why}");
                send(&[NotifyState::Status(&format!("not alive: {why}"))]);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw() -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::Store::open_now(dir.path()).expect("store");
        let g = Gateway::new(
            crate::Config::default(),
            store,
            crate::executor::Registry::default(),
        );
        std::mem::forget(dir);
        g
    }

    fn st(state: TunnelState, hb: Option<u64>, next: Option<i64>) -> TunnelStatus {
        TunnelStatus {
            state,
            heartbeat_interval_ms: hb,
            next_attempt_ms: next,
            ..TunnelStatus::default()
        }
    }

    #[test]
    fn stall_bounds_follow_the_state() {
        use TunnelState::*;
        let g = gw();
        let now = 1_000_000_000;
        // Waiting for a pairing: never late.
        assert!(tunnel_stall(&g, &st(Unpaired, None, None), 0, now).is_none());
        assert!(tunnel_stall(&g, &st(Revoked, None, None), 0, now).is_none());
        // Connected with 10 s heartbeats: 30 s + slack is fine, more is a stuck loop.
        let c = st(Connected, Some(10_000), None);
        assert!(tunnel_stall(&g, &c, now - 59_000, now).is_none());
        let why = tunnel_stall(&g, &c, now - 61_000, now).expect("stalled");
        assert!(why.contains("Connected") && why.contains("61000"), "{why}");
        // Backoff may wait up to the cap (60 s by default) ...
        let b = st(Backoff, None, None);
        assert!(tunnel_stall(&g, &b, now - 80_000, now).is_none());
        assert!(tunnel_stall(&g, &b, now - 95_000, now).is_some());
        // ... or until the redial it announced (a broker's longer retry-after).
        let p = now - 300_000;
        let b = st(Backoff, None, Some(p + 600_000));
        assert!(tunnel_stall(&g, &b, p, now).is_none());
        assert!(tunnel_stall(&g, &b, p, p + 640_000).is_some());
        // Connecting: three connect timeouts (10 s each) + slack.
        let k = st(Connecting, None, None);
        assert!(tunnel_stall(&g, &k, now - 59_000, now).is_none());
        assert!(tunnel_stall(&g, &k, now - 61_000, now).is_some());
    }
}
