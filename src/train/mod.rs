//! Training: the LoRA trainer behind `tuna train` and `tuna sweep`.

use crate::sweep::Trainer;

/// The trainer this build offers, or `None` while none is implemented.
pub fn default_trainer() -> Option<Box<dyn Trainer>> {
    None
}
