//! Results the host needs from the device in the middle of a forward pass (a layer's routing
//! scores, the predictor's guesses), taken in one read per layer and counted.
//!
//! On a GPU every read back waits for the device to finish all it was given: two reads in a
//! layer are two stalls per layer per token. The count is kept on the CPU build too, where a
//! read is a copy, so a test can hold a decode step to one read per layer on any device.

use std::cell::Cell;

use candle_core::{D, DType, Tensor};

use crate::error::Result;

thread_local! {
    static READS: Cell<u64> = const { Cell::new(0) };
}

/// Reads back so far on this thread (a forward pass runs on one thread).
pub fn count() -> u64 {
    READS.with(Cell::get)
}

/// The rows of each of `tensors` (`[T, n_i]`, the same `T`), in f32, from one read: they are
/// joined along their columns on the device first. No read at all when there is nothing to read.
pub fn rows(tensors: &[&Tensor]) -> Result<Vec<Vec<Vec<f32>>>> {
    let widths: Vec<usize> = tensors
        .iter()
        .map(|t| t.dim(D::Minus1))
        .collect::<candle_core::Result<_>>()?;
    let Some(first) = tensors.first() else {
        return Ok(Vec::new());
    };
    let positions = first.dim(0)?;
    if widths.iter().sum::<usize>() == 0 || positions == 0 {
        return Ok(widths.iter().map(|_| vec![Vec::new(); positions]).collect());
    }
    let joined: Vec<Tensor> = tensors
        .iter()
        .zip(&widths)
        .filter(|(_, width)| **width > 0)
        .map(|(t, _)| t.to_dtype(DType::F32))
        .collect::<candle_core::Result<_>>()?;
    let joined = if joined.len() == 1 {
        joined.into_iter().next().expect("one tensor")
    } else {
        Tensor::cat(&joined, 1)?
    };
    let read = joined.to_vec2::<f32>()?;
    READS.with(|reads| reads.set(reads.get() + 1));
    let mut out = Vec::with_capacity(tensors.len());
    let mut start = 0;
    for width in widths {
        out.push(
            read.iter()
                .map(|row| row[start..start + width].to_vec())
                .collect(),
        );
        start += width;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn tensors_come_back_whole_from_one_read() {
        let device = Device::Cpu;
        let a = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &device).unwrap();
        let b = Tensor::new(&[[5f32], [6.0]], &device)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let empty = Tensor::zeros((2, 0), DType::F32, &device).unwrap();
        let before = count();
        let out = rows(&[&a, &empty, &b]).unwrap();
        assert_eq!(count() - before, 1);
        assert_eq!(
            out,
            vec![
                vec![vec![1.0, 2.0], vec![3.0, 4.0]],
                vec![vec![], vec![]],
                vec![vec![5.0], vec![6.0]],
            ]
        );
        assert_eq!(rows(&[&empty]).unwrap(), vec![vec![Vec::<f32>::new(); 2]]);
        assert_eq!(count() - before, 1, "nothing to read is no read");
    }
}
