//! A large firewall transaction runs off the engine thread.
//!
//! `iptables-restore` of a 20,000-rule `apply` takes seconds. While it runs
//! on the firewall thread, the engine keeps answering the requests that only
//! read its state (`ping`, `ls` without counters, `export`, the dry run of
//! an `apply`), and keeps every other message (changes, Docker events,
//! ticks, `status`, shutdown) in arrival order until the driver is back
//! (`daemon::engine_loop`). Changes stay serial: the next one is planned
//! against the state the transaction leaves, so nothing here can interleave
//! two changes.
//!
//! The driver itself moves to the firewall thread and back with the
//! transaction's result ([`FirewallDone`]); the engine cannot touch the
//! kernel's rules meanwhile, by construction.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::firewall::{Drift, FirewallDriver, FirewallError};
use crate::model::Family;
use crate::state::{Delta, State};

use super::super::EngineMsg;
use super::{CommitTiming, Engine, FirewallWork, Next, Outcome};

/// Why [`Engine::fw`] cannot find the driver: a bug in what the engine
/// loop lets through while a transaction runs.
pub(super) const LENT: &str =
    "the firewall driver is out on a transaction; messages that need it must wait for it";

/// What runs on the engine thread once the commit has an outcome.
pub type Then = Box<dyn FnOnce(&mut Engine, Outcome<()>) + Send>;

/// What the engine waits for while the driver is out.
pub(super) enum InFlight {
    /// A commit: what to finish it with.
    Commit {
        next: Next,
        then: Then,
        render: Duration,
    },
    /// The periodic drift check, started then.
    DriftCheck { started: Instant },
}

/// What the firewall thread does with the driver.
enum Work {
    /// Bring the kernel to what a commit needs (one transaction per
    /// changed family).
    Apply {
        work: FirewallWork,
        families: Vec<Family>,
    },
    /// Read each family back and compare it with what the driver applied.
    Drift { families: Vec<Family> },
}

/// How the work went.
enum Answer {
    Applied(Result<(), FirewallError>),
    Drift(Vec<(Family, Result<Drift, FirewallError>)>),
}

/// One job for the firewall thread.
struct Job {
    fw: Box<dyn FirewallDriver>,
    work: Work,
    answer: mpsc::Sender<EngineMsg>,
}

/// The firewall thread's answer: the driver back, and how it went.
pub struct FirewallDone {
    fw: Box<dyn FirewallDriver>,
    answer: Answer,
    took: Duration,
}

/// The thread that runs lent transactions, started on first use.
#[derive(Default)]
pub(super) struct FirewallThread {
    jobs: Option<mpsc::Sender<Job>>,
}

impl FirewallThread {
    /// Hands `job` to the thread (starting it if needed); gives it back
    /// when no thread can take it.
    fn send(&mut self, job: Job) -> Result<(), Box<Job>> {
        if self.jobs.is_none() {
            let (tx, rx) = mpsc::channel::<Job>();
            let started = std::thread::Builder::new()
                .name("natmap-firewall".into())
                .spawn(move || run_jobs(&rx));
            if started.is_err() {
                return Err(Box::new(job));
            }
            self.jobs = Some(tx);
        }
        let tx = self.jobs.as_ref().expect("started above");
        tx.send(job).map_err(|mpsc::SendError(job)| {
            self.jobs = None;
            Box::new(job)
        })
    }
}

fn run_jobs(jobs: &mpsc::Receiver<Job>) {
    while let Ok(Job {
        mut fw,
        work,
        answer,
    }) = jobs.recv()
    {
        let started = Instant::now();
        let answer_of = match work {
            Work::Apply { work, families } => {
                Answer::Applied(guarded(&mut fw, |fw| work.run(fw, &families)))
            }
            Work::Drift { families } => Answer::Drift(
                families
                    .into_iter()
                    .map(|family| (family, guarded(&mut fw, |fw| fw.drift(family))))
                    .collect(),
            ),
        };
        let done = FirewallDone {
            fw,
            answer: answer_of,
            took: started.elapsed(),
        };
        // An engine that is gone has nothing left to finish.
        let _ = answer.send(EngineMsg::FirewallDone(Box::new(done)));
    }
}

