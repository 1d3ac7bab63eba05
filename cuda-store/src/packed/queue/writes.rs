//! A compressed queue's write rounds (and discards): compressing pages,
//! on the GPU or for a small round on the CPU, then putting each block in
//! a slot of its class and its entry in the page map.

use super::*;

impl PackedQueue {
    /// Starts rounds of writes, each as many requests as a staging holds
    /// ([`STAGING_PAGES`]), one per free staging: one launch compresses
    /// each round's pages. What finds no staging free waits (deferred).
    /// (Rounds cut smaller, 16 or 32 pages over four stagings, wrote
    /// slower on the H200: docs/benchmarks.md.)
    pub(super) fn start_writes(&mut self, reqs: &mut Vec<Req>, done: &mut Vec<Completion>) {
        let clock = stages::start();
        self.defer_pending(reqs);
        if reqs.is_empty() {
            return;
        }
        let pages: usize = reqs.iter().map(|r| r.pages as usize).sum();
        if pages <= CPU_PAGES {
            match self.take_round(Stage::Compressing) {
                Some(mut round) => {
                    round.clock = clock;
                    self.compress_on_cpu(round, reqs, done)
                }
                None => self.defer(reqs),
            }
            return;
        }
        let mut from = 0;
        while from < reqs.len() {
            // A staging holds one round: with all taken, the rest wait.
            let free = self.staging_busy.iter().position(|busy| !busy);
            let round = free.and_then(|_| self.take_round(Stage::Compressing));
            let (Some(i), Some(mut round)) = (free, round) else {
                self.deferred.extend(reqs[from..].iter().map(|r| r.orig));
                break;
            };
            let mut n = 0;
            let mut pages = 0;
            while let Some(r) = reqs.get(from + n) {
                if n > 0 && pages + r.pages as usize > STAGING_PAGES {
                    break;
                }
                pages += r.pages as usize;
                n += 1;
            }
            round.clock = clock;
            self.start_write_round(i, round, &reqs[from..from + n], done);
            from += n;
        }
        reqs.clear();
    }

    /// Starts a round of `reqs` (at most [`STAGING_PAGES`] pages) on
    /// staging `i`: one launch compresses every page into it.
    fn start_write_round(
        &mut self,
        i: usize,
        mut round: Round,
        reqs: &[Req],
        done: &mut Vec<Completion>,
    ) {
        self.staging_busy[i] = true;
        round.staging = Some(i);
        round.stream = self.write_streams[i];
        let staging = self.stagings[i];
        round.blocks_from = staging;
        for &r in reqs {
            let mut r = r;
            if round.jobs.len + r.pages as usize > STAGING_PAGES {
                self.deferred.push(r.orig);
                continue;
            }
            r.job = round.jobs.len;
            for k in 0..r.pages as u64 {
                let job = PageJob {
                    src: r.dev + k * PAGE as u64,
                    dst: staging + round.jobs.len as u64 * PAGE as u64,
                    ..PageJob::default()
                };
                // The round has room for STAGING_PAGES jobs.
                let _ = round.jobs.push(job);
            }
            round.reqs.push(r);
        }
        // SAFETY: the jobs name the pinned io buffers of requests not yet
        // answered and a staging of the queue, which no other round uses
        // until this one's copies out of it are queued (after which a
        // compress into it runs after them, on the same stream).
        let launched = unsafe {
            self.pages
                .compress(round.jobs.dev, round.jobs.len as u32, round.stream)
        };
        if let Err(e) = launched {
            log::error!("compressing a round of writes: {e}");
            for r in &mut round.reqs {
                r.result = -libc::EIO;
            }
            round.stage = Stage::Storing;
        }
        self.record(round, done);
    }

    /// A small round of writes: each page encoded here into pinned memory
    /// (an LZ4 block as the compress launch writes one, by LZ4's C
    /// library's faster search: the write waits for it), then stored as any
    /// round's blocks are (by the copy engine: a few pieces).
    fn compress_on_cpu(
        &mut self,
        mut round: Round,
        reqs: &mut Vec<Req>,
        done: &mut Vec<Completion>,
    ) {
        round.blocks_from = round.host_blocks.dev;
        let mut out = [0u8; PAGE];
        for mut r in reqs.drain(..) {
            r.job = round.jobs.len;
            for k in 0..r.pages as usize {
                // SAFETY: page k of the write's own buffer, unchanged until
                // it is answered.
                let page: &[u8; PAGE] = unsafe { &*r.buf.add(k * PAGE).cast() };
                let job = match self.packed.mode {
                    Compress::Lz => encode_page_quick(page, &mut out),
                    _ => same_filled(page).map_or(Stored::Raw, Stored::Same),
                };
                let (job, block) = match job {
                    Stored::Same(word) => (page_job(kind::SAME, 0, word), None),
                    Stored::Compressed(len) => {
                        (page_job(kind::COMPRESSED, len, 0), Some(&out[..len]))
                    }
                    Stored::Raw => (page_job(kind::RAW, PAGE, 0), Some(&page[..])),
                };
                let mut slot = [0u8; PAGE];
                if let Some(b) = block {
                    slot[..b.len()].copy_from_slice(b);
                }
                // Both have room for CPU_PAGES pages.
                let _ = round.host_blocks.push(slot);
                let _ = round.jobs.push(job);
            }
            round.reqs.push(r);
        }
        // Not counted in flight yet: `record` counts what it did not defer.
        round.clock = stages::lap(Timed::Lookup, round.clock);
        self.store_blocks(&mut round);
        round.clock = stages::lap(Timed::Place, round.clock);
        self.record(round, done);
    }

