//! The configuration file, /etc/vramblk.toml: one `[[device]]` table per
//! device, plus `[power]` and `[pressure]`. Unknown keys and bad values are
//! rejected with the file, the line and one sentence.

use crate::gpus::{split_by_room, GpuChoice, GpuRoom};
use crate::{defaults, parse_size, parse_size_or_zero, Backend};
use serde::Deserialize;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::Spanned;

pub const CONFIG_PATH: &str = "/etc/vramblk.toml";

fn discard_by_default() -> bool {
    true
}

/// How a device moves data (issue 3): `auto` batches small pages through a
/// kernel on the GPU's SMs, `dma` uses the copy engines only (for GPUs busy
/// with other work).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyMode {
    #[default]
    Auto,
    Dma,
}

/// Which commands a device's queues take requests from the kernel with
/// (issue 16): `auto` batches each round into one command each way where
/// the kernel offers it (UBLK_F_BATCH_IO, Linux 7.0+), `per-tag` uses one
/// command per request everywhere.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoCommands {
    #[default]
    Auto,
    PerTag,
}

/// How a cuda device keeps its pages (issue 18): `off` whole, `same`
/// same-filled pages as their word alone (no VRAM), `lz` same-filled
/// pages so and the rest as LZ4 blocks compressed on the GPU where they
/// shrink; a compressed device may be larger than the VRAM it holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compress {
    #[default]
    Off,
    Same,
    Lz,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    device: Vec<RawDevice>,
    #[serde(default)]
    power: PowerConfig,
    #[serde(default)]
    pressure: RawPressure,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    size: Spanned<String>,
    #[serde(default)]
    backend: Option<Backend>,
    #[serde(default)]
    gpu: Option<Spanned<RawGpu>>,
    #[serde(default)]
    priority: Option<Spanned<i32>>,
    /// On unless turned off: freed swap is discarded, which lets a cuda
    /// device give its VRAM back (release --to, the pressure policy).
    #[serde(default = "discard_by_default")]
    discard: bool,
    #[serde(default)]
    reserve: Option<Spanned<String>>,
    #[serde(default)]
    copy_mode: CopyMode,
    #[serde(default)]
    io_commands: IoCommands,
    #[serde(default)]
    compress: Option<Spanned<Compress>>,
    /// Every page in VRAM carries a checksum; absent: where the GPU's
    /// memory has no ECC.
    #[serde(default)]
    integrity: Option<bool>,
    #[serde(default)]
    queues: Option<Spanned<u16>>,
    #[serde(default)]
    depth: Option<Spanned<u16>>,
    #[serde(default)]
    hugepages: bool,
}

/// `gpu = 1`, or `gpu = "all"` / `gpu = "0,2"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawGpu {
    Index(u32),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPressure {
    #[serde(default)]
    enabled: bool,
    #[serde(default)]
    min_free_vram: Option<Spanned<String>>,
    #[serde(default)]
    calm_secs: Option<u64>,
}

/// One configured device, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Which `[[device]]` of the file (0-based) this is, or came from
    /// ([`Config::per_gpu`] makes one device per GPU of an entry).
    pub entry: usize,
    /// Bytes; over several GPUs, the sum of their devices.
    pub size: u64,
    pub backend: Backend,
    pub gpu: GpuChoice,
    pub priority: i32,
    pub discard: bool,
    pub reserve: u64,
    pub copy_mode: CopyMode,
    pub io_commands: IoCommands,
    /// How pages are kept in VRAM (cuda).
    pub compress: Compress,
    /// Per-page checksums in VRAM, checked on every read (cuda); None:
    /// where the GPU's memory has no ECC.
    pub integrity: Option<bool>,
    pub queues: Option<u16>,
    pub depth: u16,
    pub hugepages: bool,
}

/// `[power]`: take the devices down on battery (or under a charge level)
/// and bring them back on AC.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerConfig {
    #[serde(default)]
    pub enabled: bool,
    /// Down below this battery percentage even on AC (none: AC decides).
    #[serde(default)]
    pub min_battery_percent: Option<u8>,
    /// How often to look at /sys/class/power_supply besides udev events.
    #[serde(default = "default_poll_secs")]
    pub poll_secs: u64,
}

impl Default for PowerConfig {
    fn default() -> Self {
        PowerConfig {
            enabled: false,
            min_battery_percent: None,
            poll_secs: default_poll_secs(),
        }
    }
}

fn default_poll_secs() -> u64 {
    60
}

/// `[pressure]`: give VRAM back when free VRAM falls under a threshold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PressureConfig {
    pub enabled: bool,
    pub min_free_vram: u64,
    /// How long free VRAM must stay above the threshold before the
    /// devices come back.
    pub calm_secs: u64,
}

