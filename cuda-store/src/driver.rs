//! The FFI edge: libcuda through cudarc's result layer (typed wrappers that
//! return `DriverError`), and `sys` for the entry points that layer lacks
//! (the virtual-memory and fd-export calls, host registration, 32-bit
//! memsets and stream writes, the driver version). Every result becomes a
//! `StoreError` here, or, when the context is lost, the end of the process.

use cudarc::driver::result::{self, stream::StreamKind, DriverError};
use cudarc::driver::sys;
use vramblk_store::StoreError;

/// Turns a driver call's result into a StoreError naming what was being
/// done. A context-fatal error ends the process instead (`context_lost`):
/// after it every call in the context fails, and a request answered with
/// an error would reach the process whose page it holds.
pub(crate) fn checked<T>(r: Result<T, DriverError>, what: &str) -> Result<T, StoreError> {
    r.map_err(|e| {
        if is_context_fatal(e) {
            context_lost(what, e);
        }
        StoreError::Unavailable(format!("{what}: {}", describe(e)))
    })
}

/// [`checked`] for a raw `sys` call (one the result layer lacks).
pub(crate) fn check(r: sys::CUresult, what: &str) -> Result<(), StoreError> {
    checked(r.result(), what)
}

/// The driver's words for `e`, with its code.
pub(crate) fn describe(e: DriverError) -> String {
    match e.error_string() {
        Ok(text) => format!("{} ({:?})", text.to_string_lossy(), e.0),
        Err(_) => format!("{:?}", e.0),
    }
}

/// Whether `e` means the context is lost: every later call in it fails the
/// same way (an illegal address or instruction in a kernel, a failed or
/// timed-out launch, an uncorrectable ECC error, a GPU that stopped). Any
/// other error is a refusal of that one call.
pub(crate) fn is_context_fatal(e: DriverError) -> bool {
    use sys::CUresult::*;
    matches!(
        e.0,
        CUDA_ERROR_ILLEGAL_ADDRESS
            | CUDA_ERROR_LAUNCH_FAILED
            | CUDA_ERROR_LAUNCH_TIMEOUT
            | CUDA_ERROR_ECC_UNCORRECTABLE
            | CUDA_ERROR_HARDWARE_STACK_ERROR
            | CUDA_ERROR_ILLEGAL_INSTRUCTION
            | CUDA_ERROR_MISALIGNED_ADDRESS
            | CUDA_ERROR_INVALID_ADDRESS_SPACE
            | CUDA_ERROR_INVALID_PC
            | CUDA_ERROR_CONTEXT_IS_DESTROYED
            | CUDA_ERROR_DEVICE_UNAVAILABLE
            | CUDA_ERROR_DEVICE_NOT_LICENSED
            | CUDA_ERROR_NOT_PERMITTED
            | CUDA_ERROR_SYSTEM_NOT_READY
            | CUDA_ERROR_UNKNOWN
    )
}

/// Exit status of a server whose CUDA context was lost (EX_TEMPFAIL): its
/// supervisor starts the next server, on a fresh context.
pub const CONTEXT_LOST_EXIT: i32 = 75;

/// The context is lost: ends the process at once, answering none of the
/// requests in flight. The kernel issues them again to the next server
/// (ublk's USER_RECOVERY_REISSUE), which imports the VRAM the supervisor
/// holds into a fresh context; no request sees an error.
pub(crate) fn context_lost(what: &str, e: DriverError) -> ! {
    log::error!(
        "the GPU's context is lost ({what}: {}); this server stops without answering its \
         requests in flight, the next one takes them over on a fresh context",
        describe(e)
    );
    // libc: std has no _exit, and rustix's exit_group is for runtimes
    // that replace the C library.
    // SAFETY: _exit ends the process at once: no destructor runs, so no
    // queue answers anything and nothing touches the lost context again.
    unsafe { libc::_exit(CONTEXT_LOST_EXIT) }
}

/// Runs a driver call; a refused call (not context-fatal) is tried once
/// more. A context-fatal result ends the process (`context_lost`).
pub(crate) fn retried_once<T>(
    what: &str,
    mut call: impl FnMut() -> Result<T, DriverError>,
) -> Result<T, DriverError> {
    let mut r = call();
    if let Err(e) = &r {
        if !is_context_fatal(*e) {
            log::warn!("{what}: {}; trying once more", describe(*e));
            r = call();
        }
    }
    if let Err(e) = &r {
        if is_context_fatal(*e) {
            context_lost(what, *e);
        }
    }
    r
}

