//! GGUF checkpoints read in place: metadata, tensor index, dense tensors dequantized to f32, and
//! one expert's slice of a stacked expert tensor by offset.
//!
//! Names: the model files speak Hugging Face tensor names; [`gguf_name`] maps them to llama.cpp's.
//! Expert tensors are stacked per layer (`blk.N.ffn_{gate,up,down}_exps.weight`, GGUF dims
//! `[in, out, E]`), so expert e is one contiguous run of `out * in` quantized values.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};

use super::gguf_header::{self, MXFP4_TYPE, OtherTensor};
use super::mxfp4;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor, ggml_file::qtensor_from_ggml};
use candle_core::{Device, Tensor};

use super::WeightSource;
use crate::error::{Error, Result};

/// An open GGUF file: its parsed header and where tensor data starts.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    /// Tensors of types candle does not read: MXFP4 (any other is refused at open).
    mxfp4: std::collections::HashMap<String, OtherTensor>,
    device: Device,
    /// Hand out quantized matrices in their stored type rather than widened to f32.
    keep_quantized: bool,
}

impl GgufFile {
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let header = gguf_header::read(&mut BufReader::new(file))
            .map_err(|message| Self::error_at(path, message))?;
        if let Some((name, tensor)) = header
            .others
            .iter()
            .find(|(_, t)| t.ggml_type != MXFP4_TYPE)
        {
            return Err(Self::error_at(path, unread_type(name, tensor.ggml_type)));
        }
        let this = Self {
            path: path.to_path_buf(),
            content: header.content,
            mxfp4: header.others,
            device: device.clone(),
            keep_quantized: false,
        };
        // Refuse a truncated file now rather than at the first read of its last tensor.
        let mxfp4 = this.mxfp4.iter().map(|(name, t)| {
            let values = t.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            (
                name,
                t.offset,
                values.map_or(usize::MAX, gguf_header::mxfp4_bytes),
            )
        });
        let known = this
            .content
            .tensor_infos
            .iter()
            .map(|(name, info)| (name, info.offset, tensor_bytes(info)));
        for (name, offset, bytes) in known.chain(mxfp4) {
            let end = this
                .content
                .tensor_data_offset
                .checked_add(offset)
                .and_then(|start| start.checked_add(bytes as u64))
                .unwrap_or(u64::MAX);
            if end > len {
                return Err(this.error(format!(
                    "tensor {name:?} ends at byte {end} but the file has {len} bytes (truncated?)"
                )));
            }
        }
        Ok(this)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The name the Hugging Face tensor `hf` has in this file: llama.cpp's usual one, or when
    /// the file has no tensor by that name and one by another spelling llama.cpp gives it for
    /// some architectures, that one.
    pub fn name_in_file(&self, hf: &str) -> Option<String> {
        let usual = gguf_name(hf)?;
        if self.has_tensor(&usual) {
            return Some(usual);
        }
        let other = OTHER_SPELLINGS.iter().find_map(|(usual_tail, other_tail)| {
            let other = format!("{}{other_tail}", usual.strip_suffix(usual_tail)?);
            self.has_tensor(&other).then_some(other)
        });
        Some(other.unwrap_or(usual))
    }

    /// The tensors of this file that the Hugging Face tensor `hf` is read from: one, or the two
    /// llama.cpp splits a DeepSeek `kv_b_proj` or a gpt-oss `gate_up_proj_bias` into.
    pub fn sources_in_file(&self, hf: &str) -> Vec<String> {
        match split_kv_b_names(hf).or_else(|| split_gate_up_bias_names(hf)) {
            Some(names) if self.has_tensor(&names[0]) => names.to_vec(),
            _ => self.name_in_file(hf).into_iter().collect(),
        }
    }

