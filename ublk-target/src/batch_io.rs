//! The kernel's batch commands for one queue (`UBLK_F_BATCH_IO`, Linux
//! 7.0+): one PREP hands the kernel every tag's io buffer, one multishot
//! FETCH delivers the tags of new requests a group at a time into buffers
//! the queue provides, and one COMMIT returns a whole round's results.
//! Per-tag commands (queue.rs) cost one io_uring command per request each
//! way; these cost one per round.
//!
//! The commands run on the queue thread's own ring (libublk's, with the
//! device's char device as fixed file 0), which the batch loop
//! (batch_loop.rs) owns alone: every completion on it is one of these.
//! The io buffers stay vramblk's one locked region (queue.rs says why);
//! libublk's batch queue takes only buffers it allocates itself.

use io_uring::{cqueue, opcode, squeue, types};
use libublk::io::{with_task_io_ring_mut, UblkQueue};
use libublk::sys;
use std::mem::size_of;
use thiserror::Error;

/// The provided-buffer group the FETCH fills; one per ring, and the ring
/// is this queue's alone.
const FETCH_GROUP: u16 = 0x7662;
/// How many tag buffers the kernel may fill before the queue hands them
/// back: each holds every tag of the queue, so two let the kernel deliver
/// the next group while the queue reads the last.
const FETCH_BUFFERS: u16 = 4;
/// `IORING_URING_CMD_MULTISHOT` (include/uapi/linux/io_uring.h): the FETCH
/// stays armed and completes once per delivered group.
const URING_CMD_MULTISHOT: u32 = 1 << 1;

/// Marks this module's completions in their user_data (bits 32..48); the
/// kind goes in bits 16..24 and a command's id in bits 0..16.
const USER_DATA_MARK: u64 = 0x6261 << 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Prep = 1,
    Fetch = 2,
    Commit = 3,
    Provide = 4,
    Remove = 5,
}

impl Kind {
    fn user_data(self, id: u16) -> u64 {
        USER_DATA_MARK | (self as u64) << 16 | id as u64
    }

    fn of(user_data: u64) -> Option<(Kind, u16)> {
        if user_data >> 32 != USER_DATA_MARK >> 32 {
            return None;
        }
        let id = (user_data & 0xffff) as u16;
        let kind = match (user_data >> 16) & 0xff {
            1 => Kind::Prep,
            2 => Kind::Fetch,
            3 => Kind::Commit,
            4 => Kind::Provide,
            5 => Kind::Remove,
            _ => return None,
        };
        Some((kind, id))
    }
}

/// One element of a PREP or COMMIT (`struct ublk_elem_header` followed by
/// the buffer address, as `UBLK_BATCH_F_HAS_BUF_ADDR` lays them out).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Element {
    tag: u16,
    buf_index: u16,
    result: i32,
    buf_addr: u64,
}

const ELEMENT_BYTES: usize = size_of::<Element>();

/// Why the batch commands failed.
#[derive(Debug, Error)]
pub(crate) enum BatchError {
    #[error("the kernel refused to take the queue's io buffers (PREP_IO_CMDS: {0})")]
    Prep(std::io::Error),
    #[error("the kernel refused a buffer for the tags it delivers (PROVIDE_BUFFERS: {0})")]
    Provide(std::io::Error),
    #[error("the ring: {0}")]
    Ring(std::io::Error),
    #[error("the kernel delivered tag {0}, which this queue does not have")]
    UnknownTag(u16),
    #[error("the kernel filled tag buffer {0}, which this queue did not provide")]
    UnknownBuffer(u16),
}

/// A COMMIT in flight: its elements stay here until the kernel has taken
/// them all (it may take a part and leave the rest for another COMMIT).
struct Commit {
    elements: Vec<Element>,
    taken: usize,
}

/// What a COMMIT's completion did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Taken {
    /// Every element taken; its id is free again.
    All,
    /// A part taken; the rest must be sent again under the same id.
    Part,
    /// None taken (an error, or a byte count that is no whole number of
    /// elements): these many requests got no result; its id is free again.
    Refused(usize),
    /// No COMMIT in flight has this id.
    Unknown,
}

/// The COMMITs in flight, by id (a finished one's id is reused).
#[derive(Default)]
struct Commits {
    slots: Vec<Option<Commit>>,
}

impl Commits {
    /// Keeps `elements` until the kernel has taken them; their id.
    fn add(&mut self, elements: Vec<Element>) -> u16 {
        let commit = Some(Commit { elements, taken: 0 });
        match self.slots.iter().position(Option::is_none) {
            Some(free) => {
                self.slots[free] = commit;
                free as u16
            }
            None => {
                self.slots.push(commit);
                (self.slots.len() - 1) as u16
            }
        }
    }