    /// Once a round's pages are compressed: puts each block in a slot of
    /// its class and its entry in the map (two launches, in that order; a
    /// round of a few pieces, a lone write's, by the copy engine).
    /// Returns how many of its requests it deferred (a page of theirs was
    /// pending meanwhile).
    pub(super) fn store_blocks(&mut self, round: &mut Round) -> usize {
        let packed = Arc::clone(&self.packed);
        let st = &packed.state;
        let mut deferred = 0;
        for r in round.reqs.iter_mut().filter(|r| r.result >= 0) {
            if st.try_mark(r.page, r.pages) {
                r.marked = true;
            } else {
                // Another queue's write of a page of it is on its way.
                r.result = DEFERRED;
                self.deferred.push(r.orig);
                deferred += 1;
            }
        }
        self.take_slots(round);
        for i in 0..round.reqs.len() {
            let r = round.reqs[i];
            if !r.marked || r.result < 0 {
                continue;
            }
            let first_entry = round.entries.len;
            for k in 0..r.pages as usize {
                let j = r.job + k;
                let job = round.jobs.get(j).unwrap_or_default();
                // SAFETY: page k of the request's own buffer, which holds
                // the data until the write is answered.
                let page = unsafe { std::slice::from_raw_parts(r.buf.add(k * PAGE), PAGE) };
                let at = round.slots.get(j).copied().flatten();
                let (new, placed) = match self.place(&job, at, round, page) {
                    Ok(e) => e,
                    Err(errno) => {
                        // This page's slot and those after it go back.
                        let rest = j..r.job + r.pages as usize;
                        let mut sl = st.slots();
                        for at in round.slots[rest].iter().flatten() {
                            sl.pool.give(*at);
                        }
                        round.reqs[i].result = -errno;
                        break;
                    }
                };
                if let (Some(at), Some((src, slot))) = (new.loc(), placed) {
                    let src = match src {
                        Source::Staging => round.blocks_from + (j * PAGE) as u64,
                        Source::Buffer => r.dev + (k * PAGE) as u64,
                    };
                    let dst = slot_addr(self.base, slot) + at.offset();
                    let len = (new.stored_len() as u32).next_multiple_of(16);
                    let _ = round.blocks.push(Desc {
                        src,
                        dst,
                        sums: 0,
                        len,
                        flags: flags::COPY,
                    });
                }
                let old = st.set(r.page + k as u64, new);
                round.freed.extend(old.loc());
                let _ = round.entries.push(new.encode());
            }
            self.copy_entries(round, first_entry, r.page);
        }
        // Blocks first, then their entries, in stream order: a server
        // killed between them leaves the old entry, naming a whole page.
        let ok = if round.blocks.len + round.entry_copies.len <= ENGINE_PIECES {
            copy_by_engine(&round.blocks, round.stream)
                && copy_by_engine(&round.entry_copies, round.stream)
        } else {
            self.launch_copies(&round.blocks, round.stream)
                && self.launch_copies(&round.entry_copies, round.stream)
        };
        if !ok {
            for r in &mut round.reqs {
                r.result = -libc::EIO;
            }
        }
        // The copies out of its staging are queued on its stream: the next
        // compress into it queues after them.
        if let Some(i) = round.staging.take() {
            self.staging_busy[i] = false;
        }
        round.stage = Stage::Storing;
        deferred
    }

    /// Takes a slot for every page of the round's marked writes that
    /// needs one (`round.slots`, by page job), all under one hold of the
    /// pool's lock; a write the pool has no room for fails.
    fn take_slots(&self, round: &mut Round) {
        round.slots.clear();
        round.slots.resize(round.jobs.len, None);
        let mut sl = self.packed.state.slots();
        for r in round.reqs.iter_mut().filter(|r| r.marked && r.result >= 0) {
            let jobs = r.job..r.job + r.pages as usize;
            for j in jobs.clone() {
                let job = round.jobs.get(j).unwrap_or_default();
                let Some((class, _)) = self.class_of(&job) else {
                    continue;
                };
                let Some(at) = sl.pool.take(class) else {
                    log::error!("the pool of a compressed device is used up; the write fails");
                    for at in round.slots[jobs].iter_mut().filter_map(Option::take) {
                        sl.pool.give(at);
                    }
                    r.result = -libc::EIO;
                    break;
                };
                round.slots[j] = Some(at);
            }
        }
    }