    /// The llama.cpp name of the Hugging Face tensor `name`, or an error naming it.
    fn gguf_name_of(&self, name: &str) -> Result<String> {
        self.name_in_file(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            location: format!("{} (no GGUF name for it)", self.path.display()),
        })
    }

    /// Makes [`WeightSource::matrix`] keep quantized tensors in their stored type.
    pub fn keep_quantized(mut self, keep: bool) -> Self {
        self.keep_quantized = keep;
        self
    }

    fn error_at(path: &Path, message: impl std::fmt::Display) -> Error {
        Error::Gguf {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }

    /// An error about this file.
    pub fn error(&self, message: impl std::fmt::Display) -> Error {
        Self::error_at(&self.path, message)
    }

    fn meta(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| self.error(format!("missing metadata key {key:?}")))
    }

    /// An integer metadata value of any integer type.
    pub fn meta_usize(&self, key: &str) -> Result<usize> {
        let value = self.meta(key)?;
        let n = match value {
            Value::U8(v) => *v as i128,
            Value::I8(v) => *v as i128,
            Value::U16(v) => *v as i128,
            Value::I16(v) => *v as i128,
            Value::U32(v) => *v as i128,
            Value::I32(v) => *v as i128,
            Value::U64(v) => *v as i128,
            Value::I64(v) => *v as i128,
            _ => return Err(self.error(format!("metadata key {key:?} is not an integer"))),
        };
        usize::try_from(n).map_err(|_| self.error(format!("metadata key {key:?} is negative")))
    }

    pub fn meta_f64(&self, key: &str) -> Result<f64> {
        match self.meta(key)? {
            Value::F32(v) => Ok(*v as f64),
            Value::F64(v) => Ok(*v),
            _ => Err(self.error(format!("metadata key {key:?} is not a float"))),
        }
    }

    pub fn meta_str(&self, key: &str) -> Result<&str> {
        match self.meta(key)? {
            Value::String(s) => Ok(s),
            _ => Err(self.error(format!("metadata key {key:?} is not a string"))),
        }
    }

    /// An array metadata value.
    pub fn meta_array(&self, key: &str) -> Result<&[Value]> {
        match self.meta(key)? {
            Value::Array(values) => Ok(values),
            _ => Err(self.error(format!("metadata key {key:?} is not an array"))),
        }
    }

    /// An array of strings (the vocabulary, the merges).
    pub fn meta_strings(&self, key: &str) -> Result<Vec<&str>> {
        self.meta_array(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(self.error(format!("metadata key {key:?} holds a non-string"))),
            })
            .collect()
    }

    /// A boolean metadata value, when present.
    pub fn meta_bool(&self, key: &str) -> Option<bool> {
        match self.content.metadata.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    pub fn has_meta(&self, key: &str) -> bool {
        self.content.metadata.contains_key(key)
    }

    /// Every tensor's GGUF name, in no particular order.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.content
            .tensor_infos
            .keys()
            .chain(self.mxfp4.keys())
            .map(String::as_str)
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name) || self.mxfp4.contains_key(name)
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.content.tensor_infos.get(name).ok_or_else(|| {
            if self.mxfp4.contains_key(name) {
                self.error(format!(
                    "tensor {name:?} is in MXFP4, which this version reads only in routed experts"
                ))
            } else {
                Error::MissingTensor {
                    name: name.to_string(),
                    location: self.path.display().to_string(),
                }
            }
        })
    }

    /// The shape of tensor `name` (a GGUF name), in candle's order (`[out, in]`).
    pub fn tensor_shape(&self, name: &str) -> Result<&[usize]> {
        match self.mxfp4.get(name) {
            Some(tensor) => Ok(&tensor.shape),
            None => Ok(self.info(name)?.shape.dims()),
        }
    }

    fn data_start(&self, info: &TensorInfo) -> u64 {
        self.content.tensor_data_offset + info.offset
    }

    /// The tensor `name` (a GGUF name) as f32, its shape checked (candle order: `[out, in]`).
    pub fn dequantized(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let info = self.info(name)?;
        if info.shape.dims() != shape && info.shape.elem_count() != shape.iter().product::<usize>()
        {
            return Err(Error::TensorShape {
                name: name.to_string(),
                path: self.path.clone(),
                actual: info.shape.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        // Widened on the host and taken to the device once, as it will stay: a GPU's
        // conversion output comes from its buffer pool, sized to the next power of two.
        Ok(self
            .qtensor(name, info, &Device::Cpu)?
            .dequantize(&Device::Cpu)?
            .to_device(&self.device)?
            .reshape(shape)?)
    }

    /// Reads the tensor `name` in its stored type, onto `device`.
    fn qtensor(&self, name: &str, info: &TensorInfo, device: &Device) -> Result<QTensor> {
        let mut reader =
            BufReader::new(File::open(&self.path).map_err(|e| Error::io(&self.path, e))?);
        info.read(&mut reader, self.content.tensor_data_offset, device)
            .map_err(|e| self.error(format!("tensor {name:?}: {e}")))
    }

    /// Where expert `expert` of the stacked tensor `name` lies: absolute offset, bytes, type and
    /// shape `[out, in]`.
    pub fn expert_slice(
        &self,
        name: &str,
        expert: usize,
        shape: [usize; 2],
    ) -> Result<ExpertSlice> {
        // Where the stacked tensor lies, its bytes, and its type.
        let (dims, start, total, stored) = match self.mxfp4.get(name) {
            Some(tensor) => (
                &tensor.shape[..],
                self.content.tensor_data_offset + tensor.offset,
                gguf_header::mxfp4_bytes(tensor.shape.iter().product()),
                ExpertType::Mxfp4,
            ),
            None => {
                let info = self.info(name)?;
                let dims = info.shape.dims();
                (
                    dims,
                    self.data_start(info),
                    tensor_bytes(info),
                    ExpertType::Ggml(info.ggml_dtype),
                )
            }
        };
        let whole_blocks = stored != ExpertType::Mxfp4 || shape[1].is_multiple_of(32);
        if dims.len() != 3 || dims[1..] != shape || expert >= dims[0] || !whole_blocks {
            return Err(Error::TensorShape {
                name: name.to_string(),
                path: self.path.clone(),
                actual: dims.to_vec(),
                expected: vec![expert + 1, shape[0], shape[1]],
            });
        }
        // Within the file: the whole tensor was checked to end inside it at open.
        let bytes = total / dims[0];
        Ok(ExpertSlice {
            offset: start + (expert * bytes) as u64,
            bytes,
            stored,
            shape,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}

/// The type an expert matrix is stored in: a ggml type candle has, or MXFP4, which it has not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertType {
    Ggml(GgmlDType),
    Mxfp4,
}

impl ExpertType {
    /// llama.cpp's name of the type, as layouts record it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ggml(dtype) => ggml_type_name(dtype),
            Self::Mxfp4 => "MXFP4",
        }
    }

    /// The type [`ExpertType::name`] names.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "MXFP4" => Some(Self::Mxfp4),
            _ => parse_ggml_type(name).map(Self::Ggml),
        }
    }

    /// Bytes of `values` values, if they fill whole blocks.
    pub fn bytes(self, values: usize) -> Option<usize> {
        match self {
            Self::Ggml(dtype) => ggml_bytes(dtype, values),
            Self::Mxfp4 => values
                .is_multiple_of(32)
                .then(|| gguf_header::mxfp4_bytes(values)),
        }
    }
}

