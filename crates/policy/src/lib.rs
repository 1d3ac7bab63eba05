//! When the service's devices should be up: pure state machines fed by
//! readings (sysfs power supplies, free VRAM), so tests drive them with a
//! fake tree and a fake clock.

pub mod power;
pub mod pressure;

pub use power::{PowerGate, PowerReading};
pub use pressure::{PressureAction, PressureGate, VramReading};
