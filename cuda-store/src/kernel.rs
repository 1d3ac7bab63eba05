//! The copy kernel: one launch moves the requests of a queue round between
//! VRAM and the queue's pinned, device-mapped io buffers, and with page
//! checksums on computes each page's CRC32C as it moves it (stored on a
//! write, compared on a read; [`crate::integrity`]). The SMs read and write
//! host memory over PCIe directly, which beats one copy-engine call per
//! 4 KiB page by an order of magnitude (measured on the H100 and the H200:
//! 0.3-0.4 M IOPS per-call versus 2.3-12 M IOPS batched).
//!
//! The PTX is hand-written at ISA 7.0 for sm_70 (its CRC tables are filled
//! in from [`crate::integrity`] when it is loaded), so any driver vramblk
//! accepts (CUDA 11.3 or newer) JIT-compiles it for the GPU at hand; nvcc is
//! not needed to build vramblk. The unit tests assemble it with ptxas where
//! `VRAMBLK_PTXAS` names one.

use crate::driver::checked;
use crate::integrity;
use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;
use vramblk_store::StoreError;

/// Threads per block; each moves 16 bytes per step.
const THREADS: u32 = 256;

/// Bytes one descriptor covers at most: requests are cut into pieces of
/// this size so a large request spreads over several blocks (SMs).
pub(crate) const PIECE: u32 = 16 << 10;

/// What a descriptor asks of its block (`Desc::flags`).
pub(crate) mod flags {
    /// Move `len` bytes from `src` to `dst`.
    pub const COPY: u32 = 1;
    /// Store the checksum of each 4 KiB page read from `src` at `sums`
    /// (one u32 per page, in order).
    pub const STORE_SUM: u32 = 2;
    /// Compare each page's checksum with the one at `sums`; set
    /// [`MISMATCH`] on a difference.
    pub const VERIFY_SUM: u32 = 4;
    /// Set by the kernel: a page did not match its checksum.
    pub const MISMATCH: u32 = 1 << 31;
}

/// One piece for a block: `len` bytes at `src` (and `dst`), device
/// addresses (VRAM, or an io buffer's device-mapped alias), all multiples
/// of 16 (ublk requests are whole sectors in page-aligned buffers); with a
/// checksum flag, whole 4 KiB pages and `sums` the first page's checksum.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Desc {
    pub src: u64,
    pub dst: u64,
    pub sums: u64,
    pub len: u32,
    pub flags: u32,
}

/// `copy_list(descs, n)`: block b serves descriptor b; thread t moves the
/// 16-byte words t, t + 256, ... of it. With a checksum flag each step of
/// the block covers one 4 KiB page: every thread computes the CRC32C of its
/// 16 bytes (slicing-by-4 tables in shared memory), shifts it past the rest
/// of the page (a multiply modulo the polynomial by its lane's constant),
/// and the block XORs the 256 values (warp shuffles, then thread 0 over
/// the 8 warps), then stores or compares the page's checksum.
/// `crc_tables` (1024 slicing entries, 256 lane shifts) is filled in from
/// [`crate::integrity`] when the module is built.
const PTX_HEAD: &str = r#"
.version 7.0
.target sm_70
.address_size 64

.global .align 4 .u32 crc_tables[1280] = { @TABLES@ };

