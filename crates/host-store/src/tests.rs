use crate::memfd::check_fits;
use crate::{HostStore, HostStoreOptions, MemInfo};
use vramblk_store::{BufferRegion, Completion, Op, QueueStore, Request, Store};

const MEMINFO: &str = "MemTotal:        2013464 kB\nMemAvailable:    1500000 kB\n\
HugePages_Total:     256\nHugePages_Free:      200\nHugepagesize:       2048 kB\n";

#[test]
fn parses_meminfo() {
    let m = MemInfo::parse(MEMINFO);
    assert_eq!(m.mem_available, 1_500_000 * 1024);
    assert_eq!(m.huge_pages_free, 200);
    assert_eq!(m.huge_page_size, 2 << 20);
}

#[test]
fn refuses_what_the_host_cannot_hold() {
    let m = MemInfo::parse(MEMINFO);
    let plain = |size| HostStoreOptions {
        size,
        hugetlb: false,
    };
    let huge = |size| HostStoreOptions {
        size,
        hugetlb: true,
    };
    assert!(check_fits(&plain(1 << 30), &m).is_ok());
    let e = check_fits(&plain(2 << 30), &m).unwrap_err().to_string();
    assert!(e.contains("only 1464 MiB of memory is available"), "{e}");
    assert!(check_fits(&huge(400 << 20), &m).is_ok());
    let e = check_fits(&huge(401 << 20), &m).unwrap_err().to_string();
    assert!(
        e.contains("needs 201 huge pages of 2 MiB, but only 200 are free"),
        "{e}"
    );
    assert!(check_fits(&plain(0), &m).is_err());
}

fn run(q: &mut impl QueueStore, reqs: Vec<Request>) -> Vec<Completion> {
    let mut batch = reqs;
    let mut done = Vec::new();
    q.submit(&mut batch, &mut done);
    q.poll(&mut done);
    assert!(batch.is_empty());
    done
}

#[test]
fn round_trips_bytes_and_zeroes() {
    let store = HostStore::create(&HostStoreOptions {
        size: 8 << 20,
        hugetlb: false,
    })
    .unwrap();
    assert_eq!(store.size(), 8 << 20);
    assert_eq!(store.backing_fds().len(), 1);
    let bufs = BufferRegion::new(2, 64 << 10).unwrap();
    let mut q = store.open_queue(0, &bufs).unwrap();
    let (wbuf, rbuf) = (bufs.slot(0).unwrap(), bufs.slot(1).unwrap());
    // SAFETY: test owns both slots exclusively.
    let w = unsafe { std::slice::from_raw_parts_mut(wbuf.as_ptr(), wbuf.len()) };
    let r = unsafe { std::slice::from_raw_parts_mut(rbuf.as_ptr(), rbuf.len()) };
    for (i, b) in w.iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    let req = |tag, op, offset, len, buf| Request {
        tag,
        op,
        offset,
        len,
        buf,
    };
    let done = run(&mut q, vec![req(0, Op::Write, 4096, 65536, wbuf)]);
    assert_eq!(
        done,
        vec![Completion {
            tag: 0,
            result: 65536
        }]
    );
    let done = run(
        &mut q,
        vec![
            req(1, Op::Read, 4096, 65536, rbuf),
            req(0, Op::Flush, 0, 0, wbuf),
        ],
    );
    assert_eq!(done.len(), 2);
    assert_eq!(&r[..], &w[..]);
    run(&mut q, vec![req(0, Op::WriteZeroes, 8192, 4096, wbuf)]);
    run(&mut q, vec![req(1, Op::Read, 4096, 65536, rbuf)]);
    assert!(r[4096..8192].iter().all(|&b| b == 0));
    assert_eq!(&r[..4096], &w[..4096]);
    assert_eq!(&r[8192..], &w[8192..]);
}

#[test]
fn out_of_range_requests_fail_with_einval() {
    let store = HostStore::create(&HostStoreOptions {
        size: 1 << 20,
        hugetlb: false,
    })
    .unwrap();
    let bufs = BufferRegion::new(1, 4096).unwrap();
    let mut q = store.open_queue(0, &bufs).unwrap();
    let buf = bufs.slot(0).unwrap();
    let done = run(
        &mut q,
        vec![
            Request {
                tag: 0,
                op: Op::Read,
                offset: (1 << 20) - 2048,
                len: 4096,
                buf,
            },
            Request {
                tag: 1,
                op: Op::Write,
                offset: 0,
                len: 8192,
                buf,
            },
            Request {
                tag: 2,
                op: Op::Read,
                offset: u64::MAX,
                len: 4096,
                buf,
            },
        ],
    );
    assert!(
        done.iter()
            .all(|c| c.result == -rustix::io::Errno::INVAL.raw_os_error()),
        "{done:?}"
    );
}

