//! Checkpoint formats the engine reads.

pub mod safetensors;
