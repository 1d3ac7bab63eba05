//! A compressed queue's write rounds (and discards): compressing pages,
//! on the GPU or for a small round on the CPU, then putting each block in
//! a slot of its class and its entry in the page map.

use super::*;

impl PackedQueue {
    /// Starts a round of writes: one launch compresses every page. What
    /// does not fit the round, or finds it taken, waits (deferred).
    pub(super) fn start_writes(&mut self, reqs: &mut Vec<Req>, done: &mut Vec<Completion>) {
        self.defer_pending(reqs);
        if reqs.is_empty() {
            return;
        }
        let pages: usize = reqs.iter().map(|r| r.pages as usize).sum();
        if pages <= CPU_PAGES {
            match self.take_round(Stage::Compressing) {
                Some(round) => self.compress_on_cpu(round, reqs, done),
                None => self.defer(reqs),
            }
            return;
        }
        // A staging holds one round: with both taken, the rest wait.
        let free = self.staging_busy.iter().position(|busy| !busy);
        let round = free.and_then(|_| self.take_round(Stage::Compressing));
        let (Some(i), Some(mut round)) = (free, round) else {
            self.defer(reqs);
            return;
        };
        self.staging_busy[i] = true;
        round.staging = Some(i);
        let staging = self.stagings[i];
        round.blocks_from = staging;
        for mut r in reqs.drain(..) {
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
                .compress(round.jobs.dev, round.jobs.len as u32, self.stream)
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
    /// (what the compress launch would have written), then stored as
    /// any round's blocks are.
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
                    Compress::Lz => encode_page(page, &mut out),
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
        self.store_blocks(&mut round);
        self.record(round, done);
    }

    /// Once a round's pages are compressed: puts each block in a slot of
    /// its class and its entry in the map (two launches, in that order).
    /// Returns how many of its requests it deferred (a page of theirs was
    /// pending meanwhile).
    pub(super) fn store_blocks(&mut self, round: &mut Round) -> usize {
        let mut deferred = 0;
        let packed = Arc::clone(&self.packed);
        let mut st = packed.lock();
        for i in 0..round.reqs.len() {
            let (page0, pages, job0, buf, dev) = {
                let r = &mut round.reqs[i];
                if r.result < 0 {
                    continue;
                }
                if st.pending_any(r.page, r.pages) {
                    // Another queue's write of a page of it is on its way.
                    r.result = DEFERRED;
                    self.deferred.push(r.orig);
                    deferred += 1;
                    continue;
                }
                st.set_pending(r.page, r.pages, true);
                r.marked = true;
                (r.page, r.pages, r.job, r.buf, r.dev)
            };
            let first_entry = round.entries.len;
            for k in 0..pages as usize {
                let job = round.jobs.get(job0 + k).unwrap_or_default();
                // SAFETY: page k of the request's own buffer, which holds
                // the data until the write is answered.
                let page = unsafe { std::slice::from_raw_parts(buf.add(k * PAGE), PAGE) };
                let stored = match self.place(&mut st, &job, round, page) {
                    Ok(e) => e,
                    Err(errno) => {
                        round.reqs[i].result = -errno;
                        break;
                    }
                };
                let (new, placed) = stored;
                if let (Some(at), Some((src, slot))) = (new.loc(), placed) {
                    let src = match src {
                        Source::Staging => round.blocks_from + ((job0 + k) * PAGE) as u64,
                        Source::Buffer => dev + (k * PAGE) as u64,
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
                let old = st.set(page0 + k as u64, new);
                round.freed.extend(old.loc());
                let _ = round.entries.push(new.encode());
            }
            self.copy_entries(round, first_entry, page0);
        }
        drop(st);
        let ok = self.launch_copies(&round.blocks) && self.launch_copies(&round.entry_copies);
        if !ok {
            for r in &mut round.reqs {
                r.result = -libc::EIO;
            }
        }
        // The copies out of its staging are queued on the queue's stream:
        // the next compress into it queues after them.
        if let Some(i) = round.staging.take() {
            self.staging_busy[i] = false;
        }
        round.stage = Stage::Storing;
        deferred
    }

    /// Decides how page `job` is stored and takes (and pins) its slot; the
    /// entry, and where its block is copied from and the VRAM slot its
    /// pool extent lives in. Err: the errno the request fails with.
    fn place(
        &self,
        st: &mut crate::packed::state::State,
        job: &PageJob,
        round: &mut Round,
        page: &[u8],
    ) -> Result<(Entry, Option<(Source, u32)>), i32> {
        let lz = job.kind == kind::COMPRESSED && self.packed.mode == Compress::Lz;
        let (class, source) = match job.kind {
            kind::SAME => return Ok((Entry::Same(job.word), None)),
            _ if lz => match class_of(job.len as usize) {
                Some(c) => (c.index(), Source::Staging),
                None => (RAW_CLASS, Source::Buffer),
            },
            kind::RAW => (RAW_CLASS, Source::Staging),
            // Compressed but the device keeps only same-filled pages, or
            // a kind no kernel writes: the page whole, from its buffer.
            _ => (RAW_CLASS, Source::Buffer),
        };
        let Some(at) = st.pool.take(class) else {
            log::error!("the pool of a compressed device is used up; the write fails");
            return Err(libc::EIO);
        };
        let slot = match self.pin(at.extent, true) {
            Ok(s) => s,
            Err(why) => {
                st.pool.give(at);
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
        round.pins.push(at.extent);
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
        let Some(mut round) = self.take_round(Stage::Emptying) else {
            self.defer(reqs);
            return;
        };
        let packed = Arc::clone(&self.packed);
        let mut st = packed.lock();
        for mut r in reqs.drain(..) {
            if st.pending_any(r.page, r.pages) {
                // A write of a page of it began since the first check.
                self.deferred.push(r.orig);
                continue;
            }
            st.set_pending(r.page, r.pages, true);
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
        drop(st);
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
