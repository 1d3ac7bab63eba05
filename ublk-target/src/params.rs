//! The block-device parameters vramblk devices advertise.

use libublk::sys;

/// 4 KiB logical and physical blocks (the swap page size), non-rotational,
/// a volatile cache so the kernel sends FLUSH, and discard / write-zeroes
/// so `swapon --discard` and `blkdiscard` work.
pub(crate) fn device_params(dev_size: u64, max_io_bytes: u32) -> sys::ublk_params {
    let max_sectors = max_io_bytes >> 9;
    sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE,
            logical_bs_shift: 12,
            physical_bs_shift: 12,
            io_opt_shift: 12,
            io_min_shift: 12,
            max_sectors,
            dev_sectors: dev_size >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: 4096,
            // 1 GiB, so the byte count a store returns still fits an i32 result.
            max_discard_sectors: 1 << 21,
            max_write_zeroes_sectors: 1 << 21,
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertises_4k_blocks_discard_and_no_rotation() {
        let p = device_params(1 << 30, 512 << 10);
        assert_eq!(p.basic.dev_sectors, 2 * 1024 * 1024);
        assert_eq!(p.basic.logical_bs_shift, 12);
        assert_eq!(p.basic.max_sectors, 1024);
        assert_eq!(p.basic.attrs & sys::UBLK_ATTR_ROTATIONAL, 0);
        assert_ne!(p.types & sys::UBLK_PARAM_TYPE_DISCARD, 0);
        assert_eq!(p.discard.discard_granularity, 4096);
    }
}