/// Loads libcuda and initialises the driver, or says in one sentence why not.
pub(crate) fn init() -> Result<i32, StoreError> {
    // SAFETY: only probes whether the shared library can be opened.
    if !unsafe { sys::is_culib_present() } {
        return Err(StoreError::Unavailable(
            "no CUDA driver: libcuda.so could not be loaded (install the NVIDIA driver, or use --backend host)".into(),
        ));
    }
    if let Err(e) = result::init() {
        return Err(StoreError::Unavailable(format!(
            "the CUDA driver found no usable NVIDIA GPU: {}",
            describe(e)
        )));
    }
    let mut version = 0;
    // SAFETY: valid out-pointer (the result layer has no call for this).
    check(
        unsafe { sys::cuDriverGetVersion(&mut version) },
        "cuDriverGetVersion",
    )?;
    if version < 11030 {
        return Err(StoreError::Unavailable(format!(
            "the NVIDIA driver supports CUDA {}.{}; vramblk needs 11.3 or newer",
            version / 1000,
            (version % 1000) / 10
        )));
    }
    Ok(version)
}

/// A new non-blocking stream on the context current on this thread;
/// `what` names it in the error.
pub(crate) fn new_stream(what: &str) -> Result<sys::CUstream, StoreError> {
    checked(result::stream::create(StreamKind::NonBlocking), what)
}

/// A stream whose work its owner waits for at once: the map's records
/// (a queue's first write to an extent, a discard) and the moves of a
/// give-back. Destroyed, after its work, when dropped.
pub(crate) struct SyncStream(sys::CUstream);

impl SyncStream {
    /// On the context current on this thread.
    pub(crate) fn new() -> Result<SyncStream, StoreError> {
        new_stream("cuStreamCreate").map(SyncStream)
    }

    /// Queues a copy of `len` bytes of VRAM from `src` to `dst`.
    ///
    /// # Safety
    /// Both ranges are mapped, and nothing else uses them until [`wait`].
    ///
    /// [`wait`]: SyncStream::wait
    pub(crate) unsafe fn copy(&self, dst: u64, src: u64, len: usize) -> Result<(), StoreError> {
        // SAFETY: as the caller promised.
        checked(
            unsafe { result::memcpy_dtod_async(dst, src, len, self.0) },
            "copying VRAM",
        )
    }

    /// Queues zeroing `len` bytes of VRAM at `at`.
    ///
    /// # Safety
    /// The range is mapped, and nothing else uses it until [`wait`].
    ///
    /// [`wait`]: SyncStream::wait
    pub(crate) unsafe fn zero(&self, at: u64, len: usize) -> Result<(), StoreError> {
        // SAFETY: as the caller promised.
        checked(
            unsafe { result::memset_d8_async(at, 0, len, self.0) },
            "zeroing VRAM",
        )
    }

    /// Queues writing the 32-bit `value` at `at` (a map entry).
    ///
    /// # Safety
    /// `at` is a mapped, 4-byte-aligned word nobody else writes meanwhile.
    pub(crate) unsafe fn put_u32(&self, at: u64, value: u32) -> Result<(), StoreError> {
        // SAFETY: as the caller promised (a 32-bit memset: not in the
        // result layer).
        check(
            unsafe { sys::cuMemsetD32Async(at, value, 1, self.0) },
            "writing the extent map",
        )
    }

    /// Queues writing the words `words` from host memory at `at` (page
    /// map entries).
    ///
    /// # Safety
    /// The range is mapped and nobody else writes it meanwhile; `words`
    /// stays where it is, unchanged, until [`wait`].
    ///
    /// [`wait`]: SyncStream::wait
    pub(crate) unsafe fn put(&self, at: u64, words: &[u64]) -> Result<(), StoreError> {
        // SAFETY: as the caller promised.
        checked(
            unsafe { result::memcpy_htod_async(at, words, self.0) },
            "writing the page map",
        )
    }

    /// Waits for everything queued.
    pub(crate) fn wait(&self) -> Result<(), StoreError> {
        // SAFETY: our own stream.
        checked(
            unsafe { result::stream::synchronize(self.0) },
            "waiting for VRAM work",
        )
    }
}

impl Drop for SyncStream {
    fn drop(&mut self) {
        // SAFETY: our stream; what it still runs is waited for first.
        unsafe {
            let _ = result::stream::synchronize(self.0);
            let _ = result::stream::destroy(self.0);
        }
    }
}
