//! Where a GPU sits: the memory node and the CPUs nearest it, as sysfs
//! says for its PCI device, and pinning a device's processes there. The
//! supervisor pins itself before it allocates the io buffers, so they are
//! placed on that node (first touch) and every server it forks, with its
//! queue threads, runs on those CPUs: a request then crosses no socket
//! between the io buffer, the queue thread and the GPU.

use anyhow::{bail, Context, Result};
use std::path::Path;
use vramblk_config::GpuPlace;

/// What sysfs (mounted at `sysfs`) says of the GPU at PCI address
/// `pci_bus_id` ("0000:41:00.0"). Pinning means something only where there
/// are several memory nodes, so on a one-node machine no node is named.
pub fn place_of(sysfs: &Path, pci_bus_id: &str) -> GpuPlace {
    let pci_bus_id = pci_bus_id.to_lowercase();
    let unplaced = GpuPlace {
        pci_bus_id: pci_bus_id.clone(),
        ..GpuPlace::default()
    };
    if node_count(sysfs) < 2 {
        return unplaced;
    }
    let dev = sysfs.join("bus/pci/devices").join(&pci_bus_id);
    let read = |name: &str| {
        std::fs::read_to_string(dev.join(name))
            .ok()
            .map(|t| t.trim().to_string())
    };
    let Some(numa_node) = read("numa_node").and_then(|n| n.parse::<u32>().ok()) else {
        return unplaced;
    };
    let cpus = read("local_cpulist").filter(|l| parse_cpulist(l).is_ok_and(|c| !c.is_empty()));
    GpuPlace {
        pci_bus_id,
        numa_node: Some(numa_node),
        cpus,
    }
}

/// How many CPUs a device placed at `place` runs on, when it is pinned:
/// its default queue count then (one queue thread per CPU it may use,
/// not per CPU of the machine, or the threads would crowd those CPUs).
pub fn pinned_cpu_count(place: &GpuPlace) -> Option<u16> {
    let cpus = parse_cpulist(place.cpus.as_deref()?).ok()?;
    u16::try_from(cpus.len()).ok().filter(|&n| n > 0)
}

/// Online memory nodes (1 where sysfs says nothing).
fn node_count(sysfs: &Path) -> usize {
    std::fs::read_to_string(sysfs.join("devices/system/node/online"))
        .ok()
        .and_then(|l| parse_cpulist(l.trim()).ok())
        .map_or(1, |nodes| nodes.len().max(1))
}

/// "0-3,8,10-11" as [0, 1, 2, 3, 8, 10, 11] (the kernel's list format,
/// also used for nodes).
pub fn parse_cpulist(list: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("'{list}' is not a CPU list");
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let a: usize = a.parse().map_err(|_| bad())?;
        let b: usize = b.parse().map_err(|_| bad())?;
        if b < a || b >= 1 << 16 {
            return Err(bad());
        }
        out.extend(a..=b);
    }
    Ok(out)
}

/// Runs this process (and whatever it forks or starts later) on `cpus`.
pub fn pin_to(cpus: &str) -> Result<()> {
    let list = parse_cpulist(cpus).map_err(anyhow::Error::msg)?;
    let mut set = rustix::thread::CpuSet::new();
    for &c in &list {
        if c >= rustix::thread::CpuSet::MAX_CPU {
            bail!("CPU {c} is beyond what the affinity mask holds");
        }
        set.set(c);
    }
    rustix::thread::sched_setaffinity(None, &set).with_context(|| format!("pinning to CPUs {cpus}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpulists_parse_as_the_kernel_writes_them() {
        assert_eq!(
            parse_cpulist("0-3,8,10-11").unwrap(),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_cpulist("5").unwrap(), vec![5]);
        assert_eq!(parse_cpulist("").unwrap(), Vec::<usize>::new());
        for bad in ["3-1", "a", "1-", "0-99999"] {
            assert!(parse_cpulist(bad).is_err(), "{bad:?}");
        }
    }

    /// A directory removed when dropped.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A sysfs tree with `nodes` online and one GPU at 0000:41:00.0.
    fn fake_sysfs(nodes: &str, numa_node: &str, cpus: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let t = TempDir(std::env::temp_dir().join(format!(
            "vramblk-locality-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        )));
        let node = t.path().join("devices/system/node");
        std::fs::create_dir_all(&node).unwrap();
        std::fs::write(node.join("online"), format!("{nodes}\n")).unwrap();
        let dev = t.path().join("bus/pci/devices/0000:41:00.0");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("numa_node"), format!("{numa_node}\n")).unwrap();
        std::fs::write(dev.join("local_cpulist"), format!("{cpus}\n")).unwrap();
        t
    }

    #[test]
    fn a_gpu_on_a_two_node_machine_names_its_node_and_cpus() {
        let t = fake_sysfs("0-1", "1", "16-31,48-63");
        let p = place_of(t.path(), "0000:41:00.0");
        assert_eq!(p.numa_node, Some(1));
        assert_eq!(p.cpus.as_deref(), Some("16-31,48-63"));
        assert_eq!(
            p.describe(),
            "PCI 0000:41:00.0, NUMA node 1, CPUs 16-31,48-63"
        );
        // NVML's upper-case form finds the same device.
        assert_eq!(
            place_of(t.path(), "0000:41:00.0".to_uppercase().as_str()),
            p
        );
    }

    #[test]
    fn one_node_no_node_or_no_device_pins_nothing() {
        let unplaced = |id: &str| GpuPlace {
            pci_bus_id: id.into(),
            ..GpuPlace::default()
        };
        let one = fake_sysfs("0", "0", "0-7");
        assert_eq!(
            place_of(one.path(), "0000:41:00.0"),
            unplaced("0000:41:00.0")
        );
        let unnamed = fake_sysfs("0-1", "-1", "0-7");
        assert_eq!(
            place_of(unnamed.path(), "0000:41:00.0"),
            unplaced("0000:41:00.0")
        );
        let two = fake_sysfs("0-1", "0", "0-7");
        assert_eq!(
            place_of(two.path(), "0000:c1:00.0"),
            unplaced("0000:c1:00.0")
        );
        assert_eq!(
            unplaced("0000:c1:00.0").describe(),
            "PCI 0000:c1:00.0, no NUMA node: not pinned"
        );
    }

    #[test]
    fn a_pinned_device_counts_its_node_cpus() {
        let t = fake_sysfs("0-1", "1", "16-31,48-63");
        assert_eq!(
            pinned_cpu_count(&place_of(t.path(), "0000:41:00.0")),
            Some(32)
        );
        let one = fake_sysfs("0", "0", "0-7");
        assert_eq!(
            pinned_cpu_count(&place_of(one.path(), "0000:41:00.0")),
            None
        );
    }

    #[test]
    fn pinning_to_the_cpus_this_thread_may_use_works() {
        // This thread's own affinity, pinned to again: changes nothing,
        // and must succeed.
        let set = rustix::thread::sched_getaffinity(None).unwrap();
        let cpus: Vec<String> = (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|&c| set.is_set(c))
            .map(|c| c.to_string())
            .collect();
        pin_to(&cpus.join(",")).unwrap();
        assert!(pin_to("0-3,x").is_err());
    }
}