    /// The elements of COMMIT `id` the kernel has not taken yet.
    fn rest(&self, id: u16) -> Option<&[Element]> {
        let commit = self.slots.get(id as usize)?.as_ref()?;
        Some(&commit.elements[commit.taken..])
    }

    /// Records COMMIT `id`'s completion with result `res` (bytes taken, or
    /// -errno).
    fn completed(&mut self, id: u16, res: i32) -> Taken {
        let Some(slot) = self.slots.get_mut(id as usize) else {
            return Taken::Unknown;
        };
        let Some(commit) = slot.as_mut() else {
            return Taken::Unknown;
        };
        if res <= 0 || !(res as usize).is_multiple_of(ELEMENT_BYTES) {
            let left = commit.elements.len() - commit.taken;
            *slot = None;
            return Taken::Refused(left);
        }
        commit.taken += res as usize / ELEMENT_BYTES;
        if commit.taken >= commit.elements.len() {
            *slot = None;
            Taken::All
        } else {
            Taken::Part
        }
    }

    fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }
}

/// One queue's batch commands and the buffers the kernel writes tags into.
pub(crate) struct BatchQueue {
    qid: u16,
    /// Each tag's io buffer, as the kernel is told it.
    buffer_addrs: Vec<u64>,
    tag_buffers: Vec<Box<[u16]>>,
    /// Tag buffers handed back to the kernel and not yet confirmed.
    provides_in_flight: usize,
    commits: Commits,
    /// The kernel ended the FETCH for good: the device stops, is deleted
    /// or quiesced, and this queue serves no more requests.
    fetch_aborted: bool,
}

impl BatchQueue {
    /// The commands for queue `qid`, whose tag `t` uses the io buffer at
    /// `buffer_addrs[t]`. Nothing reaches the kernel yet.
    pub(crate) fn new(qid: u16, buffer_addrs: Vec<u64>) -> Self {
        let depth = buffer_addrs.len();
        BatchQueue {
            qid,
            tag_buffers: (0..FETCH_BUFFERS)
                .map(|_| vec![0u16; depth].into_boxed_slice())
                .collect(),
            buffer_addrs,
            provides_in_flight: 0,
            commits: Commits::default(),
            fetch_aborted: false,
        }
    }

    /// Provides the tag buffers, hands the kernel every tag's io buffer
    /// (which readies the queue, as per-tag FETCHes do) and arms the FETCH.
    /// Waits for the first two: nothing else is on the ring yet.
    pub(crate) fn start(&mut self, q: &UblkQueue<'_>) -> Result<(), BatchError> {
        for id in 0..FETCH_BUFFERS {
            let entry = self.provide_entry(id);
            push(q, entry)?;
        }
        let prep: Vec<Element> = self
            .buffer_addrs
            .iter()
            .enumerate()
            .map(|(tag, &buf_addr)| Element {
                tag: tag as u16,
                buf_addr,
                ..Default::default()
            })
            .collect();
        push(
            q,
            self.command(
                sys::UBLK_U_IO_PREP_IO_CMDS,
                prep.len(),
                prep.as_ptr() as u64,
                Kind::Prep.user_data(0),
            ),
        )?;
        let expected = FETCH_BUFFERS as usize + 1;
        let mut seen = 0;
        while seen < expected {
            let cqes = with_task_io_ring_mut(|r| {
                r.submit_and_wait(1)?;
                Ok::<_, std::io::Error>(r.completion().collect::<Vec<_>>())
            })
            .map_err(BatchError::Ring)?;
            for cqe in cqes {
                seen += 1;
                match Kind::of(cqe.user_data()) {
                    Some((Kind::Provide, _)) => self.provided(cqe.result())?,
                    Some((Kind::Prep, _)) if cqe.result() < 0 => {
                        return Err(BatchError::Prep(errno(cqe.result())))
                    }
                    _ => {}
                }
            }
        }
        // The PREP's elements were read by the kernel before it completed.
        drop(prep);
        self.arm_fetch(q)
    }

    /// Whether the kernel ended the FETCH and nothing this queue sent is
    /// still in flight: the queue is done once it also holds no request.
    pub(crate) fn finished(&self) -> bool {
        self.fetch_aborted && self.provides_in_flight == 0 && self.commits.is_empty()
    }

