//! Where an expert's gate, up and down sit in its file: each at an aligned offset, so that one
//! aligned read fetches the expert; the header room sized for the longest header.

use std::path::Path;

use safetensors::tensor::Dtype;

use super::headers::expert_header_json;
use super::plan::expert_weight_names;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::format::gguf::{GgufFile, stacked_expert_names};
use crate::format::layout::{self, ExpertLayout, ExpertTensor, GGUF_DTYPE};
use crate::format::safetensors::{HfWeights, View};

/// The layout of experts kept as GGUF blocks: each tensor's slot holds its largest type over the
/// layers, and the manifest records every layer's types.
pub(super) fn gguf_expert_layout(config: &ModelConfig, gguf: &GgufFile) -> Result<ExpertLayout> {
    let shapes = config.expert_shapes();
    let mut slot_bytes = [0u64; 3];
    let mut ggml_types = Vec::with_capacity(config.num_layers);
    for layer in 0..config.num_layers {
        // Dense layers have no expert types: their entry stays empty.
        if !config.is_moe_layer(layer) {
            ggml_types.push([(); 3].map(|_| String::new()));
            continue;
        }
        let names = stacked_expert_names(layer);
        let mut types = Vec::with_capacity(3);
        for k in 0..3 {
            let slice = gguf.expert_slice(&names[k], 0, shapes[k])?;
            slot_bytes[k] = slot_bytes[k].max(slice.bytes as u64);
            types.push(slice.stored.name().to_string());
        }
        ggml_types.push(types.try_into().expect("three types"));
    }
    let layout = ExpertLayout {
        dtype: GGUF_DTYPE.into(),
        ggml_types: Some(ggml_types),
        file_bytes: 0,
        data_offset: 0,
        tensors: place(shapes, slot_bytes),
    };
    finish_expert_layout(layout, config, Dtype::U8)
}

/// The common layout of every expert file, after checking every expert tensor's dtype and shape
/// (a tensor of its own, or a slice of a fused one: gpt-oss's, in BF16 or MXFP4), and the dtype
/// its files' headers give the tensors.
pub(super) fn expert_layout(
    config: &ModelConfig,
    weights: &HfWeights,
    config_path: &Path,
) -> Result<(ExpertLayout, Dtype)> {
    let shapes = config.expert_shapes();
    // The layout's dtype name, and the dtype its files' headers give the tensors (MXFP4 blocks
    // are U8 tensors there, as GGUF blocks are).
    let mut dtype: Option<(String, Dtype)> = None;
    for layer in config.moe_layers() {
        for e in 0..config.num_experts {
            for (name, shape) in expert_weight_names(config, layer, e).iter().zip(shapes) {
                let location = weights.location(name)?;
                let path = &location.path;
                if location.shape != shape {
                    return Err(Error::TensorShape {
                        name: name.clone(),
                        path: path.to_path_buf(),
                        actual: location.shape.clone(),
                        expected: shape.to_vec(),
                    });
                }
                let found = location.values_dtype();
                let in_header = match location.view {
                    View::Mxfp4Rows { .. } => Dtype::U8,
                    View::Whole | View::Columns { .. } => location.dtype,
                };
                if !matches!(location.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)
                    && found != layout::MXFP4_DTYPE
                {
                    return Err(Error::Safetensors {
                        path: path.to_path_buf(),
                        message: format!(
                            "expert tensor {name:?} has dtype {found}; supported: F32, F16, \
                             BF16, and MXFP4 blocks as gpt-oss's"
                        ),
                    });
                }
                match &dtype {
                    None => dtype = Some((found, in_header)),
                    Some((first, _)) if *first != found => {
                        return Err(Error::Safetensors {
                            path: path.to_path_buf(),
                            message: format!(
                                "expert tensor {name:?} is {found} while earlier experts are \
                                 {first}; a layout stores all experts in one dtype"
                            ),
                        });
                    }
                    Some(_) => {}
                }
            }
        }
    }
    let (dtype, header_dtype) = dtype.ok_or_else(|| {
        Error::config(
            config_path,
            "the model has no routed experts (num_hidden_layers or num_experts is 0)",
        )
    })?;
    let bytes = shapes
        .map(|[rows, cols]| layout::stored_bytes(&dtype, rows * cols).expect("checked above"));
    let layout = ExpertLayout {
        dtype,
        ggml_types: None,
        file_bytes: 0,
        data_offset: 0,
        tensors: place(shapes, bytes),
    };
    Ok((
        finish_expert_layout(layout, config, header_dtype)?,
        header_dtype,
    ))
}

/// Sizes the header room and the files of `layout`, whose tensors are placed, and checks it.
fn finish_expert_layout(
    mut layout: ExpertLayout,
    config: &ModelConfig,
    dtype: Dtype,
) -> Result<ExpertLayout> {
    // The data offset must hold the longest header of any expert file (their metadata differ
    // only in the layer and expert numbers, and for GGUF blocks in the tensors' lengths).
    let mut longest = 0;
    for layer in config.moe_layers() {
        for e in 0..config.num_experts {
            longest = longest.max(expert_header_json(&layout, dtype, layer, e).len());
        }
    }
    let last = &layout.tensors[2];
    layout.data_offset = layout::align_up(8 + longest as u64);
    layout.file_bytes = layout.data_offset + layout::align_up(last.offset + last.bytes);
    layout
        .check(config)
        .map_err(|m| Error::config("experts", m))?;
    Ok(layout)
}

/// Gate, up and down of `shapes` and `bytes` placed one after another at aligned offsets.
fn place(shapes: [[usize; 2]; 3], bytes: [u64; 3]) -> [ExpertTensor; 3] {
    let mut end = 0;
    let mut tensor = |k: usize, name: &str| {
        let offset = layout::align_up(end);
        end = offset + bytes[k];
        ExpertTensor {
            name: name.into(),
            offset,
            bytes: bytes[k],
            shape: shapes[k],
        }
    };
    [tensor(0, "gate"), tensor(1, "up"), tensor(2, "down")]
}
