//! The approval screen's copies of each result: the capture and the result, shrunk to 8 bits
//! and [`KEPT_WIDTH`]. They are made off the line's path, on a thread of the lowest priority:
//! made on the pipeline thread once the result was handed on, they took 1-2 ms of a core while
//! the result went to the broker and the next trigger came in (`takumi bench`, session 13).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::display::RgbImage8;
use crate::frame::Frame;

/// The width of the 8-bit copies kept with each result (about 0.25 MB for both).
const KEPT_WIDTH: usize = 320;
/// Results whose copies may wait for the keeper. Beyond, the pipeline makes them itself, so that
/// the frames held for copying stay bounded on a station that is never idle.
const MOST_WAITING: usize = 2;

enum State {
    /// The two frames themselves (moved, not copied), shared with whoever makes the copies.
    Pending(Arc<(Frame, Frame)>),
    Made {
        before: RgbImage8,
        after: RgbImage8,
    },
}

/// One result's copies, made once by whoever needs them first: the keeper or an approval.
#[derive(Clone)]
pub struct Copies(Arc<Mutex<State>>);

impl Copies {
    pub fn new(capture: Frame, result: Frame) -> Copies {
        Copies(Arc::new(Mutex::new(State::Pending(Arc::new((
            capture, result,
        ))))))
    }

    /// The copies, made now if nobody made them yet.
    pub fn made(&self) -> (RgbImage8, RgbImage8) {
        let frames = match &*self.lock() {
            State::Made { before, after } => return (before.clone(), after.clone()),
            State::Pending(frames) => frames.clone(),
        };
        // made without the lock: an approval never waits for a keeper that is not running
        let before = RgbImage8::downscaled(&frames.0, KEPT_WIDTH);
        let after = RgbImage8::downscaled(&frames.1, KEPT_WIDTH);
        let mut state = self.lock();
        if matches!(*state, State::Pending(_)) {
            *state = State::Made {
                before: before.clone(),
                after: after.clone(),
            };
        }
        (before, after)
    }

    fn is_pending(&self) -> bool {
        matches!(*self.lock(), State::Pending(_))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // plain data, replaced whole: a panic elsewhere cannot leave it half-written
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Makes copies on a thread that runs only on a core nothing else wants (Linux `SCHED_IDLE`).
pub struct Keeper {
    queue: Option<Sender<Copies>>,
    waiting: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Keeper {
    /// The keeper's thread; without one (it could not be spawned) copies are made in `settle`.
    pub fn start() -> Keeper {
        let (tx, rx) = mpsc::channel::<Copies>();
        let waiting = Arc::new(AtomicUsize::new(0));
        let done = waiting.clone();
        let thread = std::thread::Builder::new()
            .name("takumi-copies".into())
            .spawn(move || {
                lowest_priority();
                for c in rx {
                    c.made();
                    done.fetch_sub(1, Ordering::Relaxed);
                }
            });
        let (queue, thread) = match thread {
            Ok(t) => (Some(tx), Some(t)),
            Err(e) => {
                tracing::warn!(error = %e, "no thread for the approval copies; made in line");
                (None, None)
            }
        };
        Keeper {
            queue,
            waiting,
            thread,
        }
    }

    /// Has `c`'s copies made by the keeper, or here when `MOST_WAITING` already wait for it.
    pub fn settle(&self, c: &Copies) {
        if !c.is_pending() {
            return;
        }
        if let Some(q) = &self.queue
            && self.waiting.load(Ordering::Relaxed) < MOST_WAITING
        {
            self.waiting.fetch_add(1, Ordering::Relaxed);
            if q.send(c.clone()).is_ok() {
                return;
            }
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        c.made();
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.queue = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The calling thread runs only when a core would otherwise idle. Best effort: a kernel that
/// refuses leaves it at normal priority, which is only slower for the line.
fn lowest_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for SCHED_IDLE.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            tracing::debug!(error = %e, "approval copies at normal priority");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(v: f32) -> Frame {
        let mut f = Frame::zeros(640, 480);
        f.data.iter_mut().enumerate().for_each(|(i, p)| {
            *p = v * (i % 7) as f32 / 7.0;
        });
        f
    }

    #[test]
    fn the_keeper_makes_the_copies_an_approval_would() {
        let inline = Copies::new(frame(0.5), frame(0.9)).made();
        let keeper = Keeper::start();
        let kept = Copies::new(frame(0.5), frame(0.9));
        keeper.settle(&kept);
        drop(keeper); // joins: the queue is done
        assert!(!kept.is_pending());
        let (before, after) = kept.made();
        assert_eq!((before.rgb, after.rgb), (inline.0.rgb, inline.1.rgb));
        assert_eq!((after.width, after.height), (320, 240));
    }

    /// A keeper whose thread never takes anything (its queue's receiver is gone).
    fn stuck(waiting: usize) -> Keeper {
        Keeper {
            queue: Some(mpsc::channel().0),
            waiting: Arc::new(AtomicUsize::new(waiting)),
            thread: None,
        }
    }

    #[test]
    fn copies_are_made_in_line_once_enough_wait() {
        let c = Copies::new(frame(0.2), frame(0.4));
        stuck(MOST_WAITING).settle(&c);
        assert!(!c.is_pending(), "made in line");
        let gone = stuck(0);
        let c = Copies::new(frame(0.2), frame(0.4));
        gone.settle(&c);
        assert!(!c.is_pending(), "made in line when the keeper is gone");
        assert_eq!(gone.waiting.load(Ordering::Relaxed), 0);
    }
}
