//! The page codec's GPU kernels (kernels/page_lz.cu, compiled to the
//! committed kernels/page_lz.ptx by `cargo xtask ptx`): a block per 4 KiB
//! page compressing it (a warp per [`SEGMENT`]-byte piece) into LZ4 blocks
//! exactly as vramblk-compress's reference does (same-filled pages found on
//! the way, pages that do not shrink copied whole), a warp per page
//! decompressing them back.
//!
//! A compressed device's queues launch them (packed/queue.rs); engine-bench's
//! compress check holds them to the reference on the GPU and times them.

use crate::driver::checked;
use cudarc::driver::{result, sys};
use vramblk_compress::{lz::SEGMENT, PAGE};
use vramblk_store::StoreError;

/// The kernels' PTX (ISA 8.2 for sm_70: drivers from 535 compile it).
pub const PTX: &str = include_str!("../kernels/page_lz.ptx");

/// compress_pages's block: a warp per piece of one page, as page_lz.cu's
/// `THREADS`.
pub const COMPRESS_THREADS: u32 = 32 * (PAGE / SEGMENT) as u32;

/// decompress_pages's pages (warps) per block, as page_lz.cu's
/// `DECOMPRESS_WARPS`.
pub const DECOMPRESS_PAGES_PER_BLOCK: u32 = 2;

/// What a page became, or what decompressing found (`PageJob::kind`).
pub mod kind {
    pub const COMPRESSED: u32 = 0;
    pub const SAME: u32 = 1;
    pub const RAW: u32 = 2;
    /// Set by the decompress kernel on a block that is not a page.
    pub const CORRUPT: u32 = 1 << 31;
}

/// One page's job, as page_lz.cu's `PageJob`: for compression `src` is the
/// page and `dst` a 4096-byte staging slot, and the kernel sets `kind`,
/// `len` (4096 for a raw page, copied whole) and `word` (same-filled);
/// for decompression `src` is the block, `dst` the page, and `kind`,
/// `len` and `word` what compression left. Addresses are device addresses
/// (VRAM or a pinned buffer's device-mapped alias), 16-byte aligned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageJob {
    pub src: u64,
    pub dst: u64,
    pub word: u64,
    pub len: u32,
    pub kind: u32,
}

/// The loaded module and its two functions, in the current context.
pub struct PageKernels {
    module: sys::CUmodule,
    compress: sys::CUfunction,
    decompress: sys::CUfunction,
}

impl PageKernels {
    /// JIT-compiles the PTX in the current context.
    pub fn load() -> Result<PageKernels, StoreError> {
        let src = std::ffi::CString::new(PTX)
            .map_err(|_| StoreError::Invalid("the page kernels' PTX holds a NUL byte".into()))?;
        // SAFETY: a NUL-terminated PTX image, alive through the call.
        let module = checked(
            unsafe { result::module::load_data(src.as_ptr().cast()) },
            "loading the page kernels (cuModuleLoadData)",
        )?;
        let find = |name: &std::ffi::CStr| {
            // SAFETY: the module loaded above and not unloaded yet.
            checked(
                unsafe { result::module::get_function(module, name.into()) },
                "finding a page kernel",
            )
        };
        match (find(c"compress_pages"), find(c"decompress_pages")) {
            (Ok(compress), Ok(decompress)) => Ok(PageKernels {
                module,
                compress,
                decompress,
            }),
            (Err(e), _) | (_, Err(e)) => {
                // SAFETY: the module loaded above, used by nothing.
                let _ = unsafe { result::module::unload(module) };
                Err(e)
            }
        }
    }

    /// The two functions, to launch while this value (which keeps the
    /// module loaded) lives.
    pub fn launcher(&self) -> PageLaunch {
        PageLaunch {
            compress: self.compress,
            decompress: self.decompress,
        }
    }
}

/// The loaded kernels' functions, as a queue holds them.
#[derive(Clone, Copy)]
pub struct PageLaunch {
    compress: sys::CUfunction,
    decompress: sys::CUfunction,
}

