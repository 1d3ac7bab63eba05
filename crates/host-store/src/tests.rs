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
    assert!(done.iter().all(|c| c.result == -libc::EINVAL), "{done:?}");
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
