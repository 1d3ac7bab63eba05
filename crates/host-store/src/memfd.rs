use crate::MemInfo;
use rustix::fs::{FallocateFlags, MemfdFlags};
use rustix::mm::{MapFlags, ProtFlags};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use vramblk_store::{BufferRegion, Completion, Op, QueueStore, Request, Store, StoreError};

const HUGE_PAGE: u64 = 2 << 20;

/// How to build a [`HostStore`].
#[derive(Clone, Debug, Default)]
pub struct HostStoreOptions {
    pub size: u64,
    /// Back the memfd by 2 MiB hugetlb pages reserved at boot.
    pub hugetlb: bool,
}

/// A store in host RAM, shared by every queue of a device.
pub struct HostStore {
    mapping: Arc<Mapping>,
    hugetlb: bool,
}

/// The memfd's page size: what a punched hole frees in whole units.
fn page_size(hugetlb: bool) -> u64 {
    if hugetlb {
        HUGE_PAGE
    } else {
        4096
    }
}

impl HostStore {
    /// Creates the memfd, sizes it and maps it populated, so no request
    /// ever waits on a page fault. Fails with a sentence when the host
    /// cannot hold `size`.
    pub fn create(opts: &HostStoreOptions) -> Result<HostStore, StoreError> {
        Self::preflight(opts)?;
        let fd = create_memfd(opts.hugetlb)?;
        let len = mapped_len(opts);
        rustix::fs::ftruncate(&fd, len)
            .map_err(|e| StoreError::os(format!("sizing the memfd to {len} bytes"), e))?;
        let mapping = Mapping::new(fd, len as usize, opts.size, opts.hugetlb)?;
        log::info!(
            "host store: {} MiB in a {} memfd",
            opts.size >> 20,
            if opts.hugetlb { "hugetlb" } else { "plain" }
        );
        Ok(HostStore {
            mapping: Arc::new(mapping),
            hugetlb: opts.hugetlb,
        })
    }
}

impl HostStore {
    /// Maps a memfd that a store created earlier, in a process that has
    /// since died (the fd outlived it in a holder: a supervisor, systemd's
    /// fd store). `size` is the device size; the memfd's own length and
    /// whether it lives on hugetlb pages are read from the fd.
    pub fn adopt(fd: OwnedFd, size: u64) -> Result<HostStore, StoreError> {
        let look = |e| StoreError::os("looking at the held memfd", e);
        let st = rustix::fs::fstat(&fd).map_err(look)?;
        let sfs = rustix::fs::fstatfs(&fd).map_err(look)?;
        let mapped = st.st_size as u64;
        if size == 0 || mapped < size {
            return Err(StoreError::Invalid(format!(
                "the held memfd has {mapped} bytes, fewer than the device's {size}"
            )));
        }
        // f_type's integer type differs between architectures.
        #[allow(clippy::unnecessary_cast)]
        let hugetlb = sfs.f_type as i64 == HUGETLBFS_MAGIC;
        let mapping = Mapping::new(fd, mapped as usize, size, hugetlb)?;
        log::info!(
            "host store: {} MiB adopted from a held {} memfd",
            size >> 20,
            if hugetlb { "hugetlb" } else { "plain" }
        );
        Ok(HostStore {
            mapping: Arc::new(mapping),
            hugetlb,
        })
    }
}

/// statfs(2)'s f_type of hugetlbfs, where MFD_HUGETLB memfds live.
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

impl HostStore {
    /// Checks that this host can back `opts` now, without allocating.
    pub fn preflight(opts: &HostStoreOptions) -> Result<(), StoreError> {
        let meminfo = MemInfo::read().map_err(|e| StoreError::Os {
            what: "reading /proc/meminfo".into(),
            source: e,
        })?;
        check_fits(opts, &meminfo)
    }

    /// The memfd that keeps the data alive.
    pub fn backing_fds(&self) -> Vec<BorrowedFd<'_>> {
        vec![self.mapping.fd.as_fd()]
    }
}

/// hugetlb memfds must be sized in whole huge pages.
fn mapped_len(opts: &HostStoreOptions) -> u64 {
    if opts.hugetlb {
        opts.size.div_ceil(HUGE_PAGE) * HUGE_PAGE
    } else {
        opts.size
    }
}

/// Refuses sizes the host cannot back, before anything is allocated.
pub(crate) fn check_fits(opts: &HostStoreOptions, m: &MemInfo) -> Result<(), StoreError> {
    if opts.size == 0 {
        return Err(StoreError::Invalid("size must be larger than 0".into()));
    }
    if opts.hugetlb {
        let need = mapped_len(opts);
        if m.huge_page_size != HUGE_PAGE {
            return Err(StoreError::Unavailable(format!(
                "--hugepages needs 2 MiB huge pages; this kernel's default huge page size is {} KiB",
                m.huge_page_size >> 10
            )));
        }
        if need > m.huge_bytes_free() {
            return Err(StoreError::TooLarge(format!(
                "host backend with --hugepages: {} MiB needs {} huge pages of 2 MiB, but only {} are free \
                 (reserve more with hugepages=N on the kernel command line or in /proc/sys/vm/nr_hugepages)",
                opts.size >> 20,
                need / HUGE_PAGE,
                m.huge_pages_free
            )));
        }
    } else if opts.size > m.mem_available {
        return Err(StoreError::TooLarge(format!(
            "host backend: {} MiB requested but only {} MiB of memory is available",
            opts.size >> 20,
            m.mem_available >> 20
        )));
    }
    Ok(())
}

