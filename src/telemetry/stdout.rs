//! Standard output for log lines, where a call's lines (its log line and its audit event) are
//! written together, in one `write(2)` rather than one each. Standard output is a pipe on
//! Kubernetes (to the container runtime) and in `make bench`: each write is a system call and
//! wakes the reader.

use std::cell::RefCell;
use std::io::{self, Write};
use std::marker::PhantomData;

use tracing_subscriber::fmt::MakeWriter;

/// A held buffer that grew past this is given back rather than kept for the thread's next call.
const KEPT_CAPACITY: usize = 16 * 1024;

thread_local! {
    /// The lines this thread holds while a [`Together`] is open on it.
    static HELD: RefCell<Held> = const {
        RefCell::new(Held {
            open: false,
            bytes: Vec::new(),
        })
    };
}

struct Held {
    open: bool,
    bytes: Vec<u8>,
}

/// While it lives, the log lines its thread writes are held; they are written in one piece
/// when it is dropped, also while unwinding from a panic. Opened while another is open on the
/// same thread, it holds nothing of its own: the outer one writes them all.
#[must_use = "the lines are written when it is dropped"]
pub(crate) struct Together {
    /// Whether this one opened the hold (it is the outermost).
    opened: bool,
    /// Not `Send`: held across an `.await`, it could be dropped on another thread, leaving
    /// this one holding its lines for good.
    _this_thread: PhantomData<*const ()>,
}

/// Holds this thread's log lines until the guard is dropped: a call's lines are written at
/// the end of its last event, at once, and cost one system call.
pub(crate) fn together() -> Together {
    let opened = HELD
        .try_with(|held| !std::mem::replace(&mut held.borrow_mut().open, true))
        .unwrap_or(false);
    Together {
        opened,
        _this_thread: PhantomData,
    }
}

impl Drop for Together {
    fn drop(&mut self) {
        if !self.opened {
            return;
        }
        let _ = HELD.try_with(|held| {
            let mut held = held.borrow_mut();
            held.open = false;
            if !held.bytes.is_empty()
                && let Err(err) = emit(&held.bytes)
            {
                // As tracing-subscriber reports a line it cannot write; never a panic here,
                // which may run while unwinding.
                let _ = writeln!(
                    io::stderr().lock(),
                    "[password-recovery] unable to write log lines: {err}"
                );
            }
            held.bytes.clear();
            if held.bytes.capacity() > KEPT_CAPACITY {
                held.bytes = Vec::new();
            }
        });
    }
}

/// The log layers' writer: each line to standard output at once, or held while a
/// [`Together`] is open on the thread.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Stdout;

impl MakeWriter<'_> for Stdout {
    type Writer = Stdout;

    fn make_writer(&self) -> Stdout {
        Stdout
    }
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    /// tracing-subscriber hands over each line whole, in one call.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let held = HELD
            .try_with(|held| {
                let mut held = held.borrow_mut();
                if held.open {
                    held.bytes.extend_from_slice(buf);
                }
                held.open
            })
            .unwrap_or(false);
        if held { Ok(()) } else { emit(buf) }
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush()
    }
}

/// Writes whole lines to standard output (a test's recorder, in unit tests that set one).
fn emit(bytes: &[u8]) -> io::Result<()> {
    #[cfg(test)]
    if tests::recorded(bytes) {
        return Ok(());
    }
    io::stdout().lock().write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// The writes this thread's test records, one entry per write.
        static WRITES: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
    }

    /// Records `bytes` as one write, if this thread's test records them.
    pub(super) fn recorded(bytes: &[u8]) -> bool {
        WRITES.with(|writes| match &mut *writes.borrow_mut() {
            Some(writes) => {
                writes.push(String::from_utf8(bytes.to_vec()).unwrap());
                true
            }
            None => false,
        })
    }

    /// The writes `logs` makes through a JSON log layer on `Stdout`, in order.
    fn writes_of(logs: impl FnOnce()) -> Vec<String> {
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(Stdout)
            .finish();
        WRITES.set(Some(Vec::new()));
        tracing::subscriber::with_default(subscriber, logs);
        WRITES.take().unwrap()
    }

    fn written_so_far() -> usize {
        WRITES.with_borrow(|writes| writes.as_ref().unwrap().len())
    }

    fn messages(write: &str) -> Vec<String> {
        write
            .lines()
            .map(|line| {
                let line: serde_json::Value = serde_json::from_str(line).unwrap();
                line["fields"]["message"].as_str().unwrap().to_owned()
            })
            .collect()
    }

    #[test]
    fn a_calls_lines_are_written_in_one_write_when_it_ends() {
        let writes = writes_of(|| {
            let together = together();
            tracing::info!("call finished");
            tracing::info!(target: "audit", "audit");
            assert_eq!(written_so_far(), 0, "held until the guard is dropped");
            drop(together);
            assert_eq!(written_so_far(), 1);
        });
        assert_eq!(writes.len(), 1);
        assert!(writes[0].ends_with('\n'));
        assert_eq!(messages(&writes[0]), ["call finished", "audit"]);
    }

    #[test]
    fn lines_outside_a_call_are_written_each_at_once() {
        let writes = writes_of(|| {
            tracing::info!("one");
            assert_eq!(written_so_far(), 1);
            tracing::info!("two");
        });
        assert_eq!(
            writes.iter().map(|w| messages(w)).collect::<Vec<_>>(),
            [["one"], ["two"]]
        );
    }

    #[test]
    fn a_hold_opened_inside_another_leaves_the_writing_to_the_outer_one() {
        let writes = writes_of(|| {
            let outer = together();
            tracing::info!("one");
            drop(together());
            tracing::info!("two");
            assert_eq!(written_so_far(), 0);
            drop(outer);
        });
        assert_eq!(writes.len(), 1);
        assert_eq!(messages(&writes[0]), ["one", "two"]);
        // Closed: the next line goes out at once again.
        let writes = writes_of(|| tracing::info!("three"));
        assert_eq!(writes.len(), 1);
    }

    #[test]
    fn held_lines_are_written_when_the_call_panics() {
        let writes = writes_of(|| {
            let unwound = std::panic::catch_unwind(|| {
                let _together = together();
                tracing::info!("before the fault");
                panic!("a fault");
            });
            assert!(unwound.is_err());
        });
        assert_eq!(writes.len(), 1);
        assert_eq!(messages(&writes[0]), ["before the fault"]);
    }

    #[test]
    fn a_buffer_grown_past_its_keep_is_given_back() {
        let long = "x".repeat(KEPT_CAPACITY * 2);
        let writes = writes_of(|| {
            let _together = together();
            tracing::info!(long, "long");
        });
        assert_eq!(writes.len(), 1);
        assert!(HELD.with_borrow(|held| held.bytes.capacity() == 0 && !held.open));
    }
}
