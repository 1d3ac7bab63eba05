//! Per-tag completion slots: a tag's task parks on its slot until the
//! engine delivers that tag's result.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
struct Slot {
    result: Option<i32>,
    waker: Option<Waker>,
}

/// One slot per tag of a queue; shared by the queue's tasks on one thread.
#[derive(Clone)]
pub(crate) struct TagSlots(Rc<RefCell<Vec<Slot>>>);

impl TagSlots {
    pub(crate) fn new(depth: usize) -> Self {
        TagSlots(Rc::new(RefCell::new(
            (0..depth).map(|_| Slot::default()).collect(),
        )))
    }

    /// Delivers `result` to `tag` and wakes its task.
    pub(crate) fn complete(&self, tag: u16, result: i32) {
        let mut slots = self.0.borrow_mut();
        let Some(slot) = slots.get_mut(tag as usize) else {
            log::error!("completion for unknown tag {tag}");
            return;
        };
        slot.result = Some(result);
        if let Some(w) = slot.waker.take() {
            w.wake();
        }
    }

    /// Resolves to the result delivered for `tag`.
    pub(crate) fn wait(&self, tag: u16) -> SlotFuture {
        SlotFuture {
            slots: self.clone(),
            tag,
        }
    }
}

pub(crate) struct SlotFuture {
    slots: TagSlots,
    tag: u16,
}

impl Future for SlotFuture {
    type Output = i32;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        let mut slots = self.slots.0.borrow_mut();
        let Some(slot) = slots.get_mut(self.tag as usize) else {
            return Poll::Ready(-libc::EINVAL);
        };
        match slot.result.take() {
            Some(r) => Poll::Ready(r),
            None => {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_reaches_the_waiting_task() {
        let slots = TagSlots::new(4);
        let ex = smol::LocalExecutor::new();
        let s = slots.clone();
        let task = ex.spawn(async move { s.wait(2).await });
        while ex.try_tick() {}
        assert!(!task.is_finished());
        slots.complete(2, 4096);
        while ex.try_tick() {}
        assert_eq!(smol::block_on(task), 4096);
    }

    #[test]
    fn unknown_tags_do_not_panic() {
        let slots = TagSlots::new(1);
        slots.complete(9, 1);
        assert_eq!(smol::block_on(slots.wait(9)), -libc::EINVAL);
    }
}