/// The whole file, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub devices: Vec<DeviceConfig>,
    pub power: PowerConfig,
    pub pressure: PressureConfig,
}

/// "PATH:LINE: sentence".
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_path_buf(),
            line: None,
            message: format!("cannot read it: {e}"),
        })?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let fail = |span: Option<Range<usize>>, message: String| ConfigError {
            path: path.to_path_buf(),
            line: span.map(|s| line_of(text, s.start)),
            message,
        };
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let msg = e.message().trim_end_matches('.').to_string();
            fail(e.span(), msg)
        })?;
        let mut devices = Vec::new();
        for (entry, d) in raw.device.into_iter().enumerate() {
            let size = parse_size(d.size.get_ref())
                .map_err(|e| fail(Some(d.size.span()), format!("size: {e}")))?;
            if size % 4096 != 0 {
                return Err(fail(
                    Some(d.size.span()),
                    format!("size: {size} bytes is not a multiple of 4 KiB"),
                ));
            }
            let reserve = match &d.reserve {
                Some(r) => parse_size_or_zero(r.get_ref())
                    .map_err(|e| fail(Some(r.span()), format!("reserve: {e}")))?,
                None => 512 << 20,
            };
            let priority = match &d.priority {
                Some(p) if !(-1..=32767).contains(p.get_ref()) => {
                    return Err(fail(
                        Some(p.span()),
                        format!(
                            "priority must be between -1 and 32767 (got {})",
                            p.get_ref()
                        ),
                    ))
                }
                Some(p) => *p.get_ref(),
                None => defaults::SWAP_PRIORITY,
            };
            if let Some(q) = &d.queues {
                if *q.get_ref() == 0 {
                    return Err(fail(Some(q.span()), "queues must be at least 1".into()));
                }
            }
            let depth = match &d.depth {
                Some(x) if !(1..=4096).contains(x.get_ref()) => {
                    return Err(fail(
                        Some(x.span()),
                        format!("depth must be between 1 and 4096 (got {})", x.get_ref()),
                    ))
                }
                Some(x) => *x.get_ref(),
                None => defaults::QUEUE_DEPTH,
            };
            let backend = d.backend.unwrap_or(Backend::Cuda);
            if d.hugepages && backend != Backend::Host {
                return Err(fail(
                    Some(d.size.span()),
                    "hugepages applies to backend = \"host\" only".into(),
                ));
            }
            let gpu = match &d.gpu {
                None => GpuChoice::default(),
                Some(g) => match g.get_ref() {
                    RawGpu::Index(i) => GpuChoice::One(*i),
                    RawGpu::Text(t) => t
                        .parse()
                        .map_err(|e| fail(Some(g.span()), format!("gpu: {e}")))?,
                },
            };
            let compress = match d.compress {
                Some(c) if backend != Backend::Cuda && *c.get_ref() != Compress::Off => {
                    return Err(fail(
                        Some(c.span()),
                        "compress applies to backend = \"cuda\" only (the host store keeps pages whole)".into(),
                    ));
                }
                Some(c) => c.into_inner(),
                None => Compress::Off,
            };
            if gpu.single().is_none() && backend != Backend::Cuda {
                return Err(fail(
                    d.gpu.as_ref().map(|g| g.span()),
                    format!("gpu = \"{gpu}\" applies to backend = \"cuda\" only"),
                ));
            }
            devices.push(DeviceConfig {
                entry,
                size,
                backend,
                gpu,
                priority,
                discard: d.discard,
                reserve,
                copy_mode: d.copy_mode,
                io_commands: d.io_commands,
                compress,
                integrity: d.integrity,
                queues: d.queues.map(|q| q.into_inner()),
                depth,
                hugepages: d.hugepages,
            });
        }
        if let Some(p) = raw.power.min_battery_percent {
            if p > 100 {
                return Err(fail(
                    None,
                    format!("[power] min_battery_percent must be 0-100 (got {p})"),
                ));
            }
        }
        let min_free_vram = match &raw.pressure.min_free_vram {
            Some(v) => parse_size(v.get_ref())
                .map_err(|e| fail(Some(v.span()), format!("min_free_vram: {e}")))?,
            None => 1 << 30,
        };
        Ok(Config {
            devices,
            power: raw.power,
            pressure: PressureConfig {
                enabled: raw.pressure.enabled,
                min_free_vram,
                calm_secs: raw.pressure.calm_secs.unwrap_or(120),
            },
        })
    }
}