    /// Sends one COMMIT for `results` (tag, bytes done or -errno).
    pub(crate) fn commit(
        &mut self,
        q: &UblkQueue<'_>,
        results: &[(u16, i32)],
    ) -> Result<(), BatchError> {
        if results.is_empty() {
            return Ok(());
        }
        let mut elements = Vec::with_capacity(results.len());
        for &(tag, result) in results {
            let buf_addr = *self
                .buffer_addrs
                .get(tag as usize)
                .ok_or(BatchError::UnknownTag(tag))?;
            elements.push(Element {
                tag,
                buf_index: 0,
                result,
                buf_addr,
            });
        }
        let id = self.commits.add(elements);
        self.send_commit(q, id)
    }

    /// Takes one completion from the ring; `on_request` gets each tag the
    /// kernel delivered. Completions that are not this module's are
    /// ignored (there should be none: the ring is this queue's).
    pub(crate) fn handle(
        &mut self,
        q: &UblkQueue<'_>,
        cqe: &cqueue::Entry,
        mut on_request: impl FnMut(u16),
    ) -> Result<(), BatchError> {
        let Some((kind, id)) = Kind::of(cqe.user_data()) else {
            log::debug!(
                "queue {}: a completion that is not a batch command's ({:#x})",
                self.qid,
                cqe.user_data()
            );
            return Ok(());
        };
        let res = cqe.result();
        match kind {
            Kind::Fetch => {
                if res == sys::UBLK_IO_RES_ABORT {
                    self.fetch_aborted = true;
                    return Ok(());
                }
                if res < 0 {
                    // Out of tag buffers (ENOBUFS) or another refusal that
                    // leaves the device up: fetch again.
                    log::debug!("queue {}: FETCH ended with {}", self.qid, errno(res));
                } else {
                    let buffer = cqueue::buffer_select(cqe.flags())
                        .ok_or(BatchError::UnknownBuffer(u16::MAX))?;
                    let tags = self
                        .tag_buffers
                        .get(buffer as usize)
                        .ok_or(BatchError::UnknownBuffer(buffer))?;
                    let count = (res as usize / size_of::<u16>()).min(tags.len());
                    for &tag in &tags[..count] {
                        if tag as usize >= self.buffer_addrs.len() {
                            return Err(BatchError::UnknownTag(tag));
                        }
                        on_request(tag);
                    }
                    let entry = self.provide_entry(buffer);
                    push(q, entry)?;
                }
                // The one FETCH stays armed while its completions say MORE.
                if !cqueue::more(cqe.flags()) {
                    self.arm_fetch(q)?;
                }
            }
            Kind::Commit => self.commit_done(q, id, res)?,
            Kind::Provide => self.provided(res)?,
            Kind::Prep | Kind::Remove => {}
        }
        Ok(())
    }

    /// Takes the tag buffers back from the ring (the thread's ring
    /// outlives this queue's buffers). Best effort: the queue is ending.
    pub(crate) fn release(&mut self, q: &UblkQueue<'_>) {
        let entry = opcode::RemoveBuffers::new(FETCH_BUFFERS, FETCH_GROUP)
            .build()
            .user_data(Kind::Remove.user_data(0));
        if push(q, entry).is_ok() {
            let _ = with_task_io_ring_mut(|r| {
                let done = r.submit_and_wait(1);
                r.completion().for_each(drop);
                done
            });
        }
    }

    /// A PROVIDE of a tag buffer completed with `res`.
    fn provided(&mut self, res: i32) -> Result<(), BatchError> {
        self.provides_in_flight = self.provides_in_flight.saturating_sub(1);
        if res < 0 {
            return Err(BatchError::Provide(errno(res)));
        }
        Ok(())
    }

    fn commit_done(&mut self, q: &UblkQueue<'_>, id: u16, res: i32) -> Result<(), BatchError> {
        match self.commits.completed(id, res) {
            Taken::All | Taken::Unknown => Ok(()),
            Taken::Part => self.send_commit(q, id),
            Taken::Refused(left) => {
                // A device that stops refuses results (its requests end
                // without them); else those requests would hang, so say so.
                if !self.fetch_aborted {
                    log::error!(
                        "queue {}: the kernel refused the results of {left} requests ({})",
                        self.qid,
                        if res < 0 {
                            errno(res).to_string()
                        } else {
                            format!("{res} bytes taken")
                        }
                    );
                }
                Ok(())
            }
        }
    }

    fn send_commit(&mut self, q: &UblkQueue<'_>, id: u16) -> Result<(), BatchError> {
        let Some(rest) = self.commits.rest(id) else {
            return Ok(());
        };
        let entry = self.command(
            sys::UBLK_U_IO_COMMIT_IO_CMDS,
            rest.len(),
            rest.as_ptr() as u64,
            Kind::Commit.user_data(id),
        );
        push(q, entry)
    }

