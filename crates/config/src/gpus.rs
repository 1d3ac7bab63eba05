//! Which GPUs a device asks for (`--gpu`, `gpu =` in the config): one, a
//! list, or all; and how a size asked over several GPUs is split between
//! them, one device per GPU.

use std::fmt;
use std::str::FromStr;

/// Indices as `--gpu` counts them (PCI bus order, as nvidia-smi).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GpuChoice {
    /// One device on this GPU (the default: GPU 0).
    One(u32),
    /// One device on each of these GPUs (no index twice).
    Some(Vec<u32>),
    /// One device on every GPU of the machine.
    All,
}

impl Default for GpuChoice {
    fn default() -> Self {
        GpuChoice::One(0)
    }
}

impl GpuChoice {
    /// The GPU of a one-GPU choice.
    pub fn single(&self) -> Option<u32> {
        match self {
            GpuChoice::One(g) => Some(*g),
            GpuChoice::Some(_) | GpuChoice::All => None,
        }
    }

    /// The GPUs this choice names on a machine with `count` of them, in
    /// index order; an index the machine lacks is an error.
    pub fn resolve(&self, count: u32) -> Result<Vec<u32>, String> {
        let wanted = match self {
            GpuChoice::One(g) => vec![*g],
            GpuChoice::Some(list) => {
                let mut l = list.clone();
                l.sort_unstable();
                l
            }
            GpuChoice::All => (0..count).collect(),
        };
        if wanted.is_empty() {
            return Err("this machine has no CUDA GPU".into());
        }
        if let Some(bad) = wanted.iter().find(|&&g| g >= count) {
            return Err(format!(
                "GPU {bad} does not exist: this machine has {count} CUDA GPU(s) (0-{})",
                count.saturating_sub(1)
            ));
        }
        Ok(wanted)
    }
}

impl FromStr for GpuChoice {
    type Err = String;

    /// "all", "N" or "N,M,...".
    fn from_str(s: &str) -> Result<GpuChoice, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("all") {
            return Ok(GpuChoice::All);
        }
        let mut list = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            let g: u32 = part.parse().map_err(|_| {
                format!("'{s}' is not a GPU choice: give an index (0), a list (0,2) or all")
            })?;
            if list.contains(&g) {
                return Err(format!("GPU {g} is named twice in '{s}'"));
            }
            list.push(g);
        }
        Ok(match list.as_slice() {
            [g] => GpuChoice::One(*g),
            _ => GpuChoice::Some(list),
        })
    }
}

impl fmt::Display for GpuChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuChoice::One(g) => write!(f, "{g}"),
            GpuChoice::Some(list) => {
                let names: Vec<String> = list.iter().map(u32::to_string).collect();
                f.write_str(&names.join(","))
            }
            GpuChoice::All => f.write_str("all"),
        }
    }
}

/// Where a device's GPU sits in the machine (daemon/src/locality.rs reads
/// it from sysfs); the device's processes run on `cpus` when named.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GpuPlace {
    /// "0000:41:00.0", as sysfs names the PCI device.
    pub pci_bus_id: String,
    /// Its memory node; None where the firmware names none or the machine
    /// has one node only.
    #[serde(default)]
    pub numa_node: Option<u32>,
    /// The CPUs of that node (a cpulist, "16-31,48-63"); None: unpinned.
    #[serde(default)]
    pub cpus: Option<String>,
}

impl GpuPlace {
    /// "PCI 0000:41:00.0, NUMA node 1, CPUs 16-31".
    pub fn describe(&self) -> String {
        let mut s = format!("PCI {}", self.pci_bus_id);
        if let Some(n) = self.numa_node {
            s.push_str(&format!(", NUMA node {n}"));
        }
        match &self.cpus {
            Some(c) => s.push_str(&format!(", CPUs {c}")),
            None => s.push_str(", no NUMA node: not pinned"),
        }
        s
    }
}

/// What one GPU can give: its index and the VRAM free beyond the reserve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuRoom {
    pub gpu: u32,
    pub room: u64,
}

/// Shares are whole multiples of this (the VRAM extent: a share that is
/// not one would strand part of an extent).
pub const SPLIT_UNIT: u64 = 2 << 20;