.visible .entry copy_list(
    .param .u64 descs,
    .param .u32 n
)
{
    .shared .align 4 .u32 tab[1280];
    .shared .align 4 .u32 red[8];
    .reg .pred  %p<12>;
    .reg .u32   %r<40>;
    .reg .u32   %w<4>;
    .reg .u64   %rd<24>;

    ld.param.u64    %rd1, [descs];
    ld.param.u32    %r1, [n];
    mov.u32         %r2, %ctaid.x;
    setp.ge.u32     %p1, %r2, %r1;
    @%p1 bra        DONE;
    mul.wide.u32    %rd2, %r2, 32;
    add.u64         %rd3, %rd1, %rd2;
    ld.global.u64   %rd4, [%rd3];
    ld.global.u64   %rd5, [%rd3+8];
    ld.global.u64   %rd11, [%rd3+16];
    ld.global.u32   %r5, [%rd3+24];
    ld.global.u32   %r6, [%rd3+28];
    cvt.u64.u32     %rd6, %r5;
    mov.u32         %r3, %tid.x;
    mul.wide.u32    %rd7, %r3, 16;
    mov.u32         %r4, %ntid.x;
    mul.wide.u32    %rd8, %r4, 16;
    and.b32         %r7, %r6, 1;
    setp.ne.u32     %p3, %r7, 0;
    and.b32         %r7, %r6, 6;
    setp.ne.u32     %p4, %r7, 0;
    and.b32         %r7, %r6, 2;
    setp.ne.u32     %p5, %r7, 0;
    and.b32         %r7, %r6, 4;
    setp.ne.u32     %p6, %r7, 0;
    mov.u32         %r30, tab;
    mov.u32         %r31, red;
    @!%p4 bra       STEP;
    // Tables into shared memory, then this lane's shift.
    mov.u64         %rd12, crc_tables;
    mov.u32         %r8, %r3;
LOADTAB:
    setp.ge.u32     %p7, %r8, 1280;
    @%p7 bra        LOADED;
    mul.wide.u32    %rd13, %r8, 4;
    add.u64         %rd14, %rd12, %rd13;
    ld.global.u32   %r9, [%rd14];
    shl.b32         %r10, %r8, 2;
    add.u32         %r10, %r10, %r30;
    st.shared.u32   [%r10], %r9;
    add.u32         %r8, %r8, %r4;
    bra.uni         LOADTAB;
LOADED:
    bar.sync        0;
    shl.b32         %r10, %r3, 2;
    add.u32         %r10, %r10, %r30;
    ld.shared.u32   %r32, [%r10+4096];
    mov.u64         %rd15, %rd11;
STEP:
    setp.ge.u64     %p2, %rd7, %rd6;
    @%p2 bra        DONE;
    add.u64         %rd9, %rd4, %rd7;
    ld.global.v4.u32 {%w0, %w1, %w2, %w3}, [%rd9];
    @!%p3 bra       SUM;
    add.u64         %rd10, %rd5, %rd7;
    st.global.v4.u32 [%rd10], {%w0, %w1, %w2, %w3};
SUM:
    @!%p4 bra       NEXT;
    mov.u32         %r11, 0;
    xor.b32         %r11, %r11, %w0;
    @SLICE@
    xor.b32         %r11, %r11, %w1;
    @SLICE@
    xor.b32         %r11, %r11, %w2;
    @SLICE@
    xor.b32         %r11, %r11, %w3;
    @SLICE@
    // %r11 times this lane's shift, modulo the polynomial.
    mov.u32         %r12, 0;
    mov.u32         %r13, %r32;
    mov.u32         %r14, -2147483648;
GF:
    and.b32         %r15, %r11, %r14;
    setp.ne.u32     %p8, %r15, 0;
    @%p8 xor.b32    %r12, %r12, %r13;
    and.b32         %r15, %r13, 1;
    neg.s32         %r15, %r15;
    and.b32         %r15, %r15, -2097792136;
    shr.u32         %r13, %r13, 1;
    xor.b32         %r13, %r13, %r15;
    shr.u32         %r14, %r14, 1;
    setp.ne.u32     %p8, %r14, 0;
    @%p8 bra        GF;
    // XOR over the warp, then over the block's warps.
    shfl.sync.bfly.b32 %r15, %r12, 16, 31, -1;
    xor.b32         %r12, %r12, %r15;
    shfl.sync.bfly.b32 %r15, %r12, 8, 31, -1;
    xor.b32         %r12, %r12, %r15;
    shfl.sync.bfly.b32 %r15, %r12, 4, 31, -1;
    xor.b32         %r12, %r12, %r15;
    shfl.sync.bfly.b32 %r15, %r12, 2, 31, -1;
    xor.b32         %r12, %r12, %r15;
    shfl.sync.bfly.b32 %r15, %r12, 1, 31, -1;
    xor.b32         %r12, %r12, %r15;
    and.b32         %r16, %r3, 31;
    setp.ne.u32     %p9, %r16, 0;
    shr.u32         %r17, %r3, 5;
    shl.b32         %r17, %r17, 2;
    add.u32         %r17, %r17, %r31;
    @!%p9 st.shared.u32 [%r17], %r12;
    bar.sync        0;
    setp.ne.u32     %p10, %r3, 0;
    @%p10 bra       SUMMED;
    ld.shared.u32   %r18, [%r31];
    ld.shared.u32   %r19, [%r31+4];
    xor.b32         %r18, %r18, %r19;
    ld.shared.u32   %r19, [%r31+8];
    xor.b32         %r18, %r18, %r19;
    ld.shared.u32   %r19, [%r31+12];
    xor.b32         %r18, %r18, %r19;
    ld.shared.u32   %r19, [%r31+16];
    xor.b32         %r18, %r18, %r19;
    ld.shared.u32   %r19, [%r31+20];
    xor.b32         %r18, %r18, %r19;
    ld.shared.u32   %r19, [%r31+24];
    xor.b32         %r18, %r18, %r19;
    ld.shared.u32   %r19, [%r31+28];
    xor.b32         %r18, %r18, %r19;
    @%p5 st.global.u32 [%rd15], %r18;
    @!%p6 bra       SUMMED;
    ld.global.u32   %r19, [%rd15];
    setp.eq.u32     %p11, %r19, %r18;
    @%p11 bra       SUMMED;
    or.b32          %r6, %r6, -2147483648;
    st.global.u32   [%rd3+28], %r6;
SUMMED:
    bar.sync        0;
    add.u64         %rd15, %rd15, 4;
NEXT:
    add.u64         %rd7, %rd7, %rd8;
    bra.uni         STEP;
DONE:
    ret;
}
"#;

