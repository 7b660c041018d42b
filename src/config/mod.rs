//! Experiment specs.