#[test]
fn an_adopted_memfd_has_the_bytes_its_creator_wrote() {
    let store = HostStore::create(&HostStoreOptions {
        size: 4 << 20,
        hugetlb: false,
    })
    .unwrap();
    let bufs = BufferRegion::new(1, 4096).unwrap();
    let slot = bufs.slot(0).unwrap();
    // SAFETY: the test owns the slot exclusively.
    let b = unsafe { std::slice::from_raw_parts_mut(slot.as_ptr(), slot.len()) };
    b.fill(0x5a);
    let write = Request {
        tag: 0,
        op: Op::Write,
        offset: 1 << 20,
        len: 4096,
        buf: slot,
    };
    run(&mut store.open_queue(0, &bufs).unwrap(), vec![write]);
    let held = store.backing_fds()[0].try_clone_to_owned().unwrap();
    drop(store);
    b.fill(0);
    let adopted = HostStore::adopt(held, 4 << 20).unwrap();
    assert_eq!(adopted.size(), 4 << 20);
    assert_eq!(adopted.describe(), "host memfd");
    let read = Request {
        op: Op::Read,
        ..write
    };
    run(&mut adopted.open_queue(0, &bufs).unwrap(), vec![read]);
    assert!(b.iter().all(|&x| x == 0x5a));
    let again = adopted.backing_fds()[0].try_clone_to_owned().unwrap();
    let e = HostStore::adopt(again, 8 << 20).err().unwrap().to_string();
    assert!(e.contains("fewer than the device's"), "{e}");
}

/// Bytes of memory the memfd holds now.
fn allocated(store: &HostStore) -> u64 {
    let st = rustix::fs::fstat(store.backing_fds()[0]).expect("fstat of the store's memfd");
    st.st_blocks as u64 * 512
}

/// A store with one queue and one io buffer, for the discard tests.
struct OneQueue {
    store: HostStore,
    bufs: BufferRegion,
    q: crate::memfd::HostQueue,
}

impl OneQueue {
    /// A store of `size` bytes filled in `step`-byte blocks, block i with
    /// the byte `first + i`.
    fn filled(size: u64, hugetlb: bool, step: u64, first: u8) -> OneQueue {
        let store = HostStore::create(&HostStoreOptions { size, hugetlb }).unwrap();
        let bufs = BufferRegion::new(1, step as usize).unwrap();
        let q = store.open_queue(0, &bufs).unwrap();
        let mut t = OneQueue { store, bufs, q };
        for i in 0..size / step {
            t.buf().fill(first + i as u8);
            t.run(Op::Write, i * step, step as u32);
        }
        t
    }

    fn buf(&mut self) -> &mut [u8] {
        let slot = self.bufs.slot(0).unwrap();
        // SAFETY: the test owns the slot exclusively.
        unsafe { std::slice::from_raw_parts_mut(slot.as_ptr(), slot.len()) }
    }

    fn run(&mut self, op: Op, offset: u64, len: u32) -> i32 {
        let buf = self.bufs.slot(0).unwrap();
        let done = run(
            &mut self.q,
            vec![Request {
                tag: 0,
                op,
                offset,
                len,
                buf,
            }],
        );
        done[0].result
    }
}

#[test]
fn a_discard_frees_its_whole_pages_and_reads_back_as_zeros() {
    let mut t = OneQueue::filled(4 << 20, false, 1 << 20, 0xa0);
    let before = allocated(&t.store);
    assert_eq!(before, 4 << 20, "populated at creation");
    // 1 MiB + 512 bytes .. 3 MiB - 512 bytes: whole pages freed, the
    // partial pages at both ends zeroed in place.
    let (start, end) = ((1 << 20) + 512, (3 << 20) - 512);
    assert_eq!(
        t.run(Op::Discard, start, (end - start) as u32),
        (end - start) as i32
    );
    let freed = before - allocated(&t.store);
    assert_eq!(
        freed,
        (2 << 20) - 8192,
        "every whole page of the range freed"
    );
    for mib in 0..4u64 {
        t.run(Op::Read, mib << 20, 1 << 20);
        for (i, &x) in t.buf().iter().enumerate() {
            let at = (mib << 20) + i as u64;
            let want = if (start..end).contains(&at) {
                0
            } else {
                0xa0 + mib as u8
            };
            assert_eq!(x, want, "byte {at}");
        }
    }
    // A write into the hole lands (on a fresh page) and reads back.
    t.buf().fill(0x77);
    t.run(Op::Write, 2 << 20, 4096);
    t.run(Op::Read, 2 << 20, 4096);
    assert!(t.buf()[..4096].iter().all(|&x| x == 0x77));
}

#[test]
fn a_hugetlb_discard_gives_huge_pages_back_and_the_hole_takes_writes() {
    let free = || MemInfo::read().unwrap().huge_pages_free;
    if free() < 4 {
        eprintln!(
            "SKIPPED: fewer than 4 free 2 MiB huge pages (echo 4 > /proc/sys/vm/nr_hugepages)"
        );
        return;
    }
    let mut t = OneQueue::filled(8 << 20, true, 2 << 20, 0x10);
    let before = free();
    t.run(Op::Discard, 2 << 20, 4 << 20);
    assert_eq!(free(), before + 2, "two huge pages back in the pool");
    t.run(Op::Read, 2 << 20, 2 << 20);
    assert!(t.buf().iter().all(|&x| x == 0), "the hole reads as zeros");
    t.buf().fill(0x99);
    assert_eq!(t.run(Op::Write, 2 << 20, 4096), 4096);
    t.buf().fill(0);
    t.run(Op::Read, 2 << 20, 8192);
    assert!(
        t.buf()[..4096].iter().all(|&x| x == 0x99),
        "the write into the hole landed"
    );
    assert!(t.buf()[4096..8192].iter().all(|&x| x == 0));
    t.run(Op::Read, 6 << 20, 2 << 20);
    assert!(t.buf().iter().all(|&x| x == 0x13), "past the hole: intact");
}
