//! Power: take the devices down on battery (or under a charge level) and
//! bring them back on AC. Read from /sys/class/power_supply, through a root
//! that tests point at a fake tree.

use std::path::Path;
use vramblk_config::PowerConfig;

/// Charge points above the threshold before the devices come back, so a
/// battery hovering at the threshold does not flap them.
pub const HYSTERESIS_PERCENT: u8 = 5;

/// What the power supplies say now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PowerReading {
    /// A mains or USB supply is online, or there is no battery at all (a
    /// desktop).
    pub on_ac: bool,
    /// The lowest charge of the system batteries, when there are any.
    pub battery_percent: Option<u8>,
}

impl PowerReading {
    /// Reads `<sys>/class/power_supply/*` (sys is /sys on a real system).
    /// Unreadable entries are skipped; a machine with no supply entries
    /// reads as on AC.
    pub fn read(sys: &Path) -> PowerReading {
        let dir = sys.join("class/power_supply");
        let mut ac_online = false;
        let mut percent: Option<u8> = None;
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = entry.path();
            let read = |name: &str| {
                std::fs::read_to_string(p.join(name))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default()
            };
            match read("type").as_str() {
                "Mains" | "USB" => ac_online |= read("online") == "1",
                // Peripheral batteries (mice, headsets) say scope=Device.
                "Battery" if read("scope") != "Device" => {
                    if let Ok(c) = read("capacity").parse::<u8>() {
                        percent = Some(percent.map_or(c, |p| p.min(c)));
                    }
                }
                _ => {}
            }
        }
        PowerReading {
            on_ac: ac_online || percent.is_none(),
            battery_percent: percent,
        }
    }
}

/// Decides up or down from readings, remembering the last decision for
/// the charge hysteresis.
#[derive(Clone, Debug)]
pub struct PowerGate {
    config: PowerConfig,
    up: bool,
}

impl PowerGate {
    pub fn new(config: PowerConfig) -> PowerGate {
        PowerGate { config, up: true }
    }

    /// Whether the devices may be up under this reading. Always true when
    /// the power policy is off.
    pub fn allows(&mut self, r: &PowerReading) -> bool {
        if !self.config.enabled {
            self.up = true;
            return true;
        }
        let low = match (self.config.min_battery_percent, r.battery_percent) {
            (Some(min), Some(pct)) => {
                let bar = if self.up {
                    min
                } else {
                    min.saturating_add(HYSTERESIS_PERCENT)
                };
                pct < bar
            }
            _ => false,
        };
        self.up = r.on_ac && !low;
        self.up
    }
}

impl PowerReading {
    /// The reading in words (for logs and status).
    pub fn describe(&self) -> String {
        match (self.on_ac, self.battery_percent) {
            (true, None) => "on AC (no battery)".into(),
            (true, Some(p)) => format!("on AC, battery {p}%"),
            (false, Some(p)) => format!("on battery, {p}%"),
            (false, None) => "on battery".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    struct FakeSys(PathBuf);

    impl FakeSys {
        fn new(name: &str) -> FakeSys {
            let root =
                std::env::temp_dir().join(format!("vramblk-power-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(root.join("class/power_supply")).unwrap();
            FakeSys(root)
        }

        fn supply(&self, name: &str, files: &[(&str, &str)]) -> &FakeSys {
            let d = self.0.join("class/power_supply").join(name);
            std::fs::create_dir_all(&d).unwrap();
            for (f, v) in files {
                std::fs::write(d.join(f), format!("{v}\n")).unwrap();
            }
            self
        }
    }

    impl Drop for FakeSys {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn reads_laptops_desktops_and_peripherals() {
        let laptop = FakeSys::new("laptop");
        laptop
            .supply("AC", &[("type", "Mains"), ("online", "0")])
            .supply("BAT0", &[("type", "Battery"), ("capacity", "57")])
            .supply(
                "hidpp_battery_0",
                &[("type", "Battery"), ("scope", "Device"), ("capacity", "5")],
            );
        assert_eq!(
            PowerReading::read(&laptop.0),
            PowerReading {
                on_ac: false,
                battery_percent: Some(57)
            }
        );
        laptop.supply("AC", &[("online", "1")]);
        assert!(PowerReading::read(&laptop.0).on_ac);

        let desktop = FakeSys::new("desktop");
        assert_eq!(
            PowerReading::read(&desktop.0),
            PowerReading {
                on_ac: true,
                battery_percent: None
            }
        );
        assert!(PowerReading::read(Path::new("/nonexistent")).on_ac);
    }

    #[test]
    fn battery_takes_devices_down_and_ac_brings_them_back() {
        let cfg = PowerConfig {
            enabled: true,
            min_battery_percent: None,
            poll_secs: 60,
        };
        let mut g = PowerGate::new(cfg);
        let ac = PowerReading {
            on_ac: true,
            battery_percent: Some(80),
        };
        let bat = PowerReading {
            on_ac: false,
            battery_percent: Some(80),
        };
        assert!(g.allows(&ac));
        assert!(!g.allows(&bat));
        assert!(g.allows(&ac));
        // Off: always up.
        let mut off = PowerGate::new(PowerConfig::default());
        assert!(off.allows(&bat));
    }

    #[test]
    fn charge_threshold_has_hysteresis() {
        let mut g = PowerGate::new(PowerConfig {
            enabled: true,
            min_battery_percent: Some(30),
            poll_secs: 60,
        });
        let at = |pct| PowerReading {
            on_ac: true,
            battery_percent: Some(pct),
        };
        assert!(g.allows(&at(30)));
        assert!(!g.allows(&at(29)));
        // Back only at 30 + 5.
        assert!(!g.allows(&at(31)));
        assert!(!g.allows(&at(34)));
        assert!(g.allows(&at(35)));
        assert!(g.allows(&at(31)));
    }
}
