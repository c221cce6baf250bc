//! The service's front door, free of I/O: what becomes of each incoming message and each
//! interval capture, given the station's bounds. The service (service.rs) carries the routes
//! out; tests drive the router with messages and read the routes back, with no broker, camera or
//! thread.

use super::journal;
use super::protocol::{Event, Level, is_status_request, request_id};
use crate::publish::mqtt::Incoming;

/// Work for the pipeline thread.
#[derive(Debug, PartialEq, Eq)]
pub enum Job {
    /// A command payload, parsed by the station.
    Command(Vec<u8>),
    /// A command from the admin topic (only the operator's account may write it): the one
    /// place `templates.publish` is taken.
    Admin(Vec<u8>),
    /// A signed template from the fleet topic.
    Fleet(Vec<u8>),
    /// An interval capture.
    Tick,
}

/// The status counter a refusal adds to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Command,
    Capture,
}

/// What the service does with a message or a tick.
#[derive(Debug, PartialEq)]
pub enum Route {
    Ignore,
    /// Publish the status now: answered here rather than queued, so that it stays responsive
    /// under a flood of commands.
    Status,
    /// Refused before any work: the event (if any) is published and the refusal counted.
    Refuse {
        event: Option<Event>,
        count: Option<Refusal>,
    },
    /// Queued for the pipeline; when its queue is full, refused as `if_full` and `count` say.
    Submit {
        job: Job,
        if_full: Option<Event>,
        count: Option<Refusal>,
    },
}

/// Where messages arrive and how much the station takes.
#[derive(Clone, Debug)]
pub struct Bounds {
    /// `<prefix>/<id>/cmd`.
    pub cmd_topic: String,
    /// `<prefix>/<id>/admin`: commands too, under the broker's stricter ACL.
    pub admin_topic: String,
    /// `<prefix>/fleet/template/`.
    pub fleet_prefix: String,
    /// `[station] max_payload_bytes`: larger commands are dropped.
    pub max_payload_bytes: usize,
    /// The link's packet limit: larger messages arrive without their payload.
    pub link_limit: usize,
    /// `[station] queue`.
    pub queue: usize,
}

pub struct Router {
    bounds: Bounds,
    /// Interval captures are paused for a full outbox (said once a pause, not once a tick).
    captures_paused: bool,
    /// The link's count of incoming messages dropped unread, as last reported.
    seen_dropped: u64,
}

fn overloaded(level: Level, message: String, request_id: Option<String>) -> Event {
    Event {
        level,
        code: "overloaded".into(),
        message,
        request_id,
        request_ids: Vec::new(),
    }
}

impl Router {
    pub fn new(bounds: Bounds) -> Self {
        Router {
            bounds,
            captures_paused: false,
            seen_dropped: 0,
        }
    }

    pub fn bounds(&self) -> &Bounds {
        &self.bounds
    }

    /// One incoming message; `outbox_full`: the result outbox is at its bounds.
    pub fn incoming(&self, m: Incoming, outbox_full: bool) -> Route {
        if m.topic == self.bounds.cmd_topic {
            self.command(m, outbox_full, Job::Command)
        } else if m.topic == self.bounds.admin_topic {
            self.command(m, outbox_full, Job::Admin)
        } else if m.topic.starts_with(&self.bounds.fleet_prefix) {
            self.fleet(m)
        } else {
            Route::Ignore
        }
    }

    /// A command from the cmd or the admin topic; `job` says which.
    fn command(&self, m: Incoming, outbox_full: bool, job: fn(Vec<u8>) -> Job) -> Route {
        let b = &self.bounds;
        if m.oversized() || m.size > b.max_payload_bytes {
            let event = Event {
                level: Level::Error,
                code: "bad_command".into(),
                message: format!(
                    "command of {} bytes dropped: over the {} byte limit",
                    m.size, b.max_payload_bytes
                ),
                request_id: None,
                request_ids: Vec::new(),
            };
            return Route::Refuse {
                event: Some(event),
                count: None,
            };
        }
        journal::command(&m.payload);
        if is_status_request(&m.payload) {
            return Route::Status;
        }
        let rid = request_id(&m.payload);
        if outbox_full {
            let message = "the result outbox is full (broker unreachable?); new work refused";
            return Route::Refuse {
                event: Some(overloaded(Level::Error, message.into(), rid)),
                count: Some(Refusal::Command),
            };
        }
        let message = format!("{} commands already queued; refused", b.queue);
        Route::Submit {
            job: job(m.payload),
            if_full: Some(overloaded(Level::Error, message, rid)),
            count: Some(Refusal::Command),
        }
    }

