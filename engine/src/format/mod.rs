//! Checkpoint formats the engine reads.

pub mod layout;
pub mod safetensors;