impl Config {
    /// The devices to bring up: each entry on one GPU as it is, each entry
    /// over several GPUs as one device per GPU (same settings, its `entry`
    /// kept), the size split by each GPU's VRAM free beyond the entry's
    /// reserve. `count` is the machine's number of GPUs, `free` a GPU's
    /// free VRAM (None: unknown, and then the split is even). Entries keep
    /// their order, and an entry's devices follow GPU order, so the same
    /// file on the same machine numbers its devices the same way.
    pub fn per_gpu(
        &self,
        count: u32,
        free: &dyn Fn(u32) -> Option<u64>,
    ) -> Result<Vec<DeviceConfig>, String> {
        let mut out = Vec::new();
        for d in &self.devices {
            if d.gpu.single().is_some() {
                out.push(d.clone());
                continue;
            }
            let gpus = d
                .gpu
                .resolve(count)
                .map_err(|e| format!("device {}: gpu = \"{}\": {e}", d.entry, d.gpu))?;
            let known: Option<Vec<u64>> = gpus.iter().map(|&g| free(g)).collect();
            let rooms: Vec<GpuRoom> = gpus
                .iter()
                .enumerate()
                .map(|(i, &gpu)| GpuRoom {
                    gpu,
                    room: known.as_ref().map_or(1, |f| f[i].saturating_sub(d.reserve)),
                })
                .collect();
            let shares =
                split_by_room(d.size, &rooms).map_err(|e| format!("device {}: {e}", d.entry))?;
            for (gpu, size) in shares {
                out.push(DeviceConfig {
                    gpu: GpuChoice::One(gpu),
                    size,
                    ..d.clone()
                });
            }
        }
        Ok(out)
    }
}