    fn fleet(&self, m: Incoming) -> Route {
        if m.oversized() {
            let event = Event {
                level: Level::Warning,
                code: "bad_template".into(),
                message: format!(
                    "fleet template {} of {} bytes dropped: over the {} byte limit",
                    m.topic, m.size, self.bounds.link_limit
                ),
                request_id: None,
                request_ids: Vec::new(),
            };
            return Route::Refuse {
                event: Some(event),
                count: None,
            };
        }
        // an empty retained message clears the topic: nothing to install
        if m.payload.is_empty() {
            return Route::Ignore;
        }
        let message = format!("fleet template {} not installed: queue full", m.topic);
        Route::Submit {
            job: Job::Fleet(m.payload),
            if_full: Some(overloaded(Level::Warning, message, None)),
            count: None,
        }
    }

    /// An interval capture: only while armed and idle. With the outbox full, captures stop
    /// (the same bound as commands) and the pause is said once.
    pub fn capture_tick(&mut self, armed: bool, depth: usize, outbox_full: bool) -> Route {
        if !armed || depth > 0 {
            return Route::Ignore;
        }
        let said = std::mem::replace(&mut self.captures_paused, outbox_full);
        if outbox_full {
            let message =
                "the result outbox is full (broker unreachable?); interval captures paused";
            return Route::Refuse {
                event: (!said).then(|| overloaded(Level::Error, message.into(), None)),
                count: Some(Refusal::Capture),
            };
        }
        Route::Submit {
            job: Job::Tick,
            if_full: None,
            count: Some(Refusal::Capture),
        }
    }