    fn arm_fetch(&self, q: &UblkQueue<'_>) -> Result<(), BatchError> {
        push(q, multishot_from_group(fetch_entry(self.qid), FETCH_GROUP))
    }

    fn provide_entry(&mut self, id: u16) -> squeue::Entry {
        self.provides_in_flight += 1;
        let buffer = &mut self.tag_buffers[id as usize];
        opcode::ProvideBuffers::new(
            buffer.as_mut_ptr().cast::<u8>(),
            (buffer.len() * size_of::<u16>()) as i32,
            1,
            FETCH_GROUP,
            id,
        )
        .build()
        .user_data(Kind::Provide.user_data(id))
    }

    /// A PREP or COMMIT of `count` elements at `addr`.
    fn command(&self, op: u32, count: usize, addr: u64, user_data: u64) -> squeue::Entry {
        let flags = sys::UBLK_BATCH_F_HAS_BUF_ADDR as u16;
        opcode::UringCmd16::new(types::Fixed(0), op)
            .cmd(header(self.qid, flags, count as u16, ELEMENT_BYTES as u8))
            .addr(Some(addr))
            .build()
            .user_data(user_data)
    }
}

/// A FETCH for queue `qid`'s tags (u16 each), before it is made
/// multishot.
fn fetch_entry(qid: u16) -> squeue::Entry {
    opcode::UringCmd16::new(types::Fixed(0), sys::UBLK_U_IO_FETCH_IO_CMDS)
        .cmd(header(qid, 0, 0, size_of::<u16>() as u8))
        .build()
        .flags(squeue::Flags::BUFFER_SELECT)
        .user_data(Kind::Fetch.user_data(0))
}

/// Queues `entry` on the thread's ring (libublk flushes the ring when it
/// is full).
fn push(q: &UblkQueue<'_>, entry: squeue::Entry) -> Result<(), BatchError> {
    q.ublk_submit_sqe_sync(entry)
        .map_err(|e| BatchError::Ring(std::io::Error::other(e.to_string())))
}

fn errno(res: i32) -> std::io::Error {
    std::io::Error::from_raw_os_error(-res)
}

/// A batch command's header (`struct ublk_batch_io`) as the SQE's 16
/// command bytes.
fn header(q_id: u16, flags: u16, nr_elem: u16, elem_bytes: u8) -> [u8; 16] {
    const _: () = assert!(size_of::<sys::ublk_batch_io>() == 16);
    let header = sys::ublk_batch_io {
        q_id,
        flags,
        nr_elem,
        elem_bytes,
        reserved: 0,
        reserved2: 0,
    };
    // SAFETY: ublk_batch_io is a 16-byte repr(C) struct of integers with no
    // padding (u16, u16, u16, u8, u8, u64), so every byte is initialised.
    unsafe { std::mem::transmute::<sys::ublk_batch_io, [u8; 16]>(header) }
}

/// Byte offsets in `struct io_uring_sqe` (include/uapi/linux/io_uring.h)
/// of the two fields io-uring's UringCmd16 cannot set without also
/// asking for a fixed buffer: `uring_cmd_flags` and `buf_group`.
const SQE_URING_CMD_FLAGS: usize = 28;
const SQE_BUF_GROUP: usize = 40;

