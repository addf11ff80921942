//! Checkpoint formats the engine reads.

pub mod convert;
pub mod layout;
pub mod safetensors;
pub mod size;