/// Runs one driver call; a panic in it becomes an error, so the driver
/// still goes back to the engine (which would otherwise wait for it
/// forever).
fn guarded<T>(
    fw: &mut Box<dyn FirewallDriver>,
    call: impl FnOnce(&mut dyn FirewallDriver) -> Result<T, FirewallError>,
) -> Result<T, FirewallError> {
    catch_unwind(AssertUnwindSafe(|| call(fw.as_mut()))).unwrap_or_else(|_| {
        // The driver's mirror may be half updated: the next change
        // rewrites natmap's chains whole instead of trusting it.
        fw.forget();
        Err(FirewallError::Unavailable {
            program: fw.name().to_owned(),
            message: "the firewall thread panicked; nothing is known to be changed".into(),
        })
    })
}

impl Engine {
    /// Whether a transaction runs off this thread: the driver is lent, and
    /// the engine loop handles only [`EngineMsg::serves_while_lent`]
    /// messages until [`Engine::firewall_done`].
    pub fn firewall_lent(&self) -> bool {
        self.firewall.driver.is_none()
    }

    /// Commits `next` like [`Engine::commit`], with the firewall step on
    /// the firewall thread; `then` runs on the engine thread with the
    /// outcome. Without a daemon around it (unit tests), in a dry run, or
    /// when no thread can take the job, it commits on this thread before
    /// returning.
    pub(super) fn commit_off_thread(&mut self, next: State, then: Then) {
        self.commit_next_off_thread(Next::Whole(next), then);
    }

    /// [`Engine::commit_off_thread`] of a delta made to the state (rule
    /// requests): the firewall thread gets only the change.
    pub(super) fn commit_delta_off_thread(&mut self, delta: Delta, then: Then) {
        self.commit_next_off_thread(Next::Delta(delta), then);
    }

    fn commit_next_off_thread(&mut self, next: Next, then: Then) {
        let answer = match self.messages() {
            Some(tx) if self.simulated.is_none() => tx,
            _ => {
                let outcome = self.commit_next(next);
                then(self, outcome);
                return;
            }
        };
        let started = Instant::now();
        let job = Job {
            work: Work::Apply {
                work: self.firewall_work(&next),
                families: self.families(),
            },
            fw: self.firewall.driver.take().expect(LENT),
            answer,
        };
        let render = started.elapsed();
        match self.firewall.thread.send(job) {
            Ok(()) => self.firewall.in_flight = Some(InFlight::Commit { next, then, render }),
            Err(job) => {
                tracing::warn!("cannot start the firewall thread; applying on the engine thread");
                self.firewall.driver = Some(job.fw);
                let outcome = self.commit_next(next);
                then(self, outcome);
            }
        }
    }

    /// Starts the drift check of `families` on the firewall thread; the
    /// engine repairs what differs when the answer comes
    /// ([`Engine::firewall_done`]). False when it cannot (no daemon around
    /// it, no thread): the caller checks on this thread.
    pub(super) fn drift_check_off_thread(&mut self, families: Vec<Family>) -> bool {
        let Some(answer) = self.messages() else {
            return false;
        };
        let job = Job {
            work: Work::Drift { families },
            fw: self.firewall.driver.take().expect(LENT),
            answer,
        };
        match self.firewall.thread.send(job) {
            Ok(()) => {
                self.firewall.in_flight = Some(InFlight::DriftCheck {
                    started: Instant::now(),
                });
                true
            }
            Err(job) => {
                self.firewall.driver = Some(job.fw);
                false
            }
        }
    }

    /// The firewall thread is done: takes the driver back and finishes the
    /// commit (routes, state, or the rollback) and what waited on it.
    pub fn firewall_done(&mut self, done: FirewallDone) {
        self.firewall.driver = Some(done.fw);
        match (self.firewall.in_flight.take(), done.answer) {
            (Some(InFlight::Commit { next, then, render }), Answer::Applied(result)) => {
                let timing = CommitTiming {
                    render,
                    firewall: done.took,
                };
                let outcome = self.after_firewall(next, result, timing);
                then(self, outcome);
            }
            (Some(InFlight::DriftCheck { started }), Answer::Drift(drifts)) => {
                for (family, drift) in drifts {
                    self.repair_family(family, drift);
                }
                self.upkeep.last_drift_check = Some((started, done.took));
            }
            _ => tracing::error!("the firewall thread answered a job nobody waits for"),
        }
    }
}
