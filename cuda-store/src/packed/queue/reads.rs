//! A compressed queue's read rounds: looking pages up, filling what needs
//! no VRAM on the CPU, decompressing the rest on the GPU, or for a small
//! round fetching the blocks and decoding them on the CPU.

use super::*;

impl PackedQueue {
    /// Starts the rounds of `reqs`, reads of at most [`ROUND_PAGES`] pages
    /// each; what finds no round free waits (deferred).
    pub(super) fn start_reads(&mut self, reqs: &mut Vec<Req>, done: &mut Vec<Completion>) {
        self.defer_pending(reqs);
        while !reqs.is_empty() {
            let Some(round) = self.take_round(Stage::Reading) else {
                self.defer(reqs);
                return;
            };
            let mut pages = 0;
            let n = reqs
                .iter()
                .take_while(|r| {
                    pages += r.pages as usize;
                    pages <= ROUND_PAGES
                })
                .count()
                .max(1);
            self.start_read_round(round, &reqs[..n], done);
            reqs.drain(..n);
        }
    }

    /// A round of reads: unwritten and same-filled pages are filled here,
    /// the rest decompressed by one launch (or, a few, on the CPU).
    fn start_read_round(&mut self, mut round: Round, reqs: &[Req], done: &mut Vec<Completion>) {
        round.clock = stages::start();
        let packed = Arc::clone(&self.packed);
        let st = &packed.state;
        // The queue's oldest read is published before any page is looked
        // up (state.rs: a slot freed after this waits for the read).
        {
            let mut sl = st.slots();
            let epoch = sl.epoch();
            round.epoch = Some(epoch);
            if !self.rounds.iter().any(|r| r.epoch.is_some()) {
                sl.set_reader(self.qid, Some(epoch));
            }
        }
        // Every page looked up first (`job` holds where a request's
        // entries start), so the round knows how many are stored.
        let mut stored = 0;
        for &r in reqs {
            let at = round.looked.len();
            let n = r.pages as usize;
            round.looked.resize(at + n, Entry::Empty);
            if !st.settled(r.page, r.pages, &mut round.looked[at..]) {
                // A write of a page of it began since the first check.
                round.looked.truncate(at);
                self.deferred.push(r.orig);
                continue;
            }
            stored += round.looked[at..]
                .iter()
                .filter(|e| e.loc().is_some())
                .count();
            round.reqs.push(Req { job: at, ..r });
        }
        let on_cpu = stored <= CPU_PAGES;
        if !on_cpu {
            round.stream = self.read_stream();
        }
        for i in 0..round.reqs.len() {
            let mut r = round.reqs[i];
            let looked = r.job;
            r.job = round.jobs.len;
            for k in 0..r.pages as usize {
                // SAFETY: page k of the read's own buffer.
                let page = unsafe { std::slice::from_raw_parts_mut(r.buf.add(k * PAGE), PAGE) };
                let (at, len, sum, job_kind) = match round.looked[looked + k] {
                    Entry::Empty => {
                        page.fill(0);
                        continue;
                    }
                    Entry::Same(w) => {
                        fill(page.try_into().expect("a page"), w);
                        continue;
                    }
                    Entry::Lz { at, len, sum } => (at, u32::from(len), sum, kind::COMPRESSED),
                    Entry::Raw { at, sum } => (at, PAGE as u32, sum, kind::RAW),
                };
                let slot = match self.pin_for(&mut round, at.extent, false) {
                    Ok(s) => s,
                    Err(_) => {
                        r.result = -libc::EIO;
                        break;
                    }
                };
                let src = slot_addr(self.base, slot) + at.offset();
                if on_cpu && !self.fetch(&mut round, src, len, job_kind, i, k, page) {
                    r.result = -libc::EIO;
                    break;
                }
                let _ = round.jobs.push(PageJob {
                    src,
                    dst: r.dev + (k * PAGE) as u64,
                    word: 0,
                    len,
                    kind: job_kind,
                });
                round.job_reqs.push((i, k as u32, sum));
            }
            round.reqs[i] = r;
        }
        // SAFETY: blocks in slots the round pinned, pages of its requests'
        // pinned buffers, the job table: alive until its event.
        let launched = if on_cpu {
            Ok(())
        } else {
            unsafe {
                self.pages
                    .decompress(round.jobs.dev, round.jobs.len as u32, round.stream)
            }
        };
        if let Err(e) = launched {
            log::error!("decompressing a round of reads: {e}");
            for r in &mut round.reqs {
                r.result = -libc::EIO;
            }
        }
        self.record(round, done);
    }

