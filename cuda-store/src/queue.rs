//! One queue's data path: its own stream, its io buffers pinned and
//! device-mapped once, one event per round of requests, completions found
//! by polling. Within a round, requests up to the kernel limit go out
//! together through one launch of the copy kernel; larger ones (and all of
//! them in DMA mode) as one async copy each on the copy engines.

use crate::driver::{check, describe};
use crate::kernel::{self, Desc, THREADS};
use crate::CopyPolicy;
use cudarc::driver::sys;
use std::collections::VecDeque;
use vramblk_store::{BufferRegion, Completion, Op, QueueStore, Request, StoreError};

/// A round's descriptors for the copy kernel, in pinned host memory the GPU
/// reads directly. Owned by its round, so a table is never rewritten while
/// a launch that reads it may still run.
struct DescTable {
    host: *mut Desc,
    dev: sys::CUdeviceptr,
    cap: usize,
    len: usize,
}

impl DescTable {
    const fn empty() -> DescTable {
        DescTable {
            host: std::ptr::null_mut(),
            dev: 0,
            cap: 0,
            len: 0,
        }
    }

    /// Makes room for `n` descriptors, dropping what the table held.
    fn reserve(&mut self, n: usize) -> Result<(), StoreError> {
        self.len = 0;
        if n <= self.cap {
            return Ok(());
        }
        self.free();
        let cap = n.next_power_of_two().max(256);
        let mut host = std::ptr::null_mut();
        // SAFETY: valid out-pointers; the allocation is freed in free().
        unsafe {
            check(
                sys::cuMemHostAlloc(
                    &mut host,
                    cap * std::mem::size_of::<Desc>(),
                    sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP,
                ),
                "allocating the copy kernel's descriptor table",
            )?;
            self.host = host.cast();
            self.cap = cap;
            check(
                sys::cuMemHostGetDevicePointer_v2(&mut self.dev, host, 0),
                "mapping the descriptor table",
            )?;
        }
        Ok(())
    }

    fn push(&mut self, d: Desc) {
        if self.len < self.cap {
            // SAFETY: len < cap, inside the allocation; the GPU does not
            // read this table until the launch that follows.
            unsafe { self.host.add(self.len).write(d) };
            self.len += 1;
        }
    }

    fn free(&mut self) {
        if !self.host.is_null() {
            // SAFETY: allocated by cuMemHostAlloc in reserve(); no launch
            // reading it is in flight (its round is finished).
            unsafe { sys::cuMemFreeHost(self.host.cast()) };
        }
        *self = DescTable::empty();
    }
}

impl Extend<Desc> for DescTable {
    fn extend<I: IntoIterator<Item = Desc>>(&mut self, iter: I) {
        for d in iter {
            self.push(d);
        }
    }
}

/// Requests issued together and the event recorded after them. Finished
/// rounds are kept (event, emptied list, descriptor table) for reuse, so
/// the hot path neither creates events nor allocates.
struct Round {
    event: sys::CUevent,
    completions: Vec<Completion>,
    descs: DescTable,
}

/// How a queue moves data, fixed when it opens.
#[derive(Clone, Copy)]
pub(crate) struct CopyPath {
    /// The loaded copy kernel; None: copy engines only.
    pub(crate) kernel: Option<sys::CUfunction>,
    pub(crate) policy: CopyPolicy,
}

pub struct CudaQueue {
    ctx: sys::CUcontext,
    base: sys::CUdeviceptr,
    stream: sys::CUstream,
    pinned: *mut std::ffi::c_void,
    /// The io buffers' address as the GPU sees them.
    pinned_dev: sys::CUdeviceptr,
    pinned_len: usize,
    path: CopyPath,
    rounds: VecDeque<Round>,
    spare: Vec<Round>,
    /// Scratch for a round's kernel-moved requests (kept for its capacity).
    kernel_done: Vec<Completion>,
    in_flight: usize,
}

