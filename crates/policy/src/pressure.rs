//! VRAM pressure: when free VRAM on a GPU falls under the threshold because
//! another program wants it, give the devices' VRAM back: first the part
//! that holds no data (the devices stay up), then, if that was not enough,
//! the whole devices; take it back once there is room for it again and
//! that has held for a while.

use std::time::{Duration, Instant};
use vramblk_config::PressureConfig;

/// What the service should do now for one GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PressureAction {
    Nothing,
    /// Free VRAM is under the threshold: the devices give back the VRAM
    /// that holds no data, and stay up.
    Trim,
    /// Still under the threshold with nothing unused left: release this
    /// GPU's devices (swap off, remove).
    Release,
    /// Room again for `calm` long after a trim: the devices take their
    /// VRAM back.
    TakeBack,
    /// Room again for `calm` long after a release: bring the devices back.
    Restore,
}

/// Free VRAM on the GPU, and what its devices could give or would take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VramReading {
    /// Bytes free on the GPU.
    pub free: u64,
    /// Bytes the devices hold without data, in whole release steps: what
    /// a trim would give back.
    pub unused: u64,
    /// Bytes taking back (after a trim) or restoring (after a release)
    /// would take.
    pub to_take: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Holding,
    /// Unused VRAM given back; `calm_since` is when free VRAM last rose
    /// to room for taking it back.
    Trimmed {
        calm_since: Option<Instant>,
    },
    /// Devices released.
    Released {
        calm_since: Option<Instant>,
    },
}

/// One GPU's pressure state.
#[derive(Clone, Debug)]
pub struct PressureGate {
    config: PressureConfig,
    state: State,
}

impl PressureGate {
    pub fn new(config: PressureConfig) -> PressureGate {
        PressureGate {
            config,
            state: State::Holding,
        }
    }

    pub fn released(&self) -> bool {
        matches!(self.state, State::Released { .. })
    }

    /// Feeds one reading. Coming back needs `free - to_take` to stay at
    /// or above the threshold for `calm_secs`, so taking back never itself
    /// causes pressure.
    pub fn step(&mut self, r: VramReading, now: Instant) -> PressureAction {
        if !self.config.enabled {
            return PressureAction::Nothing;
        }
        let min = self.config.min_free_vram;
        match self.state {
            State::Holding | State::Trimmed { .. } if r.free < min => {
                if r.unused > 0 {
                    self.state = State::Trimmed { calm_since: None };
                    PressureAction::Trim
                } else {
                    self.state = State::Released { calm_since: None };
                    PressureAction::Release
                }
            }
            State::Holding => PressureAction::Nothing,
            State::Trimmed { calm_since } => match self.calm(calm_since, r, now) {
                Some(since) => {
                    self.state = State::Trimmed { calm_since: since };
                    PressureAction::Nothing
                }
                None => {
                    self.state = State::Holding;
                    PressureAction::TakeBack
                }
            },
            State::Released { calm_since } => match self.calm(calm_since, r, now) {
                Some(since) => {
                    self.state = State::Released { calm_since: since };
                    PressureAction::Nothing
                }
                None => {
                    self.state = State::Holding;
                    PressureAction::Restore
                }
            },
        }
    }

    /// Some(new calm start) while still waiting; None once calm has lasted.
    fn calm(
        &self,
        since: Option<Instant>,
        r: VramReading,
        now: Instant,
    ) -> Option<Option<Instant>> {
        if r.free.saturating_sub(r.to_take) < self.config.min_free_vram {
            return Some(None);
        }
        let since = since.unwrap_or(now);
        if now.duration_since(since) >= Duration::from_secs(self.config.calm_secs) {
            None
        } else {
            Some(Some(since))
        }
    }

    /// A release that could not be done (RAM short): stay holding, and
    /// try again on the next reading.
    pub fn release_refused(&mut self) {
        self.state = State::Holding;
    }

