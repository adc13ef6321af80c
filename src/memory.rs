//! Memory given back: glibc's allocator keeps freed memory in its arenas, so after a burst the
//! process would stay at its peak. A background thread asks it to return free pages to the
//! system every [`TRIM_INTERVAL`] (`malloc_trim`), so resident memory falls back near its idle
//! level within seconds once load stops. Elsewhere than glibc, nothing is done.
//!
//! It also owns the worst-case bound of the process's memory ([`bound_bytes`]), the formula
//! the README states, the memory tests hold the release binary to, and the Deployment's
//! memory limit must cover with headroom.

use std::sync::Once;
use std::time::Duration;

/// How often free heap pages are given back.
pub(crate) const TRIM_INTERVAL: Duration = Duration::from_secs(5);

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// The process with nothing to do (measured: 12–15 MiB), with room.
pub(crate) const BASELINE_BYTES: u64 = 24 * MIB;
/// One open HTTP/2 connection at most: its connection window of unread data (128 KiB), a
/// header list (16 KiB), frame, read, write and TLS buffers.
pub(crate) const PER_CONNECTION_BYTES: u64 = 192 * KIB;
/// The header block an HTTP/1.1 client may send, on top of a request body.
pub(crate) const HTTP1_HEADER_BYTES: u64 = 16 * KIB;

/// One open connection at most: HTTP/2's, or an HTTP/1.1 read buffer holding what a client may
/// send unanswered (a header block and a body), at most twice that as the buffer grows, plus
/// write and TLS buffers (32 KiB).
pub(crate) fn per_connection_bytes(max_request_bytes: u64) -> u64 {
    PER_CONNECTION_BYTES.max(2 * (HTTP1_HEADER_BYTES + max_request_bytes) + 32 * KIB)
}
/// One per-username bucket (measured: 36 MiB for 1 000 000).
pub(crate) const PER_BUCKET_BYTES: u64 = 40;

/// One call in progress at most: its message (reserved whole by the decoder), the decoded
/// request, the JSON sent to Cognito, and Cognito's answer (at most 64 KiB).
pub(crate) fn per_call_bytes(max_request_bytes: u64) -> u64 {
    4 * max_request_bytes + 64 * KIB
}

/// One remembered idempotent outcome at most: its answer's texts (at most 1 KiB, else it is
/// not remembered), the decided error's structure, the key, fingerprint and map entry.
pub(crate) const PER_REMEMBERED_BYTES: u64 = 2 * KIB;

/// The worst case: baseline + connections × per connection + calls × per call + buckets ×
/// per bucket + remembered outcomes × per outcome.
pub fn bound_bytes(
    max_connections: u64,
    max_concurrent_calls: u64,
    max_request_bytes: u64,
    max_buckets: u64,
    max_remembered: u64,
) -> u64 {
    BASELINE_BYTES
        + max_connections * per_connection_bytes(max_request_bytes)
        + max_concurrent_calls * per_call_bytes(max_request_bytes)
        + max_buckets * PER_BUCKET_BYTES
        + max_remembered * PER_REMEMBERED_BYTES
}

/// Starts the trimming thread, once per process.
pub(crate) fn spawn_trimmer() {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            let spawned = std::thread::Builder::new()
                .name("malloc-trim".into())
                .spawn(|| {
                    loop {
                        std::thread::sleep(TRIM_INTERVAL);
                        // SAFETY: malloc_trim only releases free memory held by the allocator;
                        // it takes no pointer and is safe to call from any thread at any time.
                        unsafe {
                            libc::malloc_trim(0);
                        }
                    }
                });
            if let Err(err) = spawned {
                tracing::warn!(error = %err, "cannot start the malloc-trim thread");
            }
        }
    });
}
