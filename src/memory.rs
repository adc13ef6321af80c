//! Memory given back: glibc's allocator keeps freed memory in its arenas, so after a burst the
//! process would stay at its peak. A background thread asks it to return free pages to the
//! system every [`TRIM_INTERVAL`] (`malloc_trim`), so resident memory falls back near its idle
//! level within seconds once load stops. Elsewhere than glibc, nothing is done.

use std::sync::Once;
use std::time::Duration;

/// How often free heap pages are given back.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(5);

/// Starts the trimming thread, once per process.
pub fn spawn_trimmer() {
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
