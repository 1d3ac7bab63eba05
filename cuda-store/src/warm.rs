//! Has a queue, when it opens, call once every driver entry point its hot
//! path calls. cudarc loads libcuda's symbols one at a time, each at its
//! first call, and loading one allocates (its name as a C string); a
//! server serving swap must not allocate once it serves (docs/design.md,
//! "No allocation while serving"), and the first lone checksummed write
//! or the first event wait could come with memory exhausted. Every call
//! here does real, harmless work on scratch VRAM of the caller's.

use crate::driver::checked;
use crate::kernel::{self, flags, Desc};
use crate::pinned::DescTable;
use cudarc::driver::result;
use cudarc::driver::sys;

/// Bytes of scratch VRAM [`entry_points`] needs.
pub(crate) const SCRATCH: usize = 1024;

/// Calls each hot-path entry point once on `stream` over `scratch`
/// ([`SCRATCH`] bytes of VRAM nothing else uses meanwhile), launching the
/// copy kernel `copy` over one descriptor in `table` when given (the table
/// is left empty), and waits for it all.
pub(crate) fn entry_points(
    stream: sys::CUstream,
    scratch: u64,
    copy: Option<(sys::CUfunction, &mut DescTable)>,
    stream_writes: bool,
) -> Result<(), vramblk_store::StoreError> {
    let mut host = [0u8; 64];
    // SAFETY: the scratch is the caller's VRAM of SCRATCH bytes; `host`
    // lives until the stream is synchronized below.
    unsafe {
        checked(
            result::memset_d8_async(scratch, 0, 256, stream),
            "cuMemsetD8Async",
        )?;
        checked(
            sys::cuMemsetD32Async(scratch + 256, 0, 16, stream).result(),
            "cuMemsetD32Async",
        )?;
        checked(
            result::memcpy_htod_async(scratch + 320, &host[..], stream),
            "cuMemcpyHtoDAsync",
        )?;
        checked(
            result::memcpy_dtod_async(scratch + 384, scratch + 320, 64, stream),
            "cuMemcpyDtoDAsync",
        )?;
        checked(
            result::memcpy_dtoh_async(&mut host[..], scratch + 384, stream),
            "cuMemcpyDtoHAsync",
        )?;
        if stream_writes {
            // Where the driver lacks it, the queues never call it either.
            let _ = sys::cuStreamWriteValue32_v2(stream, scratch + 448, 0, 0);
        }
    }
    let mut copy = copy;
    if let Some((function, table)) = copy.as_mut() {
        table.len = 0;
        let one = Desc {
            src: scratch,
            dst: scratch + 512,
            sums: 0,
            len: 64,
            flags: flags::COPY,
        };
        if table.push(one) {
            // SAFETY: the table holds one descriptor between two ranges of
            // the scratch; the stream is synchronized below.
            let launched = unsafe { kernel::launch(*function, table.dev, 1, stream) };
            checked(launched, "cuLaunchKernel (the copy kernel)")?;
        }
    }
    let event = checked(
        result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING),
        "cuEventCreate",
    )?;
    // SAFETY: our event on the caller's stream; destroyed below.
    let r = unsafe {
        checked(result::event::record(event, stream), "cuEventRecord")
            .and_then(|()| {
                checked(
                    result::stream::wait_event(
                        stream,
                        event,
                        sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                    ),
                    "cuStreamWaitEvent",
                )
            })
            .and_then(|()| checked(result::stream::synchronize(stream), "cuStreamSynchronize"))
            .map(|()| {
                // Done by now: this only resolves the query.
                let _ = result::event::query(event);
            })
    };
    // SAFETY: the stream has passed the event.
    let _ = unsafe { result::event::destroy(event) };
    if let Some((_, table)) = copy {
        table.len = 0;
    }
    r
}