fn create_memfd(hugetlb: bool) -> Result<OwnedFd, StoreError> {
    let mut flags = MemfdFlags::CLOEXEC;
    if hugetlb {
        flags |= MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB;
    }
    rustix::fs::memfd_create("vramblk", flags).map_err(|e| StoreError::os("creating the memfd", e))
}

/// The shared mapping of the memfd, and the memfd itself (a discard
/// punches holes in it).
struct Mapping {
    base: *mut u8,
    mapped: usize,
    size: u64,
    fd: OwnedFd,
    page: u64,
}

// SAFETY: the mapping is plain shared memory; the block layer never has two
// requests in flight that a store must order (a FLUSH waits for writes the
// kernel already saw complete), and concurrent overlapping requests have
// unspecified results on any block device.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(fd: OwnedFd, mapped: usize, size: u64, hugetlb: bool) -> Result<Mapping, StoreError> {
        // SAFETY: mapping `mapped` bytes of a memfd we sized to at least
        // that; the mapping is owned by the Mapping from here on.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                mapped,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::POPULATE,
                &fd,
                0,
            )
        }
        .map_err(|e| StoreError::os(format!("mapping {} MiB of host memory", mapped >> 20), e))?;
        Ok(Mapping {
            base: ptr.cast(),
            mapped,
            size,
            fd,
            page: page_size(hugetlb),
        })
    }

    /// Frees the memory behind `len` bytes at `offset` (inside the device),
    /// which then read as zeros: the whole pages of the range go back to
    /// the kernel (a hole punched in the memfd: to the huge page pool for
    /// hugetlb), the partial pages at its ends are zeroed in place.
    fn discard(&self, offset: u64, len: u64) -> Result<(), std::io::Error> {
        let end = offset + len;
        let first = offset.div_ceil(self.page) * self.page;
        let last = end / self.page * self.page;
        let (zero_head, zero_tail) = if first < last {
            rustix::fs::fallocate(
                &self.fd,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                first,
                last - first,
            )?;
            (offset..first, last..end)
        } else {
            (offset..end, end..end)
        };
        for r in [zero_head, zero_tail] {
            if !r.is_empty() {
                // SAFETY: the range is inside the mapping (the caller checked
                // offset + len against the device size).
                unsafe {
                    std::ptr::write_bytes(
                        self.base.add(r.start as usize),
                        0,
                        (r.end - r.start) as usize,
                    )
                };
            }
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; every queue handle holds an Arc,
        // so none is left.
        let _ = unsafe { rustix::mm::munmap(self.base.cast(), self.mapped) };
    }
}

impl Store for HostStore {
    type Queue = HostQueue;

    fn size(&self) -> u64 {
        self.mapping.size
    }

    fn describe(&self) -> String {
        if self.hugetlb {
            "host memfd (hugetlb)".into()
        } else {
            "host memfd".into()
        }
    }

    fn open_queue(&self, _qid: u16, _buffers: &BufferRegion) -> Result<HostQueue, StoreError> {
        Ok(HostQueue {
            mapping: self.mapping.clone(),
        })
    }
}

/// A queue's handle: copies synchronously, so everything completes in
/// `submit` and `poll` has nothing to do.
pub struct HostQueue {
    mapping: Arc<Mapping>,
}

impl HostQueue {
    fn execute(&self, r: &Request) -> i32 {
        let end = r.offset.checked_add(r.len as u64);
        if end.is_none_or(|e| e > self.mapping.size)
            || (r.op.uses_buffer() && r.len as usize > r.buf.len())
        {
            return -rustix::io::Errno::INVAL.raw_os_error();
        }
        // SAFETY: offset+len is inside the mapping (checked above).
        let at = unsafe { self.mapping.base.add(r.offset as usize) };
        let len = r.len as usize;
        match r.op {
            // SAFETY: both ranges are valid for len bytes (checked above) and
            // cannot overlap: one is the io buffer, the other the memfd.
            Op::Read => unsafe { std::ptr::copy_nonoverlapping(at, r.buf.as_ptr(), len) },
            // SAFETY: as for Read.
            Op::Write => unsafe { std::ptr::copy_nonoverlapping(r.buf.as_ptr(), at, len) },
            // SAFETY: the range is inside the mapping (checked above).
            Op::WriteZeroes => unsafe { std::ptr::write_bytes(at, 0, len) },
            // Writes land synchronously, so there is nothing to wait for.
            Op::Flush => {}
            // Freed swap slots and trimmed blocks give their memory back;
            // the next write there takes a fresh page.
            Op::Discard => {
                if let Err(e) = self.mapping.discard(r.offset, r.len as u64) {
                    log::warn!(
                        "host store: discarding {} bytes at {}: {e}",
                        r.len,
                        r.offset
                    );
                    return -e
                        .raw_os_error()
                        .unwrap_or(rustix::io::Errno::IO.raw_os_error());
                }
            }
        }
        r.len as i32
    }
}

impl QueueStore for HostQueue {
    fn submit(&mut self, batch: &mut Vec<Request>, done: &mut Vec<Completion>) {
        for r in batch.drain(..) {
            done.push(Completion {
                tag: r.tag,
                result: self.execute(&r),
            });
        }
    }

    fn poll(&mut self, _done: &mut Vec<Completion>) {}

    fn in_flight(&self) -> usize {
        0
    }
}
