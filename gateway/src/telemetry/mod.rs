//! What every layer of the gateway may use: the clock and the shared counts.

pub mod clock;
pub mod stats;
