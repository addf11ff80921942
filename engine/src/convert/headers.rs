//! The safetensors headers of the files a conversion writes: expert files whose tensors sit at
//! aligned offsets with padding tensors between them, and base files as the safetensors library
//! writes them.

use safetensors::tensor::Dtype;

use crate::error::Result;
use crate::format::layout::{self, ExpertLayout};

/// A base-model safetensors file, planned.
pub(super) struct BaseFile {
    pub(super) rel: &'static str,
    pub(super) names: Vec<String>,
    /// Length prefix plus padded JSON header.
    pub(super) header: Vec<u8>,
    pub(super) file_bytes: u64,
}

/// The JSON header of one expert file (unpadded): gate, up, down and the `_pad_N` U8 tensors
/// that fill the gaps between them and up to the end of the file, in offset order. Experts kept as
/// GGUF blocks are U8 tensors of their layer's length, and MXFP4 blocks U8 tensors too.
pub(super) fn expert_header_json(
    layout: &ExpertLayout,
    dtype: Dtype,
    layer: usize,
    expert: usize,
) -> String {
    let ggml_types = layout.ggml_types(layer);
    let mut json = format!(
        "{{\"__metadata__\":{{\"format\":\"odmoe\",\"layer\":\"{layer}\",\"expert\":\"{expert}\"}}"
    );
    let mut at = 0;
    let mut pads = 0;
    let mut pad = |json: &mut String, from: u64, to: u64| {
        if to > from {
            json.push_str(&tensor_json(
                &format!("_pad_{pads}"),
                Dtype::U8,
                &[(to - from) as usize],
                from,
                to,
            ));
            pads += 1;
        }
    };
    for (k, tensor) in layout.tensors.iter().enumerate() {
        pad(&mut json, at, tensor.offset);
        let stored = match ggml_types {
            Some(types) => Some(
                types[k]
                    .bytes(tensor.shape[0] * tensor.shape[1])
                    .unwrap_or(0) as u64,
            ),
            // MXFP4 blocks fill their slot.
            None if layout.dtype == layout::MXFP4_DTYPE => Some(tensor.bytes),
            None => None,
        };
        let (dtype, shape, bytes) = match stored {
            Some(bytes) => (Dtype::U8, vec![bytes as usize], bytes),
            None => (dtype, tensor.shape.to_vec(), tensor.bytes),
        };
        json.push_str(&tensor_json(
            &tensor.name,
            dtype,
            &shape,
            tensor.offset,
            tensor.offset + bytes,
        ));
        at = tensor.offset + bytes;
    }
    let last = &layout.tensors[2];
    pad(&mut json, at, layout::align_up(last.offset + last.bytes));
    json.push('}');
    json
}

/// `,"name":{"dtype":..,"shape":[..],"data_offsets":[start,end]}`
fn tensor_json(name: &str, dtype: Dtype, shape: &[usize], start: u64, end: u64) -> String {
    let shape: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!(
        ",{}:{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{start},{end}]}}",
        serde_json::to_string(name).expect("a string serialises"),
        shape.join(",")
    )
}

/// The 8-byte little-endian header length followed by `json` padded with spaces to `room` bytes.
pub(super) fn padded_header(json: String, room: usize) -> Vec<u8> {
    let mut header = Vec::with_capacity(8 + room);
    header.extend_from_slice(&(room as u64).to_le_bytes());
    header.extend_from_slice(json.as_bytes());
    header.resize(8 + room, b' ');
    header
}

/// A base file: its tensors in name order, the header padded to a multiple of 8 bytes as the
/// safetensors library writes it. `stored` gives a tensor's dtype, shape and length as written.
pub(super) fn base_file(
    rel: &'static str,
    names: Vec<String>,
    stored: impl Fn(&str) -> Result<(Dtype, Vec<usize>, u64)>,
) -> Result<BaseFile> {
    let mut json = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut at = 0u64;
    for name in &names {
        let (dtype, shape, bytes) = stored(name)?;
        let end = at + bytes;
        json.push_str(&tensor_json(name, dtype, &shape, at, end));
        at = end;
    }
    json.push('}');
    let room = json.len().next_multiple_of(8);
    let header = padded_header(json, room);
    Ok(BaseFile {
        rel,
        names,
        file_bytes: header.len() as u64 + at,
        header,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::layout::ExpertTensor;

    #[test]
    fn expert_header_covers_the_file_without_holes() {
        let layout = ExpertLayout {
            dtype: "BF16".into(),
            ggml_types: None,
            file_bytes: 4096 * 5,
            data_offset: 4096,
            tensors: [
                ExpertTensor {
                    name: "gate".into(),
                    offset: 0,
                    bytes: 3000,
                    shape: [30, 50],
                },
                ExpertTensor {
                    name: "up".into(),
                    offset: 4096,
                    bytes: 3000,
                    shape: [30, 50],
                },
                ExpertTensor {
                    name: "down".into(),
                    offset: 8192,
                    bytes: 3000,
                    shape: [50, 30],
                },
            ],
        };
        let json = expert_header_json(&layout, Dtype::BF16, 3, 17);
        let mut file = padded_header(json, 4096 - 8);
        file.resize(4096 * 4, 0);
        let st = safetensors::SafeTensors::deserialize(&file).unwrap();
        let mut names = st.names();
        names.sort_unstable();
        assert_eq!(names, ["_pad_0", "_pad_1", "_pad_2", "down", "gate", "up"]);
        assert_eq!(
            st.tensor("_pad_2").unwrap().data().len(),
            4096 * 3 - 8192 - 3000
        );
        let (_, meta) = safetensors::SafeTensors::read_metadata(&file).unwrap();
        let meta = meta.metadata().as_ref().unwrap();
        assert_eq!(meta["layer"], "3");
        assert_eq!(meta["expert"], "17");
    }
}
