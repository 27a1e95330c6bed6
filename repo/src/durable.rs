//! Durable means fsynced (SPEC §5): libgit2 writes objects, packs, refs and
//! reflogs through temporary files and renames, but fsyncs them only when
//! asked, process-wide. Every entry into this crate that writes asks first.

use std::sync::Once;

static FSYNC: Once = Once::new();

/// Turns on libgit2's fsync of everything it writes into a git directory
/// (`GIT_OPT_ENABLE_FSYNC_GITDIR`), once per process.
pub(crate) fn enable_fsync() {
    FSYNC.call_once(|| {
        libgit2_sys::init();
        // SAFETY: with this option git_libgit2_opts reads exactly one int
        // vararg and sets a process-wide flag; libgit2 is initialised above.
        let rc = unsafe {
            libgit2_sys::git_libgit2_opts(
                libgit2_sys::GIT_OPT_ENABLE_FSYNC_GITDIR as std::ffi::c_int,
                1 as std::ffi::c_int,
            )
        };
        if rc != 0 {
            tracing::error!(
                rc,
                "libgit2 refused to turn on fsync; writes may not be durable"
            );
        }
    });
}
