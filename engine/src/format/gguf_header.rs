//! A GGUF file's header: metadata, tensor index and where tensor data starts. Read here rather
//! than by candle, whose reader refuses a whole file for one tensor of a type it does not know:
//! gpt-oss's files keep their experts in MXFP4 beside tensors candle reads.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

use candle_core::Shape;
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};

/// The ggml type number of MXFP4: blocks of 32 e2m1 values and an e8m0 scale.
pub const MXFP4_TYPE: u32 = 39;
/// Bytes of an MXFP4 block: the scale's exponent, then 32 four-bit values.
pub const MXFP4_BLOCK_BYTES: usize = 17;

/// Limits on what a header may declare, as llama.cpp's and candle's readers keep them: a
/// crafted file cannot make the reader allocate or recurse without bound.
const MAX_STRING: u64 = 1 << 30;
const MAX_ELEMENTS: u64 = 1 << 30;
const MAX_DIMS: u32 = 4;
const MAX_DEPTH: usize = 64;
const DEFAULT_ALIGNMENT: u64 = 32;

/// A tensor of a type candle has no name for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtherTensor {
    /// Its ggml type number.
    pub ggml_type: u32,
    /// `[out, in]`-ordered dims, as candle orders them.
    pub shape: Vec<usize>,
    /// From the start of tensor data.
    pub offset: u64,
}

/// The header as candle's `Content` (tensors of types candle knows) and the other tensors.
pub struct Header {
    pub content: Content,
    pub others: HashMap<String, OtherTensor>,
}

/// Reads the header of the file `reader` reads (from its start).
pub fn read<R: Read + Seek>(reader: &mut R) -> Result<Header, String> {
    let size = reader.seek(SeekFrom::End(0)).map_err(io)?;
    reader.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut r = Reader { reader, size };
    let magic = r.u32()?;
    // "GGUF" read little-endian, or as some big-endian writers wrote it.
    if magic != 0x4655_4747 && magic != 0x4747_5546 {
        return Err(format!("not a GGUF file (magic 0x{magic:08x})"));
    }
    let magic = match r.u32()? {
        1 => VersionedMagic::GgufV1,
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        version => return Err(format!("GGUF version {version} is not supported")),
    };
    let wide = !matches!(magic, VersionedMagic::GgufV1);
    let tensors = r.length(wide)?;
    let pairs = r.length(wide)?;
    if tensors > MAX_ELEMENTS || pairs > MAX_ELEMENTS {
        return Err(format!(
            "header declares {tensors} tensors and {pairs} metadata keys"
        ));
    }
    let mut metadata = HashMap::new();
    for _ in 0..pairs {
        let key = r.string(wide)?;
        let kind = r.u32()?;
        let value = r.value(kind, wide, 0)?;
        metadata.insert(key, value);
    }
    let mut tensor_infos = HashMap::new();
    let mut others = HashMap::new();
    for _ in 0..tensors {
        let name = r.string(wide)?;
        let dims = r.u32()?;
        if dims > MAX_DIMS {
            return Err(format!(
                "tensor {name:?} has {dims} dimensions, at most {MAX_DIMS}"
            ));
        }
        let mut shape = (0..dims)
            .map(|_| r.length(wide).map(|d| d as usize))
            .collect::<Result<Vec<_>, _>>()?;
        shape.reverse();
        let ggml_type = r.u32()?;
        let offset = r.u64()?;
        if tensor_infos.contains_key(&name) || others.contains_key(&name) {
            return Err(format!("tensor {name:?} is listed twice"));
        }
        match super::gguf::ggml_type_of_number(ggml_type) {
            Some(ggml_dtype) => {
                let shape = Shape::from(shape);
                tensor_infos.insert(
                    name,
                    TensorInfo {
                        ggml_dtype,
                        shape,
                        offset,
                    },
                );
            }
            None => {
                others.insert(
                    name,
                    OtherTensor {
                        ggml_type,
                        shape,
                        offset,
                    },
                );
            }
        }
    }
    let position = r.reader.stream_position().map_err(io)?;
    // As ggml reads it: a power of two, where tensor data starts; anything else would place
    // every tensor at the wrong bytes.
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(v)) if v.is_power_of_two() => u64::from(*v),
        Some(other) => return Err(format!("general.alignment {other:?} is not a power of two")),
    };
    Ok(Header {
        content: Content {
            magic,
            metadata,
            tensor_infos,
            tensor_data_offset: position.div_ceil(alignment) * alignment,
        },
        others,
    })
}

/// Bytes of `values` values in MXFP4 blocks.
pub fn mxfp4_bytes(values: usize) -> usize {
    values / 32 * MXFP4_BLOCK_BYTES
}

fn io(error: std::io::Error) -> String {
    format!("truncated or unreadable header: {error}")
}

struct Reader<'a, R> {
    reader: &'a mut R,
    size: u64,
}

impl<R: Read + Seek> Reader<'_, R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut buf = [0; N];
        self.reader.read_exact(&mut buf).map_err(io)?;
        Ok(buf)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    /// A count or length: 32 bits in version 1, 64 after.
    fn length(&mut self, wide: bool) -> Result<u64, String> {
        if wide {
            self.u64()
        } else {
            self.u32().map(u64::from)
        }
    }

    fn remaining(&mut self) -> Result<u64, String> {
        let at = self.reader.stream_position().map_err(io)?;
        Ok(self.size.saturating_sub(at))
    }

    fn string(&mut self, wide: bool) -> Result<String, String> {
        let len = self.length(wide)?;
        if len > MAX_STRING || len > self.remaining()? {
            return Err(format!("a string of {len} bytes runs past the header"));
        }
        let mut buf = vec![0; len as usize];
        self.reader.read_exact(&mut buf).map_err(io)?;
        // Some writers end strings with NULs.
        while buf.last() == Some(&0) {
            buf.pop();
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    fn value(&mut self, kind: u32, wide: bool, depth: usize) -> Result<Value, String> {
        if depth > MAX_DEPTH {
            return Err("metadata arrays nest too deep".into());
        }
        Ok(match kind {
            0 => Value::U8(u8::from_le_bytes(self.bytes()?)),
            1 => Value::I8(i8::from_le_bytes(self.bytes()?)),
            2 => Value::U16(u16::from_le_bytes(self.bytes()?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.bytes()?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes()?)),
            7 => match u8::from_le_bytes(self.bytes()?) {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("a boolean of value {b}")),
            },
            8 => Value::String(self.string(wide)?),
            9 => {
                let inner = self.u32()?;
                let len = self.length(wide)?;
                if len > MAX_ELEMENTS || len > self.remaining()? {
                    return Err(format!("an array of {len} values runs past the header"));
                }
                let values = (0..len)
                    .map(|_| self.value(inner, wide, depth + 1))
                    .collect::<Result<Vec<_>, _>>()?;
                Value::Array(values)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.bytes()?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes()?)),
            other => return Err(format!("metadata value type {other} is unknown")),
        })
    }
}