/// One slicing-by-4 step on %r11: four lookups, XORed (table k at word
/// offset 256 k).
const PTX_SLICE: &str = "and.b32 %r20, %r11, 255;
    shl.b32 %r20, %r20, 2;
    add.u32 %r20, %r20, %r30;
    ld.shared.u32 %r21, [%r20+3072];
    shr.u32 %r20, %r11, 8;
    and.b32 %r20, %r20, 255;
    shl.b32 %r20, %r20, 2;
    add.u32 %r20, %r20, %r30;
    ld.shared.u32 %r22, [%r20+2048];
    xor.b32 %r21, %r21, %r22;
    shr.u32 %r20, %r11, 16;
    and.b32 %r20, %r20, 255;
    shl.b32 %r20, %r20, 2;
    add.u32 %r20, %r20, %r30;
    ld.shared.u32 %r22, [%r20+1024];
    xor.b32 %r21, %r21, %r22;
    shr.u32 %r20, %r11, 24;
    shl.b32 %r20, %r20, 2;
    add.u32 %r20, %r20, %r30;
    ld.shared.u32 %r22, [%r20];
    xor.b32 %r11, %r21, %r22;";

/// The kernel's PTX with the checksum tables filled in.
pub(crate) fn ptx() -> String {
    let mut tables: Vec<u32> = integrity::slicing_tables().to_vec();
    tables.extend(integrity::lane_shifts());
    let listed: Vec<String> = tables.iter().map(u32::to_string).collect();
    PTX_HEAD
        .replace("@TABLES@", &listed.join(", "))
        .replace("@SLICE@", PTX_SLICE)
}

/// The loaded module and its one function, for the store's context.
pub(crate) struct CopyKernel {
    module: sys::CUmodule,
    pub(crate) function: sys::CUfunction,
}

impl CopyKernel {
    /// JIT-compiles the PTX in the current context.
    pub(crate) fn load() -> Result<CopyKernel, StoreError> {
        let src = std::ffi::CString::new(ptx())
            .map_err(|_| StoreError::Invalid("the embedded PTX holds a NUL byte".into()))?;
        // SAFETY: a NUL-terminated PTX image, alive through the call.
        let module = checked(
            unsafe { result::module::load_data(src.as_ptr().cast()) },
            "loading the copy kernel (cuModuleLoadData)",
        )?;
        // SAFETY: the module just loaded; it is unloaded on the error path.
        let function = match checked(
            unsafe { result::module::get_function(module, c"copy_list".into()) },
            "finding the copy kernel",
        ) {
            Ok(f) => f,
            Err(e) => {
                // SAFETY: the module loaded above, used by nothing.
                let _ = unsafe { result::module::unload(module) };
                return Err(e);
            }
        };
        Ok(CopyKernel { module, function })
    }
}

impl Drop for CopyKernel {
    fn drop(&mut self) {
        // SAFETY: unloading the module this value loaded; its context is
        // still retained by the store that owns us.
        let _ = unsafe { result::module::unload(self.module) };
    }
}

/// Launches `copy_list(table, n)` on `stream`: one block of [`THREADS`]
/// threads per descriptor.
///
/// # Safety
/// `function` is the loaded copy kernel of the current context; `table` is
/// the device address of `n` descriptors, and they and every address in
/// them stay valid until the stream has passed the launch.
pub(crate) unsafe fn launch(
    function: sys::CUfunction,
    table: sys::CUdeviceptr,
    n: u32,
    stream: sys::CUstream,
) -> Result<(), DriverError> {
    let (mut table, mut n) = (table, n);
    let mut params = [
        (&mut table as *mut u64).cast::<std::ffi::c_void>(),
        (&mut n as *mut u32).cast::<std::ffi::c_void>(),
    ];
    // SAFETY: the parameters match copy_list(u64, u32) and live through
    // the call (the driver copies them); the rest is the caller's promise.
    unsafe { result::launch_kernel(function, (n, 1, 1), (THREADS, 1, 1), 0, stream, &mut params) }
}