/// `entry` made multishot, filling buffers of provided-buffer `group`.
fn multishot_from_group(entry: squeue::Entry, group: u16) -> squeue::Entry {
    const _: () = assert!(size_of::<squeue::Entry>() == 64);
    // SAFETY: squeue::Entry is a repr(C) wrapper of the kernel's 64-byte
    // io_uring_sqe, made only of integers and unions of integers, so it
    // and [u8; 64] have the same size and every bit pattern is valid for
    // both.
    let mut raw = unsafe { std::mem::transmute::<squeue::Entry, [u8; 64]>(entry) };
    let flags_at = SQE_URING_CMD_FLAGS..SQE_URING_CMD_FLAGS + 4;
    let mut flags = u32::from_ne_bytes(raw[flags_at.clone()].try_into().unwrap_or_default());
    flags |= URING_CMD_MULTISHOT;
    raw[flags_at].copy_from_slice(&flags.to_ne_bytes());
    raw[SQE_BUF_GROUP..SQE_BUF_GROUP + 2].copy_from_slice(&group.to_ne_bytes());
    // SAFETY: as above, the other way.
    unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(raw) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_have_the_kernels_layout() {
        assert_eq!(ELEMENT_BYTES, 16);
        assert_eq!(std::mem::offset_of!(Element, buf_index), 2);
        assert_eq!(std::mem::offset_of!(Element, result), 4);
        assert_eq!(std::mem::offset_of!(Element, buf_addr), 8);
    }

    fn elements(tags: std::ops::Range<u16>) -> Vec<Element> {
        tags.map(|tag| Element {
            tag,
            result: 4096,
            ..Default::default()
        })
        .collect()
    }

    fn bytes(n: usize) -> i32 {
        (n * ELEMENT_BYTES) as i32
    }

    #[test]
    fn a_commit_the_kernel_takes_in_parts_is_sent_again_for_the_rest() {
        let mut c = Commits::default();
        let id = c.add(elements(0..5));
        assert_eq!(c.completed(id, bytes(2)), Taken::Part);
        let rest: Vec<u16> = c.rest(id).unwrap().iter().map(|e| e.tag).collect();
        assert_eq!(rest, [2, 3, 4]);
        assert_eq!(c.completed(id, bytes(3)), Taken::All);
        assert!(c.is_empty());
        assert_eq!(c.rest(id), None);
    }

    #[test]
    fn commits_in_flight_keep_their_own_ids_and_a_finished_id_is_reused() {
        let mut c = Commits::default();
        let (a, b) = (c.add(elements(0..2)), c.add(elements(2..4)));
        assert_ne!(a, b);
        assert_eq!(c.completed(a, bytes(2)), Taken::All);
        assert!(!c.is_empty(), "b is still in flight");
        assert_eq!(c.add(elements(4..6)), a);
        assert_eq!(c.rest(b).unwrap()[0].tag, 2);
    }

    #[test]
    fn a_refused_commit_says_how_many_results_were_lost_and_frees_its_id() {
        let mut c = Commits::default();
        let id = c.add(elements(0..4));
        assert_eq!(c.completed(id, bytes(1)), Taken::Part);
        assert_eq!(c.completed(id, -libc::EINVAL), Taken::Refused(3));
        assert!(c.is_empty());
        // Bytes that are no whole number of elements, and nothing taken.
        let id = c.add(elements(0..2));
        assert_eq!(c.completed(id, 5), Taken::Refused(2));
        let id = c.add(elements(0..2));
        assert_eq!(c.completed(id, 0), Taken::Refused(2));
        // A completion for an id with nothing in flight changes nothing.
        assert_eq!(c.completed(id, bytes(2)), Taken::Unknown);
        assert_eq!(c.completed(99, bytes(2)), Taken::Unknown);
    }

    #[test]
    fn user_data_says_which_command_completed() {
        for kind in [
            Kind::Prep,
            Kind::Fetch,
            Kind::Commit,
            Kind::Provide,
            Kind::Remove,
        ] {
            for id in [0, 1, 0xffff] {
                assert_eq!(Kind::of(kind.user_data(id)), Some((kind, id)));
            }
        }
        // libublk's per-tag commands and anything else are not ours.
        assert_eq!(Kind::of(0), None);
        assert_eq!(Kind::of(0x1234_0000_0003), None);
        assert_eq!(Kind::of(USER_DATA_MARK | 9 << 16), None);
    }

    #[test]
    fn a_multishot_fetch_names_its_buffer_group_and_keeps_the_rest() {
        let plain = fetch_entry(3);
        // SAFETY: as in multishot_from_group.
        let before = unsafe { std::mem::transmute::<squeue::Entry, [u8; 64]>(plain.clone()) };
        let after = unsafe {
            std::mem::transmute::<squeue::Entry, [u8; 64]>(multishot_from_group(plain, 0x7662))
        };
        assert_eq!(
            after[SQE_BUF_GROUP..SQE_BUF_GROUP + 2],
            0x7662u16.to_ne_bytes()
        );
        let flags = u32::from_ne_bytes(after[28..32].try_into().unwrap());
        assert_eq!(flags & URING_CMD_MULTISHOT, URING_CMD_MULTISHOT);
        // Nothing else moved: the opcode, the command, the user_data.
        for (i, (a, b)) in before.iter().zip(after.iter()).enumerate() {
            if !(28..32).contains(&i) && !(40..42).contains(&i) {
                assert_eq!(a, b, "byte {i}");
            }
        }
        // The user_data sits at bytes 32..40 of the SQE.
        assert_eq!(
            u64::from_ne_bytes(after[32..40].try_into().unwrap()),
            Kind::Fetch.user_data(0)
        );
        // The ublk command (the header) starts at byte 48.
        assert_eq!(after[48..50], 3u16.to_ne_bytes());
    }
}
