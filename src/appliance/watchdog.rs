//! The systemd watchdog: how long the service may go without a ping, how often it pings, and
//! how long the pipeline may make no progress before the pings stop.
//!
//! The interval is systemd's when systemd set one for this process (`WATCHDOG_USEC`, and
//! `WATCHDOG_PID` when present), else `[station] watchdog_s`, which the service then hands to
//! systemd with `WATCHDOG_USEC=` next to `READY=1`. The shipped unit sets no `WatchdogSec=`, so
//! the station's config decides; an operator's `WatchdogSec=` in a drop-in still wins.

use std::time::Duration;

use sd_notify::NotifyState;

use crate::{Error, Result};

/// The pipeline thread marks progress at least this often while idle.
const MAX_BEAT: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watchdog {
    /// systemd restarts the service when no ping came for this long.
    pub timeout: Duration,
    /// Whether systemd chose the timeout (then it need not be told).
    pub from_systemd: bool,
}

impl Watchdog {
    /// The watchdog of this process: from its environment, else `config_s` seconds.
    pub fn resolve(config_s: u64) -> Result<Self> {
        let var = |k| std::env::var(k).ok();
        Self::from_env(
            var("WATCHDOG_USEC").as_deref(),
            var("WATCHDOG_PID").as_deref(),
            std::process::id(),
            config_s,
        )
    }

    /// `usec` and `pid` are the values of `WATCHDOG_USEC` and `WATCHDOG_PID`; `me` is this
    /// process's id. A malformed value is an error: systemd never sets one, so something is
    /// wrong with how the service was started.
    pub fn from_env(usec: Option<&str>, pid: Option<&str>, me: u32, config_s: u64) -> Result<Self> {
        let bad = |key: &str, v: &str, why: &str| Error::Config {
            key: key.into(),
            reason: format!("{v:?} from the environment {why}"),
        };
        let ours = match pid {
            None => true,
            Some(p) => {
                p.parse::<u32>()
                    .map_err(|_| bad("WATCHDOG_PID", p, "is not a process id"))?
                    == me
            }
        };
        match usec.filter(|_| ours) {
            Some(u) => match u.parse::<u64>() {
                Ok(us) if us > 0 => Ok(Watchdog {
                    timeout: Duration::from_micros(us),
                    from_systemd: true,
                }),
                _ => Err(bad(
                    "WATCHDOG_USEC",
                    u,
                    "is not a positive number of microseconds",
                )),
            },
            None => Ok(Watchdog {
                timeout: Duration::from_secs(config_s),
                from_systemd: false,
            }),
        }
    }

    /// Ping three times per timeout, so one late ping is not a restart.
    pub fn ping_every(&self) -> Duration {
        (self.timeout / 3).max(Duration::from_millis(10))
    }

    /// The pipeline counts as stalled when it made no progress for half the timeout: the
    /// pings stop then, and systemd restarts the service within the other half.
    pub fn stall_after(&self) -> Duration {
        self.timeout / 2
    }

    /// How often the idle pipeline marks progress: well within `stall_after`.
    pub fn beat_every(&self) -> Duration {
        (self.stall_after() / 4).clamp(Duration::from_millis(1), MAX_BEAT)
    }

    /// What to send once ready: `READY=1`, and the timeout when systemd did not choose it.
    pub fn ready_states(&self) -> Vec<NotifyState<'static>> {
        let mut v = vec![NotifyState::Ready];
        if !self.from_systemd {
            // the config caps watchdog_s well below u32::MAX microseconds
            let us = u32::try_from(self.timeout.as_micros()).unwrap_or(u32::MAX);
            v.push(NotifyState::WatchdogUsec(us));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn systemd_wins_over_the_config_for_this_process_only() {
        let w = Watchdog::from_env(Some("1500000"), None, 7, 30).unwrap();
        assert_eq!((w.timeout, w.from_systemd), (secs(1.5), true));
        let w = Watchdog::from_env(Some("1500000"), Some("7"), 7, 30).unwrap();
        assert_eq!(w.timeout, secs(1.5));
        // set for another process (a parent that did not unset it): the config applies
        let w = Watchdog::from_env(Some("1500000"), Some("8"), 7, 30).unwrap();
        assert_eq!((w.timeout, w.from_systemd), (secs(30.0), false));
        let w = Watchdog::from_env(None, None, 7, 30).unwrap();
        assert_eq!((w.timeout, w.from_systemd), (secs(30.0), false));
    }

    #[test]
    fn malformed_values_are_errors_naming_the_variable() {
        for (usec, pid, key) in [
            (Some("soon"), None, "WATCHDOG_USEC"),
            (Some("0"), None, "WATCHDOG_USEC"),
            (Some("-5"), None, "WATCHDOG_USEC"),
            (Some("1000"), Some("me"), "WATCHDOG_PID"),
        ] {
            let e = Watchdog::from_env(usec, pid, 7, 30)
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{usec:?} {pid:?}: {e}");
        }
    }

    #[test]
    fn intervals_follow_the_timeout() {
        let w = Watchdog::from_env(None, None, 1, 30).unwrap();
        assert_eq!((w.ping_every(), w.stall_after()), (secs(10.0), secs(15.0)));
        assert_eq!(w.beat_every(), MAX_BEAT);
        let w = Watchdog::from_env(Some("1000000"), None, 1, 30).unwrap();
        assert_eq!(w.beat_every(), secs(0.125));
        assert!(w.beat_every() < w.stall_after() && w.ping_every() < w.stall_after());
    }

    #[test]
    fn the_config_timeout_is_told_to_systemd() {
        let msg = |w: Watchdog| {
            w.ready_states()
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
        };
        let w = Watchdog::from_env(None, None, 1, 2).unwrap();
        assert_eq!(msg(w), ["READY=1", "WATCHDOG_USEC=2000000"]);
        let w = Watchdog::from_env(Some("3000000"), None, 1, 2).unwrap();
        assert_eq!(msg(w), ["READY=1"]);
    }
}