    /// The class of slot page `job` is stored in and where its block is
    /// copied from; None for a same-filled page (no slot).
    fn class_of(&self, job: &PageJob) -> Option<(usize, Source)> {
        let lz = job.kind == kind::COMPRESSED && self.packed.mode == Compress::Lz;
        Some(match job.kind {
            kind::SAME => return None,
            _ if lz => match class_of(job.len as usize) {
                Some(c) => (c.index(), Source::Staging),
                None => (RAW_CLASS, Source::Buffer),
            },
            kind::RAW => (RAW_CLASS, Source::Staging),
            // Compressed but the device keeps only same-filled pages, or
            // a kind no kernel writes: the page whole, from its buffer.
            _ => (RAW_CLASS, Source::Buffer),
        })
    }

    /// How page `job` is stored in slot `at` (taken for it; None for a
    /// same-filled page): pins its pool extent; the entry, and where its
    /// block is copied from and the VRAM slot its pool extent lives in.
    /// Err: the errno the request fails with (the slot not given back).
    fn place(
        &self,
        job: &PageJob,
        at: Option<Loc>,
        round: &mut Round,
        page: &[u8],
    ) -> Result<(Entry, Option<(Source, u32)>), i32> {
        let Some((class, source)) = self.class_of(job) else {
            return Ok((Entry::Same(job.word), None));
        };
        let Some(at) = at else {
            return Err(libc::EIO);
        };
        let slot = match self.pin_for(round, at.extent, true) {
            Ok(s) => s,
            Err(why) => {
                return Err(match why {
                    PinRefused::NoRoom => {
                        // The keeper is asked for VRAM; this write fails.
                        self.extents.want_room();
                        report_no_room();
                        libc::ENOSPC
                    }
                    _ => libc::EIO,
                });
            }
        };
        let sum = if self.packed.integrity {
            page_sum_cpu(page)
        } else {
            0
        };
        let entry = if class == RAW_CLASS {
            Entry::Raw { at, sum }
        } else {
            Entry::Lz {
                at,
                len: job.len as u16,
                sum,
            }
        };
        Ok((entry, Some((source, slot))))
    }

    /// Queues the copy of the entries from `first` on (one request's, for
    /// pages from `page`) into the page map.
    fn copy_entries(&self, round: &mut Round, first: usize, page: u64) {
        let n = round.entries.len - first;
        if n == 0 {
            return;
        }
        let whole = Desc {
            src: round.entries.dev + (first * 16) as u64,
            dst: page_map_addr(self.base, page),
            sums: 0,
            len: (n * 16) as u32,
            flags: flags::COPY,
        };
        for d in kernel::pieces(whole) {
            let _ = round.entry_copies.push(d);
        }
    }

    /// Starts a round of discards and write-zeroes: their pages' entries
    /// zeroed in VRAM (an empty entry is all zeros), the host's copy of
    /// the map and the old slots once that is done (`finish`).
    pub(super) fn start_empties(&mut self, reqs: &mut Vec<Req>, done: &mut Vec<Completion>) {
        self.defer_pending(reqs);
        if reqs.is_empty() {
            return;
        }
        let clock = stages::start();
        let Some(mut round) = self.take_round(Stage::Emptying) else {
            self.defer(reqs);
            return;
        };
        round.clock = clock;
        let packed = Arc::clone(&self.packed);
        let st = &packed.state;
        for mut r in reqs.drain(..) {
            if !st.try_mark(r.page, r.pages) {
                // A write of a page of it began since the first check.
                self.deferred.push(r.orig);
                continue;
            }
            r.marked = true;
            let len = r.pages as usize * 16;
            // SAFETY: the request's range of the page map, inside the
            // store's reservation (the engine checks requests against the
            // device's size).
            let zeroed = retried_once("zeroing page map entries", || unsafe {
                result::memset_d8_async(page_map_addr(self.base, r.page), 0, len, self.stream)
            });
            if let Err(e) = zeroed {
                log::error!(
                    "zeroing the entries of {} pages: {}; that request fails",
                    r.pages,
                    describe(e)
                );
                r.result = -libc::EIO;
            }
            round.reqs.push(r);
        }
        self.record(round, done);
    }
}

/// Where a block is copied into its slot from.
#[derive(Clone, Copy)]
enum Source {
    /// The compress launch's output (a block, or a raw page it copied).
    Staging,
    /// The write's own buffer (a page kept whole without the kernel's copy).
    Buffer,
}

/// A page job as the compress kernel leaves it.
fn page_job(kind: u32, len: usize, word: u64) -> PageJob {
    PageJob {
        src: 0,
        dst: 0,
        word,
        len: len as u32,
        kind,
    }
}
