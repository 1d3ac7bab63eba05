use crate::IoBuf;

/// What a request asks of the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Store -> buffer.
    Read,
    /// Buffer -> store.
    Write,
    /// Completes once every write submitted earlier on this queue has landed.
    Flush,
    /// The range's contents may be forgotten; later reads return anything.
    Discard,
    /// The range reads back as zeroes.
    WriteZeroes,
}

impl Op {
    /// Whether the op moves data through the request's buffer.
    pub fn uses_buffer(self) -> bool {
        matches!(self, Op::Read | Op::Write)
    }
}

/// One block request, in bytes.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    /// Identifies the request in its queue; echoed in the [`Completion`].
    pub tag: u16,
    pub op: Op,
    pub offset: u64,
    pub len: u32,
    /// The tag's io buffer (source of a write, destination of a read).
    pub buf: IoBuf,
}

/// A finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub tag: u16,
    /// Bytes done, or a negative errno.
    pub result: i32,
}
