//! Training: the LoRA trainer behind `tuna train` and `tuna sweep`.

pub mod checkpoint;
pub mod eval;
pub mod settings;
pub mod step;
pub mod trainer;

use crate::sweep::Trainer;

/// The trainer this build offers.
pub fn default_trainer() -> Option<Box<dyn Trainer>> {
    Some(Box::new(trainer::LoraTrainer::default()))
}
