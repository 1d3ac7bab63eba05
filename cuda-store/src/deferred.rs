//! Requests a queue could not start yet (a page of theirs pending, every
//! round in flight, VRAM to wait for), kept to be submitted again, in two
//! lists made at open that swap places so neither grows once serving
//! (nothing on a queue's hot path allocates: docs/design.md).

use vramblk_store::Request;

pub(crate) struct Deferred {
    /// Waiting to be submitted again.
    waiting: Vec<Request>,
    /// What `waiting` held while it is being submitted again (empty
    /// otherwise).
    again: Vec<Request>,
}

impl Deferred {
    /// Room for `room` requests in each list.
    pub(crate) fn with_capacity(room: usize) -> Deferred {
        Deferred {
            waiting: Vec::with_capacity(room),
            again: Vec::with_capacity(room),
        }
    }

    pub(crate) fn push(&mut self, r: Request) {
        self.waiting.push(r);
    }

    /// Defers every request of `batch`, which is left empty.
    pub(crate) fn append(&mut self, batch: &mut Vec<Request>) {
        self.waiting.append(batch);
    }

    pub(crate) fn extend(&mut self, reqs: impl IntoIterator<Item = Request>) {
        self.waiting.extend(reqs);
    }

    pub(crate) fn len(&self) -> usize {
        self.waiting.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Takes what waits, to be submitted again; what is deferred meanwhile
    /// waits in the other list. Hand the (drained) list back with
    /// [`Deferred::retried`].
    pub(crate) fn take(&mut self) -> Vec<Request> {
        std::mem::swap(&mut self.waiting, &mut self.again);
        std::mem::take(&mut self.again)
    }

    /// Takes back the list [`Deferred::take`] gave, for its room; anything
    /// left in it still waits.
    pub(crate) fn retried(&mut self, mut list: Vec<Request>) {
        self.waiting.append(&mut list);
        self.again = list;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vramblk_store::{BufferRegion, Op};

    fn req(region: &BufferRegion, tag: u16) -> Request {
        Request {
            tag,
            op: Op::Flush,
            offset: 0,
            len: 0,
            buf: region.slot(usize::from(tag)).expect("slot"),
        }
    }

    #[test]
    fn what_is_deferred_while_retrying_waits_for_the_next_try_and_no_list_grows() {
        let region = BufferRegion::new(8, 4096).expect("region");
        let mut d = Deferred::with_capacity(4);
        let room = (d.waiting.capacity(), d.again.capacity());
        d.push(req(&region, 1));
        d.push(req(&region, 2));
        let mut retry = d.take();
        assert!(d.is_empty());
        // Submitting again defers one of them anew.
        let first = retry.remove(0);
        d.push(first);
        retry.clear();
        d.retried(retry);
        assert_eq!(d.len(), 1);
        assert_eq!(d.take().iter().map(|r| r.tag).collect::<Vec<_>>(), [1]);
        let (a, b) = (d.waiting.capacity(), d.again.capacity());
        assert!(
            a.max(b) <= room.0.max(room.1),
            "no list grew: {room:?} -> {:?}",
            (a, b)
        );
    }

    #[test]
    fn a_request_left_in_the_handed_back_list_still_waits() {
        let region = BufferRegion::new(8, 4096).expect("region");
        let mut d = Deferred::with_capacity(2);
        d.push(req(&region, 7));
        let list = d.take();
        d.retried(list);
        assert_eq!(d.len(), 1);
    }
}