impl CudaQueue {
    pub(crate) fn open(
        ctx: sys::CUcontext,
        base: sys::CUdeviceptr,
        buffers: &BufferRegion,
        path: CopyPath,
    ) -> Result<CudaQueue, StoreError> {
        let mut q = CudaQueue {
            ctx,
            base,
            stream: std::ptr::null_mut(),
            pinned: std::ptr::null_mut(),
            pinned_dev: 0,
            pinned_len: buffers.len(),
            path,
            rounds: VecDeque::new(),
            spare: Vec::new(),
            kernel_done: Vec::new(),
            in_flight: 0,
        };
        // The queue is used only on the thread that opens it (the queue's
        // own thread), so the context is made current once, here.
        // SAFETY: the context is retained by the store, which outlives us.
        check(unsafe { sys::cuCtxSetCurrent(ctx) }, "cuCtxSetCurrent")?;
        // SAFETY: valid out-pointer; the region outlives this queue (the
        // queue loop drops the store handle before its buffers).
        unsafe {
            check(
                sys::cuStreamCreate(
                    &mut q.stream,
                    sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
                ),
                "cuStreamCreate",
            )?;
            check(
                sys::cuMemHostRegister_v2(
                    buffers.base().cast(),
                    buffers.len(),
                    sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP,
                ),
                "pinning the io buffers (cuMemHostRegister)",
            )?;
        }
        q.pinned = buffers.base().cast();
        if q.path.kernel.is_some() {
            // SAFETY: the range was registered with DEVICEMAP just above.
            let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut q.pinned_dev, q.pinned, 0) };
            if let Err(e) = check(r, "mapping the io buffers for the GPU") {
                log::warn!("{e}; this queue uses the copy engines only");
                q.path.kernel = None;
            }
        }
        Ok(q)
    }

    fn take_round(&mut self) -> Result<Round, StoreError> {
        if let Some(r) = self.spare.pop() {
            return Ok(r);
        }
        let mut e = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        check(
            unsafe {
                sys::cuEventCreate(&mut e, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
            },
            "cuEventCreate",
        )?;
        Ok(Round {
            event: e,
            completions: Vec::new(),
            descs: DescTable::empty(),
        })
    }

    /// The device address of a request's buffer, when the request goes
    /// through the kernel.
    fn kernel_buffer(&self, r: &Request) -> Option<u64> {
        self.path.kernel?;
        if !r.op.uses_buffer() || r.len > self.path.policy.kernel_max {
            return None;
        }
        let at = (r.buf.as_ptr() as usize).checked_sub(self.pinned as usize)?;
        if at + r.len as usize > self.pinned_len {
            return None;
        }
        let buf = self.pinned_dev + at as u64;
        kernel::kernel_can_move(buf, self.base + r.offset, r.len).then_some(buf)
    }

    /// Launches the kernel over the round's table; false when it failed.
    fn launch(&self, descs: &DescTable) -> bool {
        if descs.len == 0 {
            return true;
        }
        let Some(function) = self.path.kernel else {
            return false;
        };
        let mut table = descs.dev;
        let mut n = descs.len as u32;
        let mut params = [
            (&mut table as *mut u64).cast::<std::ffi::c_void>(),
            (&mut n as *mut u32).cast::<std::ffi::c_void>(),
        ];
        // SAFETY: the parameters match copy_list(u64, u32); the table and
        // every address in it stay valid until the round's event completes.
        let r = unsafe {
            sys::cuLaunchKernel(
                function,
                n,
                1,
                1,
                THREADS,
                1,
                1,
                0,
                self.stream,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            log::error!("copy kernel launch ({n} pieces): {}", describe(r));
            return false;
        }
        true
    }

    /// Issues one request on the stream; its result once the stream
    /// reaches it.
    fn issue(&self, r: &Request) -> i32 {
        let dev = self.base + r.offset;
        let len = r.len as usize;
        // SAFETY: the engine checked offset+len against the store size and
        // len against the buffer; buffers are pinned and stay alive until
        // the round's event completes.
        let res = unsafe {
            match r.op {
                Op::Write => {
                    sys::cuMemcpyHtoDAsync_v2(dev, r.buf.as_ptr().cast(), len, self.stream)
                }
                Op::Read => sys::cuMemcpyDtoHAsync_v2(r.buf.as_ptr().cast(), dev, len, self.stream),
                Op::WriteZeroes => sys::cuMemsetD8Async(dev, 0, len, self.stream),
                // Stream order makes the round's event cover every earlier
                // write of this queue; discarded VRAM is simply kept.
                Op::Flush | Op::Discard => sys::CUresult::CUDA_SUCCESS,
            }
        };
        if res == sys::CUresult::CUDA_SUCCESS {
            r.len as i32
        } else {
            log::error!(
                "{:?} at {} (+{}): {}",
                r.op,
                r.offset,
                r.len,
                crate::driver::describe(res)
            );
            -libc::EIO
        }
    }
}

impl QueueStore for CudaQueue {
    fn submit(&mut self, batch: &mut Vec<Request>, done: &mut Vec<Completion>) {
        let mut round = match self.take_round() {
            Ok(r) => r,
            Err(e) => {
                log::error!("{e}");
                done.extend(batch.drain(..).map(|r| Completion {
                    tag: r.tag,
                    result: -libc::EIO,
                }));
                return;
            }
        };
        // Small requests first into the kernel's table, the rest straight
        // onto the copy engines; the launch goes after them on the stream.
        let (mut eligible, mut pieces) = (0usize, 0usize);
        for r in batch.iter().filter(|r| self.kernel_buffer(r).is_some()) {
            eligible += 1;
            pieces += kernel::piece_count(r.len);
        }
        let use_kernel = eligible >= self.path.policy.kernel_min_batch
            && match round.descs.reserve(pieces) {
                Ok(()) => true,
                Err(e) => {
                    log::error!("{e}; this round uses the copy engines");
                    false
                }
            };
        let mut kernel_done = std::mem::take(&mut self.kernel_done);
        for r in batch.drain(..) {
            if let (true, Some(buf)) = (use_kernel, self.kernel_buffer(&r)) {
                let vram = self.base + r.offset;
                let (src, dst) = match r.op {
                    Op::Write => (buf, vram),
                    _ => (vram, buf),
                };
                kernel::pieces(src, dst, r.len, &mut round.descs);
                kernel_done.push(Completion {
                    tag: r.tag,
                    result: r.len as i32,
                });
                continue;
            }
            let result = self.issue(&r);
            round.completions.push(Completion { tag: r.tag, result });
        }
        // A round that skipped the kernel left its table as it was: no launch.
        let launched = !use_kernel || self.launch(&round.descs);
        round
            .completions
            .extend(kernel_done.drain(..).map(|c| Completion {
                tag: c.tag,
                result: if launched { c.result } else { -libc::EIO },
            }));
        self.kernel_done = kernel_done;
        // SAFETY: event and stream are ours.
        match check(
            unsafe { sys::cuEventRecord(round.event, self.stream) },
            "cuEventRecord",
        ) {
            Ok(()) => {
                self.in_flight += round.completions.len();
                self.rounds.push_back(round);
            }
            Err(e) => {
                log::error!("{e}");
                // SAFETY: waiting on our own stream.
                let ok =
                    unsafe { sys::cuStreamSynchronize(self.stream) } == sys::CUresult::CUDA_SUCCESS;
                done.extend(round.completions.drain(..).map(|c| Completion {
                    tag: c.tag,
                    result: if ok { c.result } else { -libc::EIO },
                }));
                self.spare.push(round);
            }
        }
    }

    fn poll(&mut self, done: &mut Vec<Completion>) {
        while let Some(round) = self.rounds.front() {
            // SAFETY: querying our own event.
            let r = unsafe { sys::cuEventQuery(round.event) };
            if r == sys::CUresult::CUDA_ERROR_NOT_READY {
                break;
            }
            let Some(mut round) = self.rounds.pop_front() else {
                break;
            };
            self.in_flight -= round.completions.len();
            let failed = r != sys::CUresult::CUDA_SUCCESS;
            if failed {
                log::error!("a round of copies failed: {}", crate::driver::describe(r));
            }
            done.extend(round.completions.drain(..).map(|c| Completion {
                tag: c.tag,
                result: if failed { -libc::EIO } else { c.result },
            }));
            self.spare.push(round);
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}

impl Drop for CudaQueue {
    fn drop(&mut self) {
        // SAFETY: tearing down what open() made, after the stream drains.
        unsafe {
            sys::cuCtxSetCurrent(self.ctx);
            if !self.stream.is_null() {
                sys::cuStreamSynchronize(self.stream);
            }
            for mut r in self.rounds.drain(..).chain(self.spare.drain(..)) {
                sys::cuEventDestroy_v2(r.event);
                r.descs.free();
            }
            if !self.pinned.is_null() {
                sys::cuMemHostUnregister(self.pinned);
            }
            if !self.stream.is_null() {
                sys::cuStreamDestroy_v2(self.stream);
            }
        }
    }
}
