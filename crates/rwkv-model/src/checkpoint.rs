//! Opening checkpoint files: PyTorch `.pth` (zip + pickle) and `.safetensors`, memory-mapped.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Cursor;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{ModelError, Result};
use crate::pickle::{self, StorageKind, TensorRef};
use crate::tensor::{DType, Tensor};

/// All tensors of one checkpoint file, by name.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    tensors: BTreeMap<String, Tensor>,
}

impl Checkpoint {
    /// Opens a `.pth` or `.safetensors` file; the format is told by the file's first bytes.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        // SAFETY: the map is read-only; a checkpoint changed underneath a running server is an
        // operator error that cannot cause undefined behaviour beyond wrong numbers, as every
        // access goes through bounds-checked slices.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
        let map = Arc::new(map);
        let tensors = read_tensors(&path, Backing::Mapped(&map))?;
        Ok(Self { path, tensors })
    }

    /// Parses a `.pth` or `.safetensors` file held in memory, copying each tensor's bytes.
    /// `path` only names the source in errors. This is the entry point of the fuzz targets.
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: &[u8]) -> Result<Self> {
        let path = path.into();
        let tensors = read_tensors(&path, Backing::Bytes(bytes))?;
        Ok(Self { path, tensors })
    }

    /// Builds a checkpoint from tensors already in memory (tests, generated models).
    pub fn from_tensors(path: impl Into<PathBuf>, tensors: BTreeMap<String, Tensor>) -> Self {
        Self {
            path: path.into(),
            tensors,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// The tensor called `name`, or an error naming the file and the tensor.
    pub fn require(&self, name: &str) -> Result<&Tensor> {
        self.get(name).ok_or_else(|| ModelError::MissingTensor {
            path: self.path.clone(),
            name: name.to_owned(),
        })
    }

    /// SHA-256 over every tensor's name, dtype, shape and bytes, in name order.
    ///
    /// It identifies the weights, not the file: the same model saved as `.pth` and as
    /// `.safetensors` has the same fingerprint. Session exports are bound to it, so a state is never
    /// imported into a different model. Hashing reads every byte once (about a second per GB).
    pub fn fingerprint(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        for (name, tensor) in &self.tensors {
            hasher.update((name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            hasher.update([tensor.dtype() as u8]);
            hasher.update((tensor.shape().len() as u64).to_le_bytes());
            for &d in tensor.shape() {
                hasher.update((d as u64).to_le_bytes());
            }
            hasher.update(tensor.bytes());
        }
        hasher.finalize().into()
    }

    /// Writes every tensor to a `.safetensors` file (used by `rwkv convert` and tests).
    pub fn save_safetensors(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
        let views = tensors
            .iter()
            .map(|(name, t)| {
                let dtype = match t.dtype() {
                    DType::BF16 => safetensors::Dtype::BF16,
                    DType::F16 => safetensors::Dtype::F16,
                    DType::F32 => safetensors::Dtype::F32,
                };
                let view =
                    safetensors::tensor::TensorView::new(dtype, t.shape().to_vec(), t.bytes())
                        .map_err(|e| ModelError::format(path, format!("tensor `{name}`: {e}")))?;
                Ok((name.clone(), view))
            })
            .collect::<Result<Vec<_>>>()?;
        safetensors::serialize_to_file(views, None, path)
            .map_err(|e| ModelError::format(path, e.to_string()))
    }
}

/// The bytes a checkpoint is parsed from, and how its tensors keep them.
#[derive(Clone, Copy)]
enum Backing<'a> {
    /// A mapped file: tensors are views into the map.
    Mapped(&'a Arc<Mmap>),
    /// A buffer: tensors copy their bytes out of it.
    Bytes(&'a [u8]),
}

impl Backing<'_> {
    fn data(&self) -> &[u8] {
        match self {
            Backing::Mapped(map) => map,
            Backing::Bytes(bytes) => bytes,
        }
    }

    /// A tensor over `range`, which the caller has checked lies inside the data and holds
    /// exactly the bytes of `shape`.
    fn tensor(&self, dtype: DType, shape: Vec<usize>, range: Range<usize>) -> Tensor {
        match self {
            Backing::Mapped(map) => Tensor::mapped(dtype, shape, Arc::clone(map), range),
            Backing::Bytes(bytes) => Tensor::from_bytes(dtype, shape, bytes[range].to_vec()),
        }
    }
}

/// Tells the format by the first bytes and reads every tensor.
fn read_tensors(path: &Path, src: Backing<'_>) -> Result<BTreeMap<String, Tensor>> {
    let data = src.data();
    if data.starts_with(b"PK\x03\x04") {
        read_pth(path, src)
    } else if data.len() >= 8 {
        read_safetensors(path, src)
    } else {
        Err(ModelError::format(
            path,
            "file is too short to be a checkpoint",
        ))
    }
}

/// Bytes of a tensor of `shape` and `dtype`, or `None` when that overflows.
fn byte_len(shape: &[usize], dtype: DType) -> Option<usize> {
    shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
}

fn read_safetensors(path: &Path, src: Backing<'_>) -> Result<BTreeMap<String, Tensor>> {
    let data = src.data();
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(data).map_err(|e| {
        ModelError::format(
            path,
            format!("neither a zip (.pth) nor a valid safetensors file: {e}"),
        )
    })?;
    let base = 8 + header_len;
    let mut out = BTreeMap::new();
    for (name, info) in meta.tensors() {
        let dtype = match info.dtype {
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::F32 => DType::F32,
            other => {
                return Err(ModelError::BadDType {
                    path: path.to_owned(),
                    name,
                    dtype: format!("{other:?}"),
                })
            }
        };
        let (start, end) = info.data_offsets;
        // read_metadata validates the offsets against the buffer and the shapes; check again
        // with checked arithmetic so that a gap in its validation cannot become a panic.
        let range = base.checked_add(start).zip(base.checked_add(end));
        let range = match range {
            Some((s, e)) if s <= e && e <= data.len() => s..e,
            _ => {
                return Err(ModelError::format(
                    path,
                    format!("tensor `{name}` lies outside the file"),
                ))
            }
        };
        if byte_len(&info.shape, dtype) != Some(range.len()) {
            return Err(ModelError::format(
                path,
                format!(
                    "tensor `{name}`: shape {:?} does not match its {} bytes",
                    info.shape,
                    range.len()
                ),
            ));
        }
        out.insert(name, src.tensor(dtype, info.shape.clone(), range));
    }
    Ok(out)
}

fn read_pth(path: &Path, src: Backing<'_>) -> Result<BTreeMap<String, Tensor>> {
    let zip_err =
        |e: zip::result::ZipError| ModelError::format(path, format!("bad zip archive: {e}"));
    let data = src.data();
    let mut archive = zip::ZipArchive::new(Cursor::new(data)).map_err(zip_err)?;
    let pkl_name = archive
        .file_names()
        .find(|n| n.ends_with("/data.pkl") || *n == "data.pkl")
        .map(str::to_owned)
        .ok_or_else(|| {
            ModelError::format(path, "zip archive has no data.pkl: not a torch.save file")
        })?;
    let prefix = pkl_name
        .strip_suffix("data.pkl")
        .unwrap_or_default()
        .to_owned();
    let pkl = read_entry(&mut archive, &pkl_name, MAX_PICKLE_BYTES + 1).map_err(zip_err)?;
    if pkl.len() as u64 > MAX_PICKLE_BYTES {
        return Err(ModelError::format(
            path,
            format!(
                "data.pkl is larger than {} MiB; a state dict's pickle is a few MiB at most",
                MAX_PICKLE_BYTES >> 20
            ),
        ));
    }
    let dict = pickle::read_state_dict(&pkl).map_err(|reason| ModelError::Pickle {
        path: path.to_owned(),
        reason,
    })?;
    let mut out = BTreeMap::new();
    for (name, tref) in dict {
        let tensor = load_storage_view(path, src, &mut archive, &prefix, &name, &tref)?;
        out.insert(name, tensor);
    }
    Ok(out)
}

/// Largest `data.pkl` read (a 14B model's has a few thousand entries, well under 1 MiB).
const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// The first `limit` bytes of an entry, decompressed: no more, so a small deflated entry that
/// expands to gigabytes (a zip bomb) costs only what the caller needs of it.
fn read_entry(
    archive: &mut zip::ZipArchive<Cursor<&[u8]>>,
    name: &str,
    limit: u64,
) -> zip::result::ZipResult<Vec<u8>> {
    use std::io::Read;
    let entry = archive.by_name(name)?;
    // The declared size is only a hint that a hostile header can set to anything: the buffer
    // starts no larger than the compressed bytes actually present (at least a few KiB, so small
    // entries read in one go) and grows with what is really decompressed.
    let hint = entry
        .size()
        .min(entry.compressed_size().max(1 << 16))
        .min(limit);
    let mut buf = Vec::with_capacity(usize::try_from(hint).unwrap_or(0));
    entry.take(limit).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Resolves a pickled tensor to bytes: a view into the map for stored (uncompressed) entries,
/// which is what `torch.save` writes, or an owned copy for compressed ones.
fn load_storage_view(
    path: &Path,
    src: Backing<'_>,
    archive: &mut zip::ZipArchive<Cursor<&[u8]>>,
    prefix: &str,
    name: &str,
    tref: &TensorRef,
) -> Result<Tensor> {
    let dtype = match tref.kind {
        StorageKind::BF16 => DType::BF16,
        StorageKind::F16 => DType::F16,
        StorageKind::F32 => DType::F32,
    };
    check_contiguous(path, name, tref)?;
    let elem = dtype.size() as u64;
    let entry_name = format!("{prefix}data/{}", tref.key);
    let bounds_err = |offset: u64, len: u64, file_len: u64| ModelError::OutOfBounds {
        path: path.to_owned(),
        name: name.to_owned(),
        offset,
        len,
        file_len,
    };
    // Every size below comes from the file, so all arithmetic is checked: an overflow is a
    // tensor that cannot fit, not a panic or a wrapped bound.
    let len = byte_len(&tref.shape, dtype)
        .ok_or_else(|| bounds_err(tref.offset, u64::MAX, tref.storage_numel))? as u64;
    let numel = len / elem;
    let start = tref
        .offset
        .checked_mul(elem)
        .ok_or_else(|| bounds_err(u64::MAX, len, tref.storage_numel))?;
    let end = start
        .checked_add(len)
        .ok_or_else(|| bounds_err(start, len, tref.storage_numel))?;
    let storage_bytes = tref.storage_numel.saturating_mul(elem);
    if tref
        .offset
        .checked_add(numel)
        .is_none_or(|e| e > tref.storage_numel)
    {
        return Err(bounds_err(start, len, storage_bytes));
    }
    let (compressed, data_start, size) = {
        let entry = archive
            .by_name(&entry_name)
            .map_err(|_| ModelError::MissingTensor {
                path: path.to_owned(),
                name: format!("{name} (storage entry {entry_name})"),
            })?;
        let stored = entry.compression() != zip::CompressionMethod::Stored;
        (stored, entry.data_start(), entry.size())
    };
    if end > size {
        return Err(bounds_err(start, len, size));
    }
    if compressed {
        // Only the bytes up to this tensor's end are needed.
        let bytes = read_entry(archive, &entry_name, end)
            .map_err(|e| ModelError::format(path, e.to_string()))?;
        // The entry may decompress to fewer bytes than its header declares.
        let range = (usize::try_from(start).ok(), usize::try_from(end).ok());
        let view = match range {
            (Some(s), Some(e)) => bytes.get(s..e),
            _ => None,
        };
        let view = view.ok_or_else(|| bounds_err(start, len, bytes.len() as u64))?;
        return Ok(Tensor::from_bytes(dtype, tref.shape.clone(), view.to_vec()));
    }
    let file_len = src.data().len() as u64;
    let abs = data_start
        .checked_add(start)
        .filter(|a| a.checked_add(len).is_some_and(|e| e <= file_len))
        .ok_or_else(|| bounds_err(start, len, file_len))?;
    let range = abs as usize..(abs + len) as usize;
    Ok(src.tensor(dtype, tref.shape.clone(), range))
}

fn check_contiguous(path: &Path, name: &str, tref: &TensorRef) -> Result<()> {
    let mut expected = 1usize;
    let mut ok = tref.shape.len() == tref.stride.len();
    for (&dim, &stride) in tref.shape.iter().zip(&tref.stride).rev() {
        ok &= dim <= 1 || stride == expected;
        expected = expected.saturating_mul(dim);
    }
    if ok {
        Ok(())
    } else {
        Err(ModelError::format(
            path,
            format!(
                "tensor `{name}` is not contiguous (shape {:?}, stride {:?})",
                tref.shape, tref.stride
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(name)
    }

    /// LONG1 with 8 bytes: any non-negative i64.
    fn long(v: u64) -> Vec<u8> {
        let mut out = vec![0x8a, 8];
        out.extend_from_slice(&v.to_le_bytes());
        out
    }

    fn ints(values: &[u64]) -> Vec<u8> {
        let mut out = vec![b'('];
        for &v in values {
            out.extend(long(v));
        }
        out.push(b't');
        out
    }

    /// `{'w': _rebuild_tensor_v2(<bf16 storage "0", numel>, offset, shape, stride, False,
    /// OrderedDict())}` with every number chosen by the caller.
    fn pickle(numel: u64, offset: u64, shape: &[u64], stride: &[u64]) -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}', b'(', b'X', 1, 0, 0, 0, b'w'];
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.extend_from_slice(b"(X\x07\x00\x00\x00storagectorch\nBFloat16Storage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu");
        p.extend(long(numel));
        p.extend_from_slice(b"tQ");
        p.extend(long(offset));
        p.extend(ints(shape));
        p.extend(ints(stride));
        p.extend_from_slice(b"\x89ccollections\nOrderedDict\n)RtRu.");
        p
    }

    fn pth(pkl: &[u8], storage: &[u8], method: zip::CompressionMethod) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default();
        w.start_file(
            "archive/data.pkl",
            opts.compression_method(zip::CompressionMethod::Stored),
        )
        .unwrap();
        w.write_all(pkl).unwrap();
        w.start_file("archive/data/0", opts.compression_method(method))
            .unwrap();
        w.write_all(storage).unwrap();
        w.finish().unwrap().into_inner()
    }

    #[test]
    fn from_bytes_reads_what_open_reads() {
        for name in ["rwkv6-tiny-c128-l2.pth", "rwkv6-tiny-c128-l2.safetensors"] {
            let path = fixture(name);
            let opened = Checkpoint::open(&path).unwrap();
            let parsed = Checkpoint::from_bytes(name, &std::fs::read(&path).unwrap()).unwrap();
            assert_eq!(opened.fingerprint(), parsed.fingerprint(), "{name}");
        }
    }

    #[test]
    fn small_pth_loads_stored_and_deflated() {
        for method in [
            zip::CompressionMethod::Stored,
            zip::CompressionMethod::Deflated,
        ] {
            let bytes = pth(&pickle(6, 0, &[2, 3], &[3, 1]), &[1; 12], method);
            let ckpt = Checkpoint::from_bytes("t.pth", &bytes).unwrap();
            assert_eq!(ckpt.require("w").unwrap().shape(), [2, 3]);
            assert_eq!(ckpt.require("w").unwrap().bytes(), [1; 12]);
        }
    }

    /// A deflated entry that expands far beyond what is needed: a storage is read only up to
    /// its tensor's end, and a pickle over the cap is refused before it is parsed.
    #[test]
    fn deflated_entries_are_read_only_as_far_as_needed() {
        let mut storage = vec![0u8; 32 << 20];
        storage[..12].fill(1);
        let bytes = pth(
            &pickle(6, 0, &[2, 3], &[3, 1]),
            &storage,
            zip::CompressionMethod::Deflated,
        );
        assert!(bytes.len() < 1 << 20, "{} bytes", bytes.len());
        let ckpt = Checkpoint::from_bytes("t.pth", &bytes).unwrap();
        assert_eq!(ckpt.require("w").unwrap().bytes(), [1; 12]);

        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        w.start_file("archive/data.pkl", opts).unwrap();
        w.write_all(&vec![b'N'; (MAX_PICKLE_BYTES + 1) as usize])
            .unwrap();
        let bomb = w.finish().unwrap().into_inner();
        let err = Checkpoint::from_bytes("bomb.pth", &bomb).unwrap_err();
        assert!(
            err.to_string().contains("data.pkl is larger than 64 MiB"),
            "{err}"
        );
    }

    /// Regression (found writing the `pth` fuzz target): shape products and offsets overflowed
    /// `usize`/`u64` arithmetic (a panic with overflow checks, a wrapped bound without).
    #[test]
    fn overflowing_shapes_and_offsets_are_errors_not_panics() {
        let cases: [(u64, &[u64], &[u64]); 4] = [
            (0, &[1 << 32, 1 << 32, 2], &[1 << 33, 2, 1]),
            (0, &[1 << 62, 4], &[4, 1]),
            (1 << 62, &[2, 3], &[3, 1]),
            (u64::MAX >> 1, &[1], &[1]),
        ];
        for method in [
            zip::CompressionMethod::Stored,
            zip::CompressionMethod::Deflated,
        ] {
            for (offset, shape, stride) in cases {
                let bytes = pth(&pickle(6, offset, shape, stride), &[1; 12], method);
                let err = Checkpoint::from_bytes("t.pth", &bytes).unwrap_err();
                assert!(
                    matches!(err, ModelError::OutOfBounds { .. }),
                    "{offset} {shape:?}: {err}"
                );
            }
        }
    }

    #[test]
    fn storage_larger_than_its_entry_is_out_of_bounds() {
        for method in [
            zip::CompressionMethod::Stored,
            zip::CompressionMethod::Deflated,
        ] {
            let bytes = pth(&pickle(600, 0, &[20, 30], &[30, 1]), &[1; 12], method);
            let err = Checkpoint::from_bytes("t.pth", &bytes).unwrap_err();
            assert!(matches!(err, ModelError::OutOfBounds { .. }), "{err}");
        }
    }
}