/// Cuts `whole` (a request's part in one extent) into descriptors of at
/// most [`PIECE`] bytes, each with its own first checksum address.
pub(crate) fn pieces(whole: Desc) -> impl Iterator<Item = Desc> {
    let mut done = 0u32;
    std::iter::from_fn(move || {
        if done >= whole.len {
            return None;
        }
        let n = (whole.len - done).min(PIECE);
        let d = Desc {
            src: whole.src + u64::from(done),
            dst: whole.dst + u64::from(done),
            sums: whole.sums + u64::from(done) / integrity::PAGE * 4,
            len: n,
            flags: whole.flags,
        };
        done += n;
        Some(d)
    })
}

/// How many pieces [`pieces`] makes of `len` bytes.
pub(crate) fn piece_count(len: u32) -> usize {
    len.div_ceil(PIECE) as usize
}

/// Whether a request can go through the kernel: its addresses and length
/// must be whole 16-byte words (the kernel moves nothing smaller).
pub(crate) fn kernel_can_move(src: u64, dst: u64, len: u32) -> bool {
    (src | dst | len as u64).is_multiple_of(16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_request_exactly() {
        for len in [16u32, 4096, PIECE - 16, PIECE, PIECE + 4096, 512 << 10] {
            let whole = Desc {
                src: 1 << 20,
                dst: 1 << 40,
                sums: 1 << 30,
                len,
                flags: flags::COPY | flags::STORE_SUM,
            };
            let v: Vec<Desc> = pieces(whole).collect();
            assert_eq!(v.len(), piece_count(len), "len {len}");
            assert_eq!(
                v.iter().map(|d| u64::from(d.len)).sum::<u64>(),
                u64::from(len)
            );
            let mut at = 0u64;
            for d in &v {
                assert_eq!(d.src, (1 << 20) + at);
                assert_eq!(d.dst, (1 << 40) + at);
                assert_eq!(d.sums, (1 << 30) + at / 4096 * 4, "one u32 per page");
                assert_eq!(d.flags, whole.flags);
                assert!(d.len <= PIECE && d.len > 0);
                at += u64::from(d.len);
            }
        }
        assert_eq!(pieces(Desc::default()).count(), 0);
    }

    #[test]
    fn only_whole_words_go_to_the_kernel() {
        assert!(kernel_can_move(4096, 1 << 30, 512));
        assert!(!kernel_can_move(4097, 1 << 30, 512));
        assert!(!kernel_can_move(4096, 1 << 30, 500));
    }

    #[test]
    fn descriptor_layout_matches_the_ptx() {
        // The PTX reads src, dst, sums, len, flags at +0, +8, +16, +24, +28
        // of a 32-byte record, and writes flags back.
        assert_eq!(std::mem::size_of::<Desc>(), 32);
        assert_eq!(std::mem::offset_of!(Desc, dst), 8);
        assert_eq!(std::mem::offset_of!(Desc, sums), 16);
        assert_eq!(std::mem::offset_of!(Desc, len), 24);
        assert_eq!(std::mem::offset_of!(Desc, flags), 28);
        assert_eq!(flags::MISMATCH as i32, -2147483648);
    }

    #[test]
    fn ptx_names_the_entry_it_is_looked_up_by() {
        let ptx = ptx();
        assert!(ptx.contains(".visible .entry copy_list("));
        assert!(!ptx.contains('\0'));
        assert!(
            !ptx.contains("@TABLES@") && !ptx.contains("@SLICE@"),
            "every placeholder filled in"
        );
        // The polynomial in the multiply is integrity's.
        assert!(ptx.contains(&(0x82f6_3b78u32 as i32).to_string()));
    }

    /// Assembles the PTX with ptxas where one is at hand (`VRAMBLK_PTXAS`,
    /// e.g. from PyPI's nvidia-cuda-nvcc wheel): a syntax or register error
    /// shows here rather than as a JIT failure on a GPU. The GPU checks
    /// (engine-bench) run the kernel itself.
    #[test]
    fn the_ptx_assembles_where_ptxas_is_at_hand() {
        let Some(ptxas) = std::env::var_os("VRAMBLK_PTXAS") else {
            eprintln!("SKIPPED: VRAMBLK_PTXAS is not set; the PTX was not assembled here");
            return;
        };
        let dir = std::env::temp_dir().join(format!("vramblk-ptx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let src = dir.join("copy.ptx");
        std::fs::write(&src, ptx()).expect("writing the PTX");
        let out = std::process::Command::new(ptxas)
            .args(["-arch=sm_90", "-o"])
            .arg(dir.join("copy.cubin"))
            .arg(&src)
            .output()
            .expect("running ptxas");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "ptxas: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