/// One expert's run of bytes inside a stacked GGUF tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertSlice {
    pub offset: u64,
    /// Bytes in the file.
    pub bytes: usize,
    /// The type the file stores it in. MXFP4 is held as it is where odmoe's kernels multiply it,
    /// else as Q8_0 blocks of the same values (see [`mxfp4`]).
    pub stored: ExpertType,
    /// `[out, in]`.
    pub shape: [usize; 2],
}

impl ExpertSlice {
    /// Bytes the slice takes once loaded: dense types are widened to f32 by `QMatMul`, MXFP4
    /// blocks doubled into Q8_0 unless `mxfp4_kept` (the kernels multiply them as they are).
    pub fn bytes_in_memory(&self, mxfp4_kept: bool) -> usize {
        match self.stored {
            ExpertType::Mxfp4 if !mxfp4_kept => mxfp4::q8_0_bytes(self.bytes),
            ExpertType::Ggml(dtype) if is_dense(dtype) => self.shape[0] * self.shape[1] * 4,
            _ => self.bytes,
        }
    }

    /// The slice's bytes as a matrix candle multiplies in its stored type (not MXFP4, which
    /// candle does not have).
    pub fn to_qmatmul(&self, bytes: &[u8], device: &Device) -> candle_core::Result<QMatMul> {
        let ExpertType::Ggml(dtype) = self.stored else {
            return Err(candle_core::Error::Msg(
                "MXFP4 blocks are not a type candle multiplies".into(),
            ));
        };
        let qtensor = qtensor_from_ggml(dtype, bytes, self.shape.to_vec(), device)?;
        QMatMul::from_qtensor(qtensor)
    }
}