    /// The link's running count of incoming messages it dropped unread: an event for the new
    /// ones, so that none is dropped silently.
    pub fn dropped_incoming(&mut self, total: u64) -> Option<Event> {
        if total <= self.seen_dropped {
            return None;
        }
        let n = total - std::mem::replace(&mut self.seen_dropped, total);
        Some(overloaded(
            Level::Error,
            format!("{n} incoming messages dropped unread: the station could not keep up"),
            None,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        Router::new(Bounds {
            cmd_topic: "t/s/cmd".into(),
            admin_topic: "t/s/admin".into(),
            fleet_prefix: "t/fleet/template/".into(),
            max_payload_bytes: 100,
            link_limit: 1000,
            queue: 8,
        })
    }

    fn cmd(payload: &str) -> Incoming {
        Incoming::new("t/s/cmd".into(), payload.as_bytes().to_vec())
    }

    fn code(r: &Route) -> Option<&str> {
        match r {
            Route::Refuse { event, .. } => event.as_ref().map(|e| e.code.as_str()),
            Route::Submit { if_full, .. } => if_full.as_ref().map(|e| e.code.as_str()),
            _ => None,
        }
    }

    #[test]
    fn status_is_answered_at_the_door_even_with_the_outbox_full() {
        let r = router();
        assert_eq!(
            r.incoming(cmd(r#"{"id":"s1","op":"status"}"#), true),
            Route::Status
        );
        // a status with stray fields is a bad command: the station says so
        let stray = r.incoming(cmd(r#"{"id":"s1","op":"status","x":1}"#), false);
        assert!(
            matches!(
                stray,
                Route::Submit {
                    job: Job::Command(_),
                    ..
                }
            ),
            "{stray:?}"
        );
    }

    #[test]
    fn commands_are_queued_or_refused_with_their_request_id() {
        let r = router();
        let t = r#"{"id":"t1","op":"trigger"}"#;
        match r.incoming(cmd(t), false) {
            Route::Submit {
                job: Job::Command(p),
                if_full: Some(e),
                count: Some(Refusal::Command),
            } => {
                assert_eq!(p, t.as_bytes());
                assert_eq!(e.request_id.as_deref(), Some("t1"));
            }
            other => panic!("{other:?}"),
        }
        match r.incoming(cmd(t), true) {
            Route::Refuse {
                event: Some(e),
                count: Some(Refusal::Command),
            } => assert_eq!(
                (e.code.as_str(), e.request_id.as_deref()),
                ("overloaded", Some("t1"))
            ),
            other => panic!("{other:?}"),
        }
        let big = format!(r#"{{"id":"b","op":"learn","name":"{}"}}"#, "x".repeat(200));
        assert_eq!(code(&r.incoming(cmd(&big), false)), Some("bad_command"));
    }

    #[test]
    fn admin_commands_are_queued_as_admin_jobs_under_the_same_bounds() {
        let r = router();
        let admin = |p: &str| Incoming::new("t/s/admin".into(), p.as_bytes().to_vec());
        let publish = r#"{"id":"p1","op":"templates.publish","name":"polish"}"#;
        match r.incoming(admin(publish), false) {
            Route::Submit {
                job: Job::Admin(p),
                if_full: Some(e),
                count: Some(Refusal::Command),
            } => {
                assert_eq!(p, publish.as_bytes());
                assert_eq!(e.request_id.as_deref(), Some("p1"));
            }
            other => panic!("{other:?}"),
        }
        // the same command on cmd is a plain command: the station refuses it there
        assert!(matches!(
            r.incoming(cmd(publish), false),
            Route::Submit {
                job: Job::Command(_),
                ..
            }
        ));
        assert_eq!(code(&r.incoming(admin(publish), true)), Some("overloaded"));
        let big = format!(r#"{{"id":"b","op":"x","name":"{}"}}"#, "x".repeat(200));
        assert_eq!(code(&r.incoming(admin(&big), false)), Some("bad_command"));
        assert_eq!(
            r.incoming(admin(r#"{"id":"s","op":"status"}"#), false),
            Route::Status
        );
    }

    #[test]
    fn fleet_messages_are_installed_ignored_or_dropped() {
        let r = router();
        let fleet = |p: &[u8], size| Incoming {
            topic: "t/fleet/template/a".into(),
            payload: p.to_vec(),
            size,
        };
        assert!(matches!(
            r.incoming(fleet(b"TKS2", 4), false),
            Route::Submit {
                job: Job::Fleet(_),
                count: None,
                ..
            }
        ));
        assert_eq!(r.incoming(fleet(b"", 0), false), Route::Ignore);
        assert_eq!(
            code(&r.incoming(fleet(b"", 5000), false)),
            Some("bad_template")
        );
        let other = Incoming::new("t/s/other".into(), b"x".to_vec());
        assert_eq!(r.incoming(other, false), Route::Ignore);
    }

    #[test]
    fn interval_captures_pause_once_for_a_full_outbox_and_resume() {
        let mut r = router();
        assert_eq!(r.capture_tick(false, 0, false), Route::Ignore);
        assert_eq!(r.capture_tick(true, 1, false), Route::Ignore);
        assert!(matches!(
            r.capture_tick(true, 0, false),
            Route::Submit { job: Job::Tick, .. }
        ));
        let paused = r.capture_tick(true, 0, true);
        assert_eq!(code(&paused), Some("overloaded"));
        // still full: counted, not said again
        assert_eq!(
            r.capture_tick(true, 0, true),
            Route::Refuse {
                event: None,
                count: Some(Refusal::Capture)
            }
        );
        assert!(matches!(
            r.capture_tick(true, 0, false),
            Route::Submit { .. }
        ));
        assert_eq!(code(&r.capture_tick(true, 0, true)), Some("overloaded"));
    }

    #[test]
    fn dropped_messages_are_reported_once_each() {
        let mut r = router();
        assert!(r.dropped_incoming(0).is_none());
        let e = r.dropped_incoming(3).unwrap();
        assert!(e.message.starts_with("3 incoming"), "{}", e.message);
        assert!(r.dropped_incoming(3).is_none());
        assert!(
            r.dropped_incoming(5)
                .unwrap()
                .message
                .starts_with("2 incoming")
        );
    }
}
