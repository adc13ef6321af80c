//! The one way files are watched while the service runs: TLS certificates and app client
//! secrets. Kubernetes rotates a mounted Secret by swapping a `..data` symlink, which file
//! watches miss, so each watched thing re-reads its files every interval and applies what
//! changed. A change that does not load keeps what is in use, and is reported once until the
//! problem changes or goes away.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

/// Something read from files and re-read while the service runs.
pub(crate) trait Watched: Send + Sync + 'static {
    /// Re-reads the files and applies them when they changed: true when something new is
    /// now in use, false when nothing changed; the problem when a change does not load
    /// (what was in use stays).
    fn reload(&self) -> Result<bool, String>;

    /// Counts and logs one outcome: reloaded, or failed with its problem.
    fn report(&self, outcome: Result<(), &str>);

    /// The counter of this one's outcomes with `result` (`reloaded` or `failed`).
    fn reloads(&self, result: &'static str) -> metrics::Counter;
}

/// Re-reads every one of `watched` each `interval` (until the task is aborted). Each change
/// is reported; a failing one once until its problem changes or goes away.
pub(crate) fn spawn(interval: Duration, watched: Vec<Arc<dyn Watched>>) -> JoinHandle<()> {
    // Both outcomes are counted from 0, so that the first failure is an increase.
    for watched in &watched {
        for result in ["reloaded", "failed"] {
            watched.reloads(result).increment(0);
        }
    }
    tokio::spawn(async move {
        let mut failing: Vec<Option<String>> = vec![None; watched.len()];
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            for (watched, failed) in watched.iter().zip(failing.iter_mut()) {
                poll(watched.as_ref(), failed);
            }
        }
    })
}

/// One poll of `watched`; `failed` is the problem reported last, if it still stands.
fn poll(watched: &dyn Watched, failed: &mut Option<String>) {
    match watched.reload() {
        Ok(false) => *failed = None,
        Ok(true) => {
            *failed = None;
            watched.report(Ok(()));
        }
        Err(problem) => {
            if failed.as_ref() != Some(&problem) {
                watched.report(Err(&problem));
                *failed = Some(problem);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Answers each poll with the next of its outcomes, and remembers what was reported.
    struct Script {
        outcomes: Mutex<Vec<Result<bool, String>>>,
        reported: Mutex<Vec<Result<(), String>>>,
    }

    impl Watched for Script {
        fn reload(&self) -> Result<bool, String> {
            self.outcomes.lock().unwrap().remove(0)
        }

        fn report(&self, outcome: Result<(), &str>) {
            self.reported
                .lock()
                .unwrap()
                .push(outcome.map_err(str::to_owned));
        }

        fn reloads(&self, result: &'static str) -> metrics::Counter {
            metrics::counter!("test_reloads_total", "result" => result)
        }
    }

    #[test]
    fn changes_are_reported_and_a_failure_once_until_it_changes_or_clears() {
        let fail = |p: &str| Err(p.to_owned());
        let script = Script {
            outcomes: Mutex::new(vec![
                Ok(false),
                Ok(true),
                fail("bad"),
                fail("bad"),
                fail("worse"),
                Ok(false),
                fail("worse"),
                Ok(true),
            ]),
            reported: Mutex::new(Vec::new()),
        };
        let mut failed = None;
        for _ in 0..8 {
            poll(&script, &mut failed);
        }
        assert_eq!(
            *script.reported.lock().unwrap(),
            [
                Ok(()),
                Err("bad".into()),
                Err("worse".into()),
                Err("worse".into()),
                Ok(())
            ]
        );
    }
}
