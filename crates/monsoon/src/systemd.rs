//! systemd's notify protocol for `monsoon run` as a `Type=notify` service (see
//! `examples/monsoon.service`): `READY=1` once the pipeline is ready (both ends answer, the
//! snapshot or the stream runs: what `/readyz` reports), then `WATCHDOG=1` every half
//! `WatchdogSec` while it is live (what `/healthz` reports), and `STOPPING=1` on the way out.
//! A pipeline that failed or whose loops stopped beating stops pinging, so systemd restarts it.
//!
//! The protocol is one datagram per message to the unix socket named by `$NOTIFY_SOCKET` (a
//! path, or an abstract name starting with `@`); systemd sets `$WATCHDOG_USEC` (and
//! `$WATCHDOG_PID`, the process meant) when the unit has `WatchdogSec=`. Without
//! `$NOTIFY_SOCKET` nothing is sent. No crate needed: the standard library speaks it.

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::Duration;

use monsoon_engine::metrics::Health;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Where notifications go: `$NOTIFY_SOCKET`.
struct Notifier {
    socket: UnixDatagram,
    addr: std::os::unix::net::SocketAddr,
}

impl Notifier {
    /// The socket `$NOTIFY_SOCKET` names, if set.
    fn from_env() -> Option<std::io::Result<Self>> {
        let name = std::env::var_os("NOTIFY_SOCKET")?;
        Some(Self::new(&name.to_string_lossy()))
    }

    fn new(name: &str) -> std::io::Result<Self> {
        let addr = match name.strip_prefix('@') {
            Some(abstract_name) => abstract_address(abstract_name)?,
            None => std::os::unix::net::SocketAddr::from_pathname(name)?,
        };
        Ok(Self { socket: UnixDatagram::unbound()?, addr })
    }

    fn send(&self, message: &str) -> std::io::Result<()> {
        self.socket.send_to_addr(message.as_bytes(), &self.addr).map(|_| ())
    }
}

#[cfg(target_os = "linux")]
fn abstract_address(name: &str) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
}

#[cfg(not(target_os = "linux"))]
fn abstract_address(_name: &str) -> std::io::Result<std::os::unix::net::SocketAddr> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "abstract unix socket names need Linux"))
}

/// How often to ping the watchdog: half of `$WATCHDOG_USEC` (as systemd recommends), when it
/// is set for this process (`$WATCHDOG_PID` unset or ours).
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>) -> Option<Duration> {
    if pid.is_some_and(|p| p.trim() != std::process::id().to_string()) {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

/// The messages due now: `READY=1` the first time the pipeline is ready, `WATCHDOG=1` when a
/// ping is due and the pipeline is live.
fn due(health: &Health, ready_sent: bool, ping_due: bool) -> Vec<&'static str> {
    let mut out = Vec::new();
    if !ready_sent && health.ready().is_ok() {
        out.push("READY=1");
    }
    if ping_due && health.live().is_ok() {
        out.push("WATCHDOG=1");
    }
    out
}

/// Tell systemd about the pipeline's health until `stop`; returns at once without
/// `$NOTIFY_SOCKET`. Failures to send are logged and never stop the pipeline.
pub async fn notify(health: Arc<Health>, stop: CancellationToken) {
    let notifier = match Notifier::from_env() {
        None => return,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            warn!(error = %e, "NOTIFY_SOCKET is set but unusable; systemd is not notified");
            return;
        }
    };
    let ping = watchdog_interval(std::env::var("WATCHDOG_USEC").ok().as_deref(), std::env::var("WATCHDOG_PID").ok().as_deref());
    // Readiness is checked often (it ends systemd's start-up wait); pings as often as due.
    let step = ping.map_or(Duration::from_millis(250), |p| p.min(Duration::from_millis(250)));
    let mut ready_sent = false;
    let mut last_ping = tokio::time::Instant::now();
    loop {
        let ping_due = ping.is_some_and(|p| last_ping.elapsed() >= p);
        for message in due(&health, ready_sent, ping_due) {
            match notifier.send(message) {
                Ok(()) => debug!(message, "systemd notified"),
                Err(e) => warn!(error = %e, message, "failed to notify systemd"),
            }
            match message {
                "READY=1" => ready_sent = true,
                _ => last_ping = tokio::time::Instant::now(),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(step) => {}
            () = stop.cancelled() => break,
        }
    }
    let _ = notifier.send("STOPPING=1");
}

#[cfg(test)]
mod tests {
    use super::*;
    use monsoon_engine::metrics::Phase;

    #[test]
    fn the_watchdog_interval_is_half_of_watchdog_usec_for_this_process_only() {
        assert_eq!(watchdog_interval(Some("30000000"), None), Some(Duration::from_secs(15)));
        let ours = std::process::id().to_string();
        assert_eq!(watchdog_interval(Some("2000000"), Some(&ours)), Some(Duration::from_secs(1)));
        assert_eq!(watchdog_interval(Some("2000000"), Some("1")), None, "meant for another process");
        assert_eq!(watchdog_interval(None, None), None);
        assert_eq!(watchdog_interval(Some("0"), None), None);
        assert_eq!(watchdog_interval(Some("soon"), None), None);
    }

    #[test]
    fn ready_once_ready_and_pings_only_while_live() {
        let h = Health::new(Duration::from_secs(60));
        assert_eq!(due(&h, false, true), ["WATCHDOG=1"], "starting: live, not ready");
        h.set_phase(Phase::Snapshotting);
        h.source_beat(true);
        h.sink_beat(true);
        assert_eq!(due(&h, false, false), ["READY=1"]);
        assert_eq!(due(&h, true, true), ["WATCHDOG=1"], "READY=1 is sent once");
        h.fail("history lost".into());
        assert!(due(&h, true, true).is_empty(), "a failed pipeline stops pinging");
        assert!(due(&h, false, true).is_empty());
    }
}
