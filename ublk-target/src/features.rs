//! The ublk driver's feature flags: their names, which of them vramblk
//! uses, and which it cannot do without.

use libublk::sys;

/// What vramblk does with a feature the kernel offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// Every device needs it; `add` refuses a kernel without it.
    Required(&'static str),
    /// Used where the kernel offers it; without it vramblk does the same
    /// job another way.
    WhereOffered(&'static str),
    /// Not used (yet).
    Unused,
}

/// Which commands a device's queues take requests from the kernel with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoCommands {
    /// Batch commands (UBLK_F_BATCH_IO, Linux 7.0+) where the kernel
    /// offers them, else per-tag.
    #[default]
    Auto,
    /// One FETCH and one COMMIT per request, on every kernel.
    PerTag,
}

/// Every flag this vramblk knows, by bit (include/uapi/linux/ublk_cmd.h).
pub const KNOWN: &[(u64, &str, Use)] = &[
    (
        sys::UBLK_F_SUPPORT_ZERO_COPY as u64,
        "SUPPORT_ZERO_COPY",
        Use::Unused,
    ),
    (
        sys::UBLK_F_URING_CMD_COMP_IN_TASK as u64,
        "URING_CMD_COMP_IN_TASK",
        Use::Unused,
    ),
    (
        sys::UBLK_F_NEED_GET_DATA as u64,
        "NEED_GET_DATA",
        Use::Unused,
    ),
    (
        sys::UBLK_F_USER_RECOVERY as u64,
        "USER_RECOVERY",
        Use::Required("a crashed server's device is kept and recovered"),
    ),
    (
        sys::UBLK_F_USER_RECOVERY_REISSUE as u64,
        "USER_RECOVERY_REISSUE",
        Use::Required("I/O in flight when a server crashed is issued again"),
    ),
    (
        sys::UBLK_F_UNPRIVILEGED_DEV as u64,
        "UNPRIVILEGED_DEV",
        Use::Unused,
    ),
    (
        sys::UBLK_F_CMD_IOCTL_ENCODE as u64,
        "CMD_IOCTL_ENCODE",
        Use::Required("control commands are sent ioctl-encoded (libublk)"),
    ),
    (sys::UBLK_F_USER_COPY as u64, "USER_COPY", Use::Unused),
    (sys::UBLK_F_ZONED as u64, "ZONED", Use::Unused),
    (1 << 9, "USER_RECOVERY_FAIL_IO", Use::Unused),
    (sys::UBLK_F_UPDATE_SIZE as u64, "UPDATE_SIZE", Use::Unused),
    (sys::UBLK_F_AUTO_BUF_REG as u64, "AUTO_BUF_REG", Use::Unused),
    (
        sys::UBLK_F_QUIESCE as u64,
        "QUIESCE",
        Use::WhereOffered(
            "an upgrade drains the old server's requests before the new one takes over \
             (elsewhere the old server is killed and its requests issued again)",
        ),
    ),
    (1 << 13, "PER_IO_DAEMON", Use::Unused),
    (1 << 14, "BUF_REG_OFF_DAEMON", Use::Unused),
    (
        sys::UBLK_F_BATCH_IO as u64,
        "BATCH_IO",
        Use::WhereOffered(
            "a queue fetches and commits each round's requests with one command each way \
             (elsewhere one command per request; `add --io-commands per-tag` asks for that)",
        ),
    ),
    (1 << 16, "INTEGRITY", Use::Unused),
    (1 << 17, "SAFE_STOP_DEV", Use::Unused),
    (1 << 18, "NO_AUTO_PART_SCAN", Use::Unused),
    (1 << 19, "SHMEM_ZC", Use::Unused),
];

/// One line per bit set in `features`: its name and what vramblk does
/// with it; bits this vramblk does not know are named by number.
pub fn describe(features: u64) -> Vec<String> {
    let mut lines = Vec::new();
    for bit in 0..64 {
        let flag = 1u64 << bit;
        if features & flag == 0 {
            continue;
        }
        lines.push(match KNOWN.iter().find(|(f, _, _)| *f == flag) {
            Some((_, name, Use::Required(why) | Use::WhereOffered(why))) => {
                format!("{name:<24} used: {why}")
            }
            Some((_, name, Use::Unused)) => format!("{name:<24} not used"),
            None => format!("{:<24} not known to this vramblk", format!("bit {bit}")),
        });
    }
    lines
}

/// The flags vramblk adds its devices with, of those `features` offers
/// and vramblk uses where offered.
pub fn offered_in_use(features: u64) -> u64 {
    KNOWN
        .iter()
        .filter(|(flag, _, u)| matches!(u, Use::WhereOffered(_)) && features & flag != 0)
        .fold(0, |all, (flag, _, _)| all | flag)
}

/// The required features `features` lacks, with why each is needed.
pub fn missing(features: u64) -> Vec<(&'static str, &'static str)> {
    KNOWN
        .iter()
        .filter_map(|(flag, name, u)| match u {
            Use::Required(why) if features & flag == 0 => Some((*name, *why)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bit_of_a_new_kernel_is_named_or_numbered() {
        // Debian's 7.3.4 reports 0x1fffff.
        let lines = describe(0x1f_ffff);
        assert_eq!(lines.len(), 21);
        assert!(
            lines[3].starts_with("USER_RECOVERY ") && lines[3].contains("used:"),
            "{lines:?}"
        );
        assert!(
            lines[15].starts_with("BATCH_IO") && lines[15].contains("used: a queue fetches"),
            "{lines:?}"
        );
        assert!(lines[16].starts_with("INTEGRITY") && lines[16].ends_with("not used"));
        assert!(
            lines[20].starts_with("bit 20") && lines[20].ends_with("not known to this vramblk")
        );
        assert!(
            lines[12].starts_with("QUIESCE ") && lines[12].contains("used:"),
            "{lines:?}"
        );
        // Debian's 6.12: 0x1fe.
        let lines = describe(0x1fe);
        assert_eq!(lines.len(), 8);
        assert!(missing(0x1fe).is_empty());
    }

    #[test]
    fn quiesce_is_asked_for_only_where_the_kernel_offers_it() {
        assert_eq!(
            offered_in_use(0x1f_ffff),
            (sys::UBLK_F_QUIESCE | sys::UBLK_F_BATCH_IO) as u64
        );
        assert_eq!(offered_in_use(0x1fe), 0);
        assert_eq!(offered_in_use(0), 0);
    }

    #[test]
    fn a_kernel_without_recovery_is_named_for_what_it_lacks() {
        let m = missing(0x1fe & !(sys::UBLK_F_USER_RECOVERY_REISSUE as u64));
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].0, "USER_RECOVERY_REISSUE");
        assert_eq!(missing(0).len(), 3);
    }
}
