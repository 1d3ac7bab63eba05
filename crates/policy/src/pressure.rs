//! VRAM pressure: when free VRAM on a GPU falls under the threshold because
//! another program wants it, give the devices' VRAM back; bring it back
//! once there is room for it again and that has held for a while.

use std::time::{Duration, Instant};
use vramblk_config::PressureConfig;

/// What the service should do now for one GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PressureAction {
    Nothing,
    /// Free VRAM is under the threshold: release this GPU's devices.
    Release,
    /// Room again for `calm` long: bring the devices back.
    Restore,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Holding,
    /// Released; `calm_since` is when free VRAM last rose to enough room.
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

    /// Feeds one reading: `free` bytes of VRAM free on the GPU, `held`
    /// bytes the released devices would take back. Coming back needs
    /// `free - held` to stay at or above the threshold for `calm_secs`, so
    /// restoring never itself causes pressure.
    pub fn step(&mut self, free: u64, held: u64, now: Instant) -> PressureAction {
        if !self.config.enabled {
            return PressureAction::Nothing;
        }
        let min = self.config.min_free_vram;
        match self.state {
            State::Holding if free < min => {
                self.state = State::Released { calm_since: None };
                PressureAction::Release
            }
            State::Holding => PressureAction::Nothing,
            State::Released { calm_since } => {
                if free.saturating_sub(held) < min {
                    self.state = State::Released { calm_since: None };
                    return PressureAction::Nothing;
                }
                let since = calm_since.unwrap_or(now);
                if now.duration_since(since) >= Duration::from_secs(self.config.calm_secs) {
                    self.state = State::Holding;
                    PressureAction::Restore
                } else {
                    self.state = State::Released {
                        calm_since: Some(since),
                    };
                    PressureAction::Nothing
                }
            }
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

    #[test]
    fn releases_under_the_threshold_and_restores_after_calm() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut g = gate(120);
        assert_eq!(g.step(4 * G, 0, s(0)), PressureAction::Nothing);
        assert_eq!(g.step(G / 2, 0, s(1)), PressureAction::Release);
        assert!(g.released());
        // The device's 2 GiB came back free: 2.5 GiB free, but only 0.5
        // left after restoring: not calm.
        assert_eq!(g.step(2 * G + G / 2, 2 * G, s(2)), PressureAction::Nothing);
        // The other program exits: room for the device plus the threshold.
        assert_eq!(g.step(6 * G, 2 * G, s(10)), PressureAction::Nothing);
        assert_eq!(g.step(6 * G, 2 * G, s(100)), PressureAction::Nothing);
        // A dip restarts the calm clock.
        assert_eq!(g.step(2 * G, 2 * G, s(110)), PressureAction::Nothing);
        assert_eq!(g.step(6 * G, 2 * G, s(120)), PressureAction::Nothing);
        assert_eq!(g.step(6 * G, 2 * G, s(239)), PressureAction::Nothing);
        assert_eq!(g.step(6 * G, 2 * G, s(240)), PressureAction::Restore);
        assert!(!g.released());
    }

    #[test]
    fn a_refused_release_is_retried_and_off_does_nothing() {
        let now = Instant::now();
        let mut g = gate(10);
        assert_eq!(g.step(0, 0, now), PressureAction::Release);
        g.release_refused();
        assert_eq!(g.step(0, 0, now), PressureAction::Release);
        let mut off = PressureGate::new(PressureConfig {
            enabled: false,
            min_free_vram: G,
            calm_secs: 10,
        });
        assert_eq!(off.step(0, 0, now), PressureAction::Nothing);
    }
}