/// Splits `total` bytes over `gpus` in proportion to each one's room: (GPU,
/// bytes) for each GPU that gets a share, in the order given. Each share
/// is a multiple of [`SPLIT_UNIT`] except the largest, which takes what
/// rounding left over, so the shares add up to `total` exactly. A GPU with
/// no room gets nothing; no GPU with room is an error.
pub fn split_by_room(total: u64, gpus: &[GpuRoom]) -> Result<Vec<(u32, u64)>, String> {
    let weight: u128 = gpus.iter().map(|g| u128::from(g.room)).sum();
    if weight == 0 {
        return Err(if gpus.is_empty() {
            "no GPU to put the device on".into()
        } else {
            "no GPU has VRAM free beyond its reserve".into()
        });
    }
    let mut shares: Vec<(u32, u64)> = gpus
        .iter()
        .map(|g| {
            let exact = u128::from(total) * u128::from(g.room) / weight;
            (g.gpu, (exact as u64) / SPLIT_UNIT * SPLIT_UNIT)
        })
        .collect();
    let given: u64 = shares.iter().map(|s| s.1).sum();
    let roomiest = gpus
        .iter()
        .enumerate()
        .max_by_key(|(i, g)| (g.room, std::cmp::Reverse(*i)))
        .map(|(i, _)| i)
        .unwrap_or(0);
    shares[roomiest].1 += total - given;
    shares.retain(|s| s.1 > 0);
    Ok(shares)
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;
    const M: u64 = 1 << 20;

    fn room(gpu: u32, room: u64) -> GpuRoom {
        GpuRoom { gpu, room }
    }

    #[test]
    fn choices_parse_and_print_back() {
        for (text, want) in [
            ("all", GpuChoice::All),
            ("ALL", GpuChoice::All),
            ("1", GpuChoice::One(1)),
            (" 0 , 2 ", GpuChoice::Some(vec![0, 2])),
            ("3,1", GpuChoice::Some(vec![3, 1])),
        ] {
            let got: GpuChoice = text.parse().unwrap();
            assert_eq!(got, want, "{text:?}");
            assert_eq!(got.to_string().parse::<GpuChoice>().unwrap(), want);
        }
        for bad in ["", "-1", "one", "0,,1", "1,1", "0, 2, 0"] {
            assert!(bad.parse::<GpuChoice>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_choice_resolves_against_the_machine() {
        assert_eq!(GpuChoice::All.resolve(3).unwrap(), vec![0, 1, 2]);
        assert_eq!(GpuChoice::One(1).resolve(2).unwrap(), vec![1]);
        assert_eq!(GpuChoice::Some(vec![2, 0]).resolve(4).unwrap(), vec![0, 2]);
        let e = GpuChoice::Some(vec![0, 2]).resolve(2).unwrap_err();
        assert!(
            e.contains("GPU 2 does not exist") && e.contains("0-1"),
            "{e}"
        );
        assert!(GpuChoice::All
            .resolve(0)
            .unwrap_err()
            .contains("no CUDA GPU"));
    }

    #[test]
    fn a_split_follows_the_room_and_adds_up_exactly() {
        // 3:1 room: 12 GiB as 9 + 3.
        let s = split_by_room(12 * G, &[room(0, 30 * G), room(1, 10 * G)]).unwrap();
        assert_eq!(s, vec![(0, 9 * G), (1, 3 * G)]);
        // Equal room, an odd total: the first of the roomiest takes the
        // rounding, every other share stays a whole number of units.
        let total = 7 * G + 4096;
        let s = split_by_room(total, &[room(0, G), room(1, G), room(2, G)]).unwrap();
        assert_eq!(s.iter().map(|x| x.1).sum::<u64>(), total);
        assert!(s[1].1.is_multiple_of(SPLIT_UNIT) && s[2].1.is_multiple_of(SPLIT_UNIT));
        assert!(s[0].1 >= s[1].1 && s[0].1 - s[1].1 < SPLIT_UNIT * 3);
    }

    #[test]
    fn gpus_without_room_get_nothing() {
        let s = split_by_room(4 * G, &[room(0, 0), room(1, 8 * G), room(2, 0)]).unwrap();
        assert_eq!(s, vec![(1, 4 * G)]);
        // A share that rounds to nothing is left out, its part goes on.
        let s = split_by_room(4 * M, &[room(0, 100 * G), room(1, G)]).unwrap();
        assert_eq!(s, vec![(0, 4 * M)]);
        assert!(split_by_room(G, &[room(0, 0)])
            .unwrap_err()
            .contains("beyond its reserve"));
        assert!(split_by_room(G, &[]).is_err());
    }

    #[test]
    fn shares_never_overflow_on_large_sizes() {
        let s = split_by_room(
            u64::MAX / 2 / 4096 * 4096,
            &[room(0, u64::MAX), room(1, u64::MAX)],
        )
        .unwrap();
        assert_eq!(
            s.iter().map(|x| u128::from(x.1)).sum::<u128>(),
            u128::from(u64::MAX / 2 / 4096 * 4096)
        );
    }
}
