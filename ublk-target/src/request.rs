//! The kernel's io descriptor as a store request, for either queue loop.

use libublk::sys;
use vramblk_store::{IoBuf, Op, Request};

/// Translates the kernel's io descriptor; unsupported ops fail with
/// EOPNOTSUPP rather than reaching the store.
pub(crate) fn from_iod(tag: u16, iod: &sys::ublksrv_io_desc, buf: IoBuf) -> Result<Request, i32> {
    let op = match iod.op_flags & 0xff {
        sys::UBLK_IO_OP_READ => Op::Read,
        sys::UBLK_IO_OP_WRITE => Op::Write,
        sys::UBLK_IO_OP_FLUSH => Op::Flush,
        sys::UBLK_IO_OP_DISCARD => Op::Discard,
        sys::UBLK_IO_OP_WRITE_ZEROES => Op::WriteZeroes,
        _ => return Err(-libc::EOPNOTSUPP),
    };
    if op == Op::Flush {
        // A flush carries no range; the block layer leaves its sector at -1.
        return Ok(Request {
            tag,
            op,
            offset: 0,
            len: 0,
            buf,
        });
    }
    let len = (iod.nr_sectors as u64) << 9;
    Ok(Request {
        tag,
        op,
        offset: iod.start_sector.checked_mul(512).ok_or(-libc::EINVAL)?,
        len: u32::try_from(len).map_err(|_| -libc::EINVAL)?,
        buf,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vramblk_store::BufferRegion;

    fn iod(op: u32, start_sector: u64, nr_sectors: u32) -> sys::ublksrv_io_desc {
        sys::ublksrv_io_desc {
            op_flags: op,
            nr_sectors,
            start_sector,
            ..Default::default()
        }
    }

    #[test]
    fn translates_kernel_requests() {
        let bufs = BufferRegion::new(1, 4096).unwrap();
        let buf = bufs.slot(0).unwrap();
        let r = from_iod(3, &iod(sys::UBLK_IO_OP_WRITE, 8, 8), buf).unwrap();
        assert_eq!((r.tag, r.op, r.offset, r.len), (3, Op::Write, 4096, 4096));
        // The block layer's flush requests carry sector -1.
        let r = from_iod(1, &iod(sys::UBLK_IO_OP_FLUSH, u64::MAX, 0), buf).unwrap();
        assert_eq!((r.op, r.offset, r.len), (Op::Flush, 0, 0));
        assert_eq!(
            from_iod(1, &iod(sys::UBLK_IO_OP_READ, u64::MAX, 8), buf).unwrap_err(),
            -libc::EINVAL
        );
        assert_eq!(
            from_iod(1, &iod(sys::UBLK_IO_OP_ZONE_OPEN, 0, 8), buf).unwrap_err(),
            -libc::EOPNOTSUPP
        );
    }
}
