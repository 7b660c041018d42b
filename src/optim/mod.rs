//! Optimization: AdamW, learning-rate schedules, gradient clipping on the device and the f16
//! loss scaler.

pub mod adamw;
pub mod grads;
pub mod scaler;
pub mod schedule;

pub use adamw::{AdamW, FlatLayout};
pub use grads::{StepGradients, clip_to_norm, finite, global_norm_sq};
pub use scaler::LossScaler;
