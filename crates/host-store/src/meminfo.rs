/// The few /proc/meminfo fields the host store sizes itself against.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemInfo {
    pub mem_total: u64,
    pub mem_available: u64,
    pub huge_pages_free: u64,
    pub huge_page_size: u64,
}

impl MemInfo {
    pub fn read() -> std::io::Result<MemInfo> {
        Ok(Self::parse(&std::fs::read_to_string("/proc/meminfo")?))
    }

    /// Parses /proc/meminfo text; missing fields read as 0.
    pub fn parse(text: &str) -> MemInfo {
        let mut m = MemInfo::default();
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Ok(value) = value.parse::<u64>() else {
                continue;
            };
            let kib = parts.next() == Some("kB");
            let bytes = if kib { value * 1024 } else { value };
            match key {
                "MemTotal:" => m.mem_total = bytes,
                "MemAvailable:" => m.mem_available = bytes,
                "HugePages_Free:" => m.huge_pages_free = value,
                "Hugepagesize:" => m.huge_page_size = bytes,
                _ => {}
            }
        }
        m
    }

    /// RAM that must stay available for the rest of the machine, after a
    /// device locked its memory or a swapoff took its pages back: 64 MiB
    /// plus 2% of RAM. Below that, reclaim stalls the machine (and with
    /// the device's processes exempt from the OOM killer, the kernel can
    /// panic "deadlocked on memory").
    pub fn margin(&self) -> u64 {
        (64 << 20) + self.mem_total / 50
    }

    /// Bytes of free huge pages.
    pub fn huge_bytes_free(&self) -> u64 {
        self.huge_pages_free * self.huge_page_size
    }
}