impl PageLaunch {
    /// Launches `compress_pages(jobs, n)` on `stream`.
    ///
    /// # Safety
    /// `jobs` is the device address of `n` jobs; they and every address in
    /// them stay valid until the stream has passed the launch, and the
    /// [`PageKernels`] this came from is still loaded.
    pub unsafe fn compress(
        &self,
        jobs: sys::CUdeviceptr,
        n: u32,
        stream: sys::CUstream,
    ) -> Result<(), StoreError> {
        // SAFETY: as the caller promises.
        unsafe { launch(self.compress, jobs, n, (n, COMPRESS_THREADS), stream) }
    }

    /// Launches `decompress_pages(jobs, n)` on `stream`.
    ///
    /// # Safety
    /// As [`PageLaunch::compress`].
    pub unsafe fn decompress(
        &self,
        jobs: sys::CUdeviceptr,
        n: u32,
        stream: sys::CUstream,
    ) -> Result<(), StoreError> {
        let blocks = n.div_ceil(DECOMPRESS_PAGES_PER_BLOCK);
        let threads = 32 * DECOMPRESS_PAGES_PER_BLOCK;
        // SAFETY: as the caller promises.
        unsafe { launch(self.decompress, jobs, n, (blocks, threads), stream) }
    }
}

impl Drop for PageKernels {
    fn drop(&mut self) {
        // SAFETY: unloading the module this value loaded, in the context
        // its owner keeps current and retained.
        let _ = unsafe { result::module::unload(self.module) };
    }
}

/// One launch of `(blocks, threads)` over `n` jobs.
///
/// # Safety
/// `function` is one of the loaded page kernels; see [`PageLaunch::compress`].
unsafe fn launch(
    function: sys::CUfunction,
    jobs: sys::CUdeviceptr,
    n: u32,
    (blocks, threads): (u32, u32),
    stream: sys::CUstream,
) -> Result<(), StoreError> {
    if n == 0 {
        return Ok(());
    }
    let (mut jobs, mut n) = (jobs, n);
    let mut params = [
        (&mut jobs as *mut sys::CUdeviceptr).cast::<std::ffi::c_void>(),
        (&mut n as *mut u32).cast::<std::ffi::c_void>(),
    ];
    checked(
        // SAFETY: the parameters match the kernels' (PageJob*, unsigned);
        // the caller keeps what they point at alive.
        unsafe {
            result::launch_kernel(
                function,
                (blocks, 1, 1),
                (threads, 1, 1),
                0,
                stream,
                &mut params,
            )
        },
        "launching a page kernel",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_layout_is_the_kernels() {
        assert_eq!(std::mem::size_of::<PageJob>(), 32);
        assert_eq!(std::mem::offset_of!(PageJob, word), 16);
        assert_eq!(std::mem::offset_of!(PageJob, len), 24);
        assert_eq!(std::mem::offset_of!(PageJob, kind), 28);
    }

    #[test]
    fn the_ptx_has_both_entries_and_the_block_shape() {
        assert!(PTX.contains(".entry compress_pages("));
        assert!(PTX.contains(".entry decompress_pages("));
        let cu = include_str!("../kernels/page_lz.cu");
        assert!(cu.contains(&format!(
            "#define DECOMPRESS_WARPS {DECOMPRESS_PAGES_PER_BLOCK}\n"
        )));
        assert!(cu.contains(&format!("#define SEGMENT {SEGMENT}\n")));
        assert!(cu.contains("#define THREADS (32 * SEGMENTS)\n"));
        assert!(cu.contains("#define SEGMENTS (PAGE / SEGMENT)\n"));
        assert!(cu.contains(&format!("#define KIND_SAME {}\n", kind::SAME)));
        assert!(cu.contains(&format!("#define KIND_RAW {}\n", kind::RAW)));
        assert!(cu.contains("#define KIND_CORRUPT 0x80000000u\n"));
    }
}