/// 1-based line of byte offset `at`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("/etc/vramblk.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_full_file_parses_with_defaults_filled_in() {
        let c = parse(
            r#"
[[device]]
size = "7G"

[[device]]
size = "1G"
backend = "host"
hugepages = true
priority = 50
queues = 2
depth = 64
copy_mode = "dma"
io_commands = "per-tag"
reserve = "1G"
discard = true
integrity = false

[power]
enabled = true
min_battery_percent = 30

[pressure]
enabled = true
min_free_vram = "2G"
calm_secs = 60
"#,
        )
        .unwrap();
        assert_eq!(c.devices.len(), 2);
        let d = &c.devices[0];
        assert_eq!(
            (d.size, d.backend, d.gpu.single(), d.priority),
            (7 << 30, Backend::Cuda, Some(0), 1000)
        );
        assert_eq!(
            (d.reserve, d.depth, d.queues, d.copy_mode),
            (512 << 20, 64, None, CopyMode::Auto)
        );
        assert!(d.discard, "discard is on unless turned off");
        assert_eq!(d.integrity, None, "integrity: auto unless set");
        assert_eq!(c.devices[1].integrity, Some(false));
        let h = &c.devices[1];
        assert_eq!(
            (h.backend, h.hugepages, h.priority, h.queues, h.depth),
            (Backend::Host, true, 50, Some(2), 64)
        );
        assert_eq!(
            (h.copy_mode, h.reserve, h.discard),
            (CopyMode::Dma, 1 << 30, true)
        );
        assert_eq!(
            (d.io_commands, h.io_commands),
            (IoCommands::Auto, IoCommands::PerTag)
        );
        assert_eq!(
            c.power,
            PowerConfig {
                enabled: true,
                min_battery_percent: Some(30),
                poll_secs: 60
            }
        );
        assert_eq!(
            c.pressure,
            PressureConfig {
                enabled: true,
                min_free_vram: 2 << 30,
                calm_secs: 60
            }
        );
    }

    #[test]
    fn an_empty_file_is_no_devices() {
        let c = parse("").unwrap();
        assert!(c.devices.is_empty());
        assert!(!c.power.enabled && !c.pressure.enabled);
    }

    #[test]
    fn bad_files_are_refused_with_the_line_and_a_sentence() {
        let cases: &[(&str, &str)] = &[
            (
                "[[device]]\nsize = \"7G\"\nsizee = 1\n",
                "/etc/vramblk.toml:3: unknown field `sizee`",
            ),
            (
                "[[device]]\nsize = \"seven\"\n",
                "/etc/vramblk.toml:2: size: 'seven' is not a size",
            ),
            (
                "[[device]]\nsize = \"1000\"\n",
                "/etc/vramblk.toml:2: size: 1000 bytes is not a multiple of 4 KiB",
            ),
            (
                "[[device]]\ngpu = 1\n",
                "/etc/vramblk.toml:1: missing field `size`",
            ),
            (
                "[[device]]\nsize = \"1G\"\nbackend = \"ram\"\n",
                "/etc/vramblk.toml:3: unknown variant `ram`",
            ),
            (
                "[[device]]\nsize = \"1G\"\npriority = 40000\n",
                "/etc/vramblk.toml:3: priority must be between -1 and 32767 (got 40000)",
            ),
            (
                "[[device]]\nsize = \"1G\"\ndepth = 0\n",
                "/etc/vramblk.toml:3: depth must be between 1 and 4096 (got 0)",
            ),
            (
                "[[device]]\nsize = \"1G\"\nqueues = 0\n",
                "/etc/vramblk.toml:3: queues must be at least 1",
            ),
            (
                "[[device]]\nsize = \"1G\"\nhugepages = true\n",
                "hugepages applies to backend = \"host\" only",
            ),
            (
                "[[device]]\nsize = \"1G\"\ncopy_mode = \"fast\"\n",
                "/etc/vramblk.toml:3: unknown variant `fast`",
            ),
            (
                "[power]\nmin_battery_percent = 120\n",
                "[power] min_battery_percent must be 0-100 (got 120)",
            ),
            (
                "[pressure]\nmin_free_vram = \"lots\"\n",
                "/etc/vramblk.toml:2: min_free_vram: 'lots' is not a size",
            ),
            (
                "[[device]]\nsize = \"1G\"\ngpu = \"most\"\n",
                "/etc/vramblk.toml:3: gpu: 'most' is not a GPU choice",
            ),
            (
                "[[device]]\nsize = \"1G\"\ngpu = \"0,0\"\n",
                "/etc/vramblk.toml:3: gpu: GPU 0 is named twice",
            ),
            (
                "[[device]]\nsize = \"1G\"\nbackend = \"host\"\ngpu = \"all\"\n",
                "/etc/vramblk.toml:4: gpu = \"all\" applies to backend = \"cuda\" only",
            ),
            (
                "[colour]\nx = 1\n",
                "/etc/vramblk.toml:1: unknown field `colour`",
            ),
            ("[[device]\n", "/etc/vramblk.toml:1:"),
        ];
        for (text, want) in cases {
            let got = parse(text).expect_err(text);
            assert!(
                got.contains(want),
                "input {text:?}: got {got:?}, want {want:?}"
            );
        }
    }

    #[test]
    fn gpu_takes_an_index_a_list_or_all() {
        let c = parse(
            "[[device]]\nsize = \"1G\"\ngpu = 2\n[[device]]\nsize = \"1G\"\ngpu = \"all\"\n\
             [[device]]\nsize = \"1G\"\ngpu = \"0,3\"\n[[device]]\nsize = \"1G\"\ngpu = \"1\"\n",
        )
        .unwrap();
        let gpus: Vec<GpuChoice> = c.devices.iter().map(|d| d.gpu.clone()).collect();
        assert_eq!(
            gpus,
            vec![
                GpuChoice::One(2),
                GpuChoice::All,
                GpuChoice::Some(vec![0, 3]),
                GpuChoice::One(1)
            ]
        );
        assert_eq!(
            c.devices.iter().map(|d| d.entry).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
    }

    #[test]
    fn per_gpu_makes_one_device_per_gpu_split_by_free_vram() {
        let c = parse(
            "[[device]]\nsize = \"1G\"\nbackend = \"host\"\n\
             [[device]]\nsize = \"12G\"\ngpu = \"all\"\nreserve = \"1G\"\npriority = 7\n\
             [[device]]\nsize = \"2G\"\ngpu = 1\n",
        )
        .unwrap();
        // GPU 0 has 31 GiB free, GPU 1 11 GiB, GPU 2 1 GiB: beyond the
        // 1 GiB reserve 30, 10 and 0.
        let free = |g: u32| Some([31u64 << 30, 11 << 30, 1 << 30][g as usize]);
        let d = c.per_gpu(3, &free).unwrap();
        let shape: Vec<(usize, Option<u32>, u64, i32)> = d
            .iter()
            .map(|d| (d.entry, d.gpu.single(), d.size, d.priority))
            .collect();
        assert_eq!(
            shape,
            vec![
                (0, Some(0), 1 << 30, 1000),
                (1, Some(0), 9 << 30, 7),
                (1, Some(1), 3 << 30, 7),
                (2, Some(1), 2 << 30, 1000),
            ]
        );
        // Free VRAM unknown: an even split.
        let d = c.per_gpu(2, &|_| None).unwrap();
        assert_eq!((d[1].size, d[2].size), (6 << 30, 6 << 30));
        // A machine without GPUs, or none with room, says which entry.
        let e = c.per_gpu(0, &free).unwrap_err();
        assert!(
            e.starts_with("device 1: gpu = \"all\"") && e.contains("no CUDA GPU"),
            "{e}"
        );
        let e = c.per_gpu(3, &|_| Some(1 << 30)).unwrap_err();
        assert!(
            e.contains("device 1") && e.contains("beyond its reserve"),
            "{e}"
        );
    }

    #[test]
    fn the_shipped_default_file_parses() {
        let text = include_str!("../../../systemd/vramblk.toml");
        let c = parse(text).unwrap();
        assert!(!c.power.enabled && !c.pressure.enabled);
    }
}