/// Candle's type for ggml type `number` of a GGUF header, when it has one.
pub(super) fn ggml_type_of_number(number: u32) -> Option<GgmlDType> {
    GGML_TYPES
        .iter()
        .find(|(n, _, _)| *n == number)
        .map(|(_, _, t)| *t)
}

/// llama.cpp's name of a ggml type ("Q4_K", "F16", ...), as layouts record it.
pub fn ggml_type_name(dtype: GgmlDType) -> &'static str {
    GGML_TYPES
        .iter()
        .find(|(_, _, t)| *t == dtype)
        .map(|(_, name, _)| *name)
        .expect("every ggml type is named")
}

/// The ggml type of a name written by [`ggml_type_name`].
pub fn parse_ggml_type(name: &str) -> Option<GgmlDType> {
    GGML_TYPES
        .iter()
        .find(|(_, n, _)| *n == name)
        .map(|(_, _, t)| *t)
}

/// ggml types that files hold and this reader does not take yet (MXFP4 it reads in experts),
/// by number.
const UNREAD_TYPES: &[(u32, &str)] = &[
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (29, "IQ1_M"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
];

/// Why a file holding tensor `tensor` of ggml type `number` is refused.
fn unread_type(tensor: &str, number: u32) -> String {
    match UNREAD_TYPES.iter().find(|(t, _)| *t == number) {
        Some((n, name)) => format!(
            "tensor {tensor:?} is of ggml type {n} ({name}), which this version does not read \
             yet; files of the same model in Q8_0, a K-quant type or BF16 load (llama-quantize \
             makes them from a BF16 or F16 GGUF)"
        ),
        None => format!("tensor {tensor:?} is of ggml type {number}, which is unknown"),
    }
}

/// Bytes of `elements` values stored as `dtype`, when they fill whole blocks.
pub fn ggml_bytes(dtype: GgmlDType, elements: usize) -> Option<usize> {
    elements
        .is_multiple_of(dtype.block_size())
        .then(|| elements / dtype.block_size() * dtype.type_size())
}

/// The ggml types candle has: their number in a GGUF header, llama.cpp's name, candle's type.
const GGML_TYPES: [(u32, &str, GgmlDType); 15] = [
    (0, "F32", GgmlDType::F32),
    (1, "F16", GgmlDType::F16),
    (30, "BF16", GgmlDType::BF16),
    (2, "Q4_0", GgmlDType::Q4_0),
    (3, "Q4_1", GgmlDType::Q4_1),
    (6, "Q5_0", GgmlDType::Q5_0),
    (7, "Q5_1", GgmlDType::Q5_1),
    (8, "Q8_0", GgmlDType::Q8_0),
    (9, "Q8_1", GgmlDType::Q8_1),
    (10, "Q2_K", GgmlDType::Q2K),
    (11, "Q3_K", GgmlDType::Q3K),
    (12, "Q4_K", GgmlDType::Q4K),
    (13, "Q5_K", GgmlDType::Q5K),
    (14, "Q6_K", GgmlDType::Q6K),
    (15, "Q8_K", GgmlDType::Q8K),
];

fn tensor_bytes(info: &TensorInfo) -> usize {
    info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size()
}

/// The llama.cpp name of a Hugging Face tensor name, for the tensors outside routed experts.
pub fn gguf_name(hf: &str) -> Option<String> {
    let top = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = top {
        return Some(name.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let mapped = match tail {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.o_proj.bias" => "attn_output.bias",
        "self_attn.sinks" => "attn_sinks.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "mlp.gate.weight" | "block_sparse_moe.gate.weight" => "ffn_gate_inp.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "mlp.shared_expert.gate_proj.weight" => "ffn_gate_shexp.weight",
        "mlp.shared_expert.up_proj.weight" => "ffn_up_shexp.weight",
        "mlp.shared_expert.down_proj.weight" => "ffn_down_shexp.weight",
        "mlp.shared_expert_gate.weight" => "ffn_gate_inp_shexp.weight",
        // gpt-oss; `gate_up_proj_bias` is split in two, see `WeightSource::tensor`.
        "mlp.router.weight" => "ffn_gate_inp.weight",
        "mlp.router.bias" => "ffn_gate_inp.bias",
        "mlp.experts.down_proj_bias" => "ffn_down_exps.bias",
        // DeepSeek-V3 (`deepseek2`); `kv_b_proj` is split in two, see `WeightSource::tensor`.
        "self_attn.q_a_proj.weight" => "attn_q_a.weight",
        "self_attn.q_a_proj.bias" => "attn_q_a.bias",
        "self_attn.q_a_layernorm.weight" => "attn_q_a_norm.weight",
        "self_attn.q_b_proj.weight" => "attn_q_b.weight",
        "self_attn.kv_a_proj_with_mqa.weight" => "attn_kv_a_mqa.weight",
        "self_attn.kv_a_proj_with_mqa.bias" => "attn_kv_a_mqa.bias",
        "self_attn.kv_a_layernorm.weight" => "attn_kv_a_norm.weight",
        "mlp.gate.e_score_correction_bias" => "exp_probs_b.bias",
        "mlp.shared_experts.gate_proj.weight" => "ffn_gate_shexp.weight",
        "mlp.shared_experts.up_proj.weight" => "ffn_up_shexp.weight",
        "mlp.shared_experts.down_proj.weight" => "ffn_down_shexp.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{mapped}"))
}

/// Tensors llama.cpp names otherwise in some architectures: (usual name's tail, other tail).
const OTHER_SPELLINGS: &[(&str, &str)] = &[
    // glm4moe and gpt-oss: the norm before the feed-forward, named as the one after attention.
    ("ffn_norm.weight", "post_attention_norm.weight"),
];

/// The stacked GGUF tensors holding a layer's routed experts: gate, up, down.
pub fn stacked_expert_names(layer: usize) -> [String; 3] {
    ["gate", "up", "down"].map(|p| format!("blk.{layer}.ffn_{p}_exps.weight"))
}

/// The two GGUF tensors (gate, up) llama.cpp splits a gpt-oss `gate_up_proj_bias` into, when
/// `hf` names one.
fn split_gate_up_bias_names(hf: &str) -> Option<[String; 2]> {
    let rest = hf.strip_prefix("model.layers.")?;
    let layer = rest.strip_suffix(".mlp.experts.gate_up_proj_bias")?;
    Some(["gate", "up"].map(|p| format!("blk.{layer}.ffn_{p}_exps.bias")))
}

/// The two GGUF tensors llama.cpp splits a DeepSeek `kv_b_proj` into, when `hf` names one.
fn split_kv_b_names(hf: &str) -> Option<[String; 2]> {
    let rest = hf.strip_prefix("model.layers.")?;
    let layer = rest.strip_suffix(".self_attn.kv_b_proj.weight")?;
    Some(["attn_k_b", "attn_v_b"].map(|t| format!("blk.{layer}.{t}.weight")))
}

impl GgufFile {
    /// `gate_up_proj_bias` `[experts, 2 * width]` rebuilt from llama.cpp's gate and up biases
    /// (`[experts, width]` each), interleaved as transformers keeps them.
    fn joined_gate_up_bias(
        &self,
        names: &[String; 2],
        hf: &str,
        shape: &[usize],
    ) -> Result<Tensor> {
        let [experts, double] = shape else {
            return Err(Error::InvalidModel(format!("{hf} has shape {shape:?}")));
        };
        let half = [*experts, double / 2];
        let gate = self.dequantized(&names[0], &half)?;
        let up = self.dequantized(&names[1], &half)?;
        Ok(Tensor::stack(&[&gate, &up], 2)?.reshape(shape)?)
    }

    /// `kv_b_proj` `[heads * (nope + v), rank]` rebuilt from llama.cpp's `attn_k_b` (per head
    /// the key rows transposed: numpy `[heads, rank, nope]`) and `attn_v_b` (`[heads, v, rank]`).
    fn joined_kv_b(&self, names: &[String; 2], hf: &str, shape: &[usize]) -> Result<Tensor> {
        let dims =
            |name: &str| -> Result<Vec<usize>> { Ok(self.info(name)?.shape.dims().to_vec()) };
        let (k, v) = (dims(&names[0])?, dims(&names[1])?);
        let fits = k.len() == 3
            && v.len() == 3
            && k[0] == v[0]
            && k[1] == v[2]
            && shape == [k[0] * (k[2] + v[1]), k[1]];
        if !fits {
            return Err(Error::TensorShape {
                name: hf.to_string(),
                path: self.path.clone(),
                actual: [k, v].concat(),
                expected: shape.to_vec(),
            });
        }
        let k_b = self.dequantized(&names[0], &k)?.transpose(1, 2)?;
        let v_b = self.dequantized(&names[1], &v)?;
        Ok(Tensor::cat(&[&k_b, &v_b], 1)?.reshape(shape)?)
    }
}

impl WeightSource for GgufFile {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if let Some(names) = split_kv_b_names(name)
            && self.has_tensor(&names[0])
        {
            return self.joined_kv_b(&names, name, shape);
        }
        if let Some(names) = split_gate_up_bias_names(name) {
            return self.joined_gate_up_bias(&names, name, shape);
        }
        let gguf = self.gguf_name_of(name)?;
        self.dequantized(&gguf, shape)
    }

    fn contains(&self, name: &str) -> bool {
        if let Some(names) = split_kv_b_names(name).or_else(|| split_gate_up_bias_names(name)) {
            return names.iter().all(|n| self.has_tensor(n));
        }
        self.name_in_file(name).is_some_and(|g| self.has_tensor(&g))
    }

    fn matrix(&self, name: &str, shape: &[usize]) -> Result<QMatMul> {
        let gguf = self.gguf_name_of(name)?;
        let info = self.info(&gguf)?;
        if !self.keep_quantized || is_dense(info.ggml_dtype) {
            return Ok(QMatMul::Tensor(self.dequantized(&gguf, shape)?));
        }
        // GGUF dims are `[in, out]`, which candle reads as the `[out, in]` asked for.
        if info.shape.dims() != shape {
            return Err(Error::TensorShape {
                name: gguf,
                path: self.path.clone(),
                actual: info.shape.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        Ok(QMatMul::from_qtensor(self.qtensor(
            &gguf,
            info,
            &self.device,
        )?)?)
    }
}

/// Types candle widens to f32 rather than multiplying in place.
fn is_dense(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}