    pub fn describe(&self) -> &'static str {
        match self.state {
            State::Holding => "holding",
            State::Trimmed { calm_since: None } => "unused VRAM given back (VRAM wanted elsewhere)",
            State::Trimmed { .. } => "unused VRAM given back, waiting for calm",
            State::Released { calm_since: None } => "released (VRAM wanted elsewhere)",
            State::Released { .. } => "released, waiting for calm",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn gate(calm: u64) -> PressureGate {
        PressureGate::new(PressureConfig {
            enabled: true,
            min_free_vram: G,
            calm_secs: calm,
        })
    }

    /// A reading with nothing unused to give back.
    fn r(free: u64, to_take: u64) -> VramReading {
        VramReading {
            free,
            unused: 0,
            to_take,
        }
    }

    #[test]
    fn trims_first_then_releases_and_takes_back_after_calm() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut g = gate(60);
        let unused = |free, unused| VramReading {
            free,
            unused,
            to_take: 0,
        };
        assert_eq!(g.step(unused(G / 2, 3 * G), s(0)), PressureAction::Trim);
        assert!(!g.released());
        // The 3 GiB given back lifted free VRAM above the threshold; taking
        // them back would not leave it: no calm.
        assert_eq!(
            g.step(r(3 * G + G / 2, 3 * G), s(1)),
            PressureAction::Nothing
        );
        assert_eq!(
            g.step(r(3 * G + G / 2, 3 * G), s(100)),
            PressureAction::Nothing
        );
        // The other program exits: room; after calm, take back.
        assert_eq!(g.step(r(8 * G, 3 * G), s(101)), PressureAction::Nothing);
        assert_eq!(g.step(r(8 * G, 3 * G), s(161)), PressureAction::TakeBack);
        // Trimmed and still short with nothing more unused: release.
        assert_eq!(g.step(unused(G / 2, G), s(200)), PressureAction::Trim);
        assert_eq!(g.step(r(G / 2, 0), s(202)), PressureAction::Release);
        assert!(g.released());
    }

    #[test]
    fn releases_under_the_threshold_and_restores_after_calm() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut g = gate(120);
        assert_eq!(g.step(r(4 * G, 0), s(0)), PressureAction::Nothing);
        assert_eq!(g.step(r(G / 2, 0), s(1)), PressureAction::Release);
        assert!(g.released());
        // The device's 2 GiB came back free: 2.5 GiB free, but only 0.5
        // left after restoring: not calm.
        assert_eq!(
            g.step(r(2 * G + G / 2, 2 * G), s(2)),
            PressureAction::Nothing
        );
        // The other program exits: room for the device plus the threshold.
        assert_eq!(g.step(r(6 * G, 2 * G), s(10)), PressureAction::Nothing);
        assert_eq!(g.step(r(6 * G, 2 * G), s(100)), PressureAction::Nothing);
        // A dip restarts the calm clock.
        assert_eq!(g.step(r(2 * G, 2 * G), s(110)), PressureAction::Nothing);
        assert_eq!(g.step(r(6 * G, 2 * G), s(120)), PressureAction::Nothing);
        assert_eq!(g.step(r(6 * G, 2 * G), s(239)), PressureAction::Nothing);
        assert_eq!(g.step(r(6 * G, 2 * G), s(240)), PressureAction::Restore);
        assert!(!g.released());
    }

    #[test]
    fn a_refused_release_is_retried_and_off_does_nothing() {
        let now = Instant::now();
        let mut g = gate(10);
        assert_eq!(g.step(r(0, 0), now), PressureAction::Release);
        g.release_refused();
        assert_eq!(g.step(r(0, 0), now), PressureAction::Release);
        let mut off = PressureGate::new(PressureConfig {
            enabled: false,
            min_free_vram: G,
            calm_secs: 10,
        });
        assert_eq!(off.step(r(0, 0), now), PressureAction::Nothing);
    }
}