    /// For a read decoded on the CPU: queues the copy of a stored page's
    /// block at `src` (a raw one straight into `page`, the read's own
    /// buffer) for job `jobs.len` (request `req`, its page `k`); false when
    /// the copy could not be queued.
    #[allow(clippy::too_many_arguments)]
    fn fetch(
        &self,
        round: &mut Round,
        src: u64,
        len: u32,
        job_kind: u32,
        req: usize,
        k: usize,
        page: &mut [u8],
    ) -> bool {
        let r = if job_kind == kind::RAW {
            // SAFETY: a slot the round pinned into the read's own pinned
            // buffer, alive until the round's event.
            retried_once("a copy", || unsafe {
                result::memcpy_dtoh_async(&mut page[..], src, round.stream)
            })
        } else {
            let block = round.host_blocks.len;
            if !round.host_blocks.push([0; PAGE]) {
                return false;
            }
            round
                .cpu_decodes
                .push((round.jobs.len, req, k as u32, block));
            let n = (len as usize).next_multiple_of(16);
            // SAFETY: the block in a slot the round pinned (its class's slot
            // holds the rounded length), into the round's pinned page.
            retried_once("a copy", || unsafe {
                result::memcpy_dtoh_async(
                    std::slice::from_raw_parts_mut(
                        round.host_blocks.host_at(block).cast::<u8>(),
                        n,
                    ),
                    src,
                    round.stream,
                )
            })
        };
        if let Err(e) = r {
            log::error!("fetching a block of {len} bytes: {}", describe(e));
            return false;
        }
        true
    }

    /// For a finished read round: decodes the blocks fetched for the CPU,
    /// then fails each read whose block did not decode or whose page does
    /// not match its checksum.
    pub(super) fn settle_reads(&self, round: &mut Round) {
        for &(j, i, k, block) in &round.cpu_decodes {
            let len = round.jobs.get(j).map_or(0, |job| job.len as usize);
            let r = &round.reqs[i];
            // SAFETY: the round's pinned page its finished copy filled,
            // and page k of the read's own buffer.
            let (from, to) = unsafe {
                (
                    std::slice::from_raw_parts(round.host_blocks.host_at(block).cast::<u8>(), len),
                    &mut *r.buf.add(k as usize * PAGE).cast::<[u8; PAGE]>(),
                )
            };
            if lz::decompress(from, to).is_err() {
                if let Some(mut job) = round.jobs.get(j) {
                    job.kind |= kind::CORRUPT;
                    round.jobs.set(j, job);
                }
            }
        }
        for (j, &(i, k, sum)) in round.job_reqs.iter().enumerate() {
            let job = round.jobs.get(j).unwrap_or_default();
            let r = &mut round.reqs[i];
            if r.result < 0 {
                continue;
            }
            let k = u64::from(k);
            if job.kind & kind::CORRUPT != 0 {
                log::error!(
                    "a compressed block of page {} on {} does not decode; that read fails with EIO",
                    r.page + k,
                    self.gpu
                );
                r.result = -libc::EIO;
            } else if self.packed.integrity {
                // SAFETY: the page the finished launch filled; nothing
                // else touches it until the read is answered.
                let page =
                    unsafe { std::slice::from_raw_parts(r.buf.add(k as usize * PAGE), PAGE) };
                if page_sum_cpu(page) != sum {
                    report_mismatch(&self.gpu, (r.page + k) * PAGE as u64, PAGE as u32);
                    r.result = -libc::EIO;
                }
            }
        }
    }
}
