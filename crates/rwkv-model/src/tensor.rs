//! Tensors as they sit in a checkpoint: a dtype, a shape and little-endian bytes that are usually
//! memory-mapped straight from the file.

use std::ops::Range;
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;

/// Element types a checkpoint may store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    BF16,
    F16,
    F32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }

    /// Rounds an f32 to this dtype and back (round to nearest even), as torch does when it
    /// computes in f32 and stores in the tensor's dtype.
    pub fn round_f32(self, x: f32) -> f32 {
        match self {
            DType::BF16 => bf16::from_f32(x).to_f32(),
            DType::F16 => f16::from_f32(x).to_f32(),
            DType::F32 => x,
        }
    }

    /// Encodes f32 values as little-endian bytes of this dtype (rounding to nearest even).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(values.len() * self.size());
        for &v in values {
            match self {
                DType::BF16 => out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
                DType::F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
                DType::F32 => out.extend_from_slice(&v.to_le_bytes()),
            }
        }
        out
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::F32 => "F32",
        };
        f.write_str(name)
    }
}

/// Where a tensor's bytes live.
#[derive(Clone, Debug)]
enum Storage {
    /// A byte range of a memory-mapped file (the checkpoint), shared by all its tensors.
    Mapped(Arc<Mmap>, Range<usize>),
    /// Bytes computed at load time (the folded embedding) or read from a compressed entry.
    Owned(Arc<Vec<u8>>),
}

/// A dense, row-major tensor.
#[derive(Clone, Debug)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    storage: Storage,
}

impl Tensor {
    /// A tensor over `range` of a mapped file. The caller has checked that the range holds exactly
    /// `shape.product() * dtype.size()` bytes inside the map.
    pub(crate) fn mapped(
        dtype: DType,
        shape: Vec<usize>,
        map: Arc<Mmap>,
        range: Range<usize>,
    ) -> Self {
        debug_assert_eq!(range.len(), shape.iter().product::<usize>() * dtype.size());
        Self {
            dtype,
            shape,
            storage: Storage::Mapped(map, range),
        }
    }

    /// A tensor over owned little-endian bytes.
    ///
    /// # Panics
    /// If the byte count does not match the shape; callers build the bytes from the shape.
    pub fn from_bytes(dtype: DType, shape: Vec<usize>, bytes: Vec<u8>) -> Self {
        assert_eq!(
            bytes.len(),
            shape.iter().product::<usize>() * dtype.size(),
            "tensor byte count"
        );
        Self {
            dtype,
            shape,
            storage: Storage::Owned(Arc::new(bytes)),
        }
    }

    /// An f32 tensor with the given values, encoded in `dtype`.
    pub fn from_f32(dtype: DType, shape: Vec<usize>, values: &[f32]) -> Self {
        Self::from_bytes(dtype, shape, dtype.encode(values))
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Mapped(map, range) => &map[range.clone()],
            Storage::Owned(bytes) => bytes,
        }
    }

    /// The values converted to f32 (exact for every supported dtype).
    pub fn to_f32(&self) -> Vec<f32> {
        let bytes = self.bytes();
        match self.dtype {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }

    /// The values as bf16 bit patterns (rounding f16/f32 to nearest even), the device format of
    /// the GPU backend.
    pub fn to_bf16_bits(&self) -> Vec<u16> {
        match self.dtype {
            DType::BF16 => self
                .bytes()
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect(),
            _ => self
                .to_f32()
                .into_iter()
                .map(|v| bf16::from_f32(v).to_bits())
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_round_trip_is_exact_and_rounding_is_to_nearest_even() {
        let t = Tensor::from_f32(DType::BF16, vec![3], &[1.0, -2.5, 3.015625]);
        assert_eq!(t.to_f32(), vec![1.0, -2.5, 3.015625]);
        // 1 + 2^-8 lies exactly between two bf16 values; ties go to the even mantissa (1.0).
        assert_eq!(DType::BF16.round_f32(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(DType::BF16.round_f32(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
    }

    #[test]
    fn f16_and_f32_decode() {
        let t = Tensor::from_f32(DType::F16, vec![2], &[0.5, -1.25]);
        assert_eq!(t.to_f32(), vec![0.5, -1.25]);
        let t = Tensor::from_f32(DType::F32, vec![1, 2], &[0.1, 7.0]);
        assert_eq!(t.to_f32(), vec![0.1, 7.0]);
        assert_eq!(t.to_bf16_bits()[1], bf16::from_f32(7.0).to_bits());
    }
}
