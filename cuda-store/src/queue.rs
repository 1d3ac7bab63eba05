//! One queue's data path: its own stream, its io buffers pinned once, one
//! event per round of requests, completions found by polling.

use crate::driver::check;
use cudarc::driver::sys;
use std::collections::VecDeque;
use vramblk_store::{BufferRegion, Completion, Op, QueueStore, Request, StoreError};

/// Requests issued together and the event recorded after them. Finished
/// rounds are kept (event and emptied list) for reuse, so the hot path
/// neither creates events nor allocates.
struct Round {
    event: sys::CUevent,
    completions: Vec<Completion>,
}

pub struct CudaQueue {
    ctx: sys::CUcontext,
    base: sys::CUdeviceptr,
    stream: sys::CUstream,
    pinned: *mut std::ffi::c_void,
    rounds: VecDeque<Round>,
    spare: Vec<Round>,
    in_flight: usize,
}

impl CudaQueue {
    pub(crate) fn open(
        ctx: sys::CUcontext,
        base: sys::CUdeviceptr,
        buffers: &BufferRegion,
    ) -> Result<CudaQueue, StoreError> {
        let mut q = CudaQueue {
            ctx,
            base,
            stream: std::ptr::null_mut(),
            pinned: std::ptr::null_mut(),
            rounds: VecDeque::new(),
            spare: Vec::new(),
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
        })
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
        for r in batch.drain(..) {
            let result = self.issue(&r);
            round.completions.push(Completion { tag: r.tag, result });
        }
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
            for r in self.rounds.drain(..) {
                sys::cuEventDestroy_v2(r.event);
            }
            for r in self.spare.drain(..) {
                sys::cuEventDestroy_v2(r.event);
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
