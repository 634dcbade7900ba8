//! Opening checkpoint files: PyTorch `.pth` (zip + pickle) and `.safetensors`, memory-mapped.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Cursor;
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
        let tensors = if map.starts_with(b"PK\x03\x04") {
            read_pth(&path, &map)?
        } else if map.len() >= 8 {
            read_safetensors(&path, &map)?
        } else {
            return Err(ModelError::format(
                &path,
                "file is too short to be a checkpoint",
            ));
        };
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

fn read_safetensors(path: &Path, map: &Arc<Mmap>) -> Result<BTreeMap<String, Tensor>> {
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(map).map_err(|e| {
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
        // read_metadata has validated the offsets against the buffer and the shapes.
        let range = base + start..base + end;
        out.insert(
            name,
            Tensor::mapped(dtype, info.shape.clone(), map.clone(), range),
        );
    }
    Ok(out)
}

fn read_pth(path: &Path, map: &Arc<Mmap>) -> Result<BTreeMap<String, Tensor>> {
    let zip_err =
        |e: zip::result::ZipError| ModelError::format(path, format!("bad zip archive: {e}"));
    let mut archive = zip::ZipArchive::new(Cursor::new(&map[..])).map_err(zip_err)?;
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
    let pkl = read_entry(&mut archive, &pkl_name).map_err(zip_err)?;
    let dict = pickle::read_state_dict(&pkl).map_err(|reason| ModelError::Pickle {
        path: path.to_owned(),
        reason,
    })?;
    let mut out = BTreeMap::new();
    for (name, tref) in dict {
        let tensor = load_storage_view(path, map, &mut archive, &prefix, &name, &tref)?;
        out.insert(name, tensor);
    }
    Ok(out)
}

fn read_entry(
    archive: &mut zip::ZipArchive<Cursor<&[u8]>>,
    name: &str,
) -> zip::result::ZipResult<Vec<u8>> {
    use std::io::Read;
    let mut entry = archive.by_name(name)?;
    let mut buf = Vec::with_capacity(entry.size().min(1 << 30) as usize);
    entry.read_to_end(&mut buf)?;
    Ok(buf)
}

/// Resolves a pickled tensor to bytes: a view into the map for stored (uncompressed) entries,
/// which is what `torch.save` writes, or an owned copy for compressed ones.
fn load_storage_view(
    path: &Path,
    map: &Arc<Mmap>,
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
    let numel: usize = tref.shape.iter().product();
    let elem = dtype.size() as u64;
    let start = tref.offset * elem;
    let len = numel as u64 * elem;
    let entry_name = format!("{prefix}data/{}", tref.key);
    let bounds_err = |file_len| ModelError::OutOfBounds {
        path: path.to_owned(),
        name: name.to_owned(),
        offset: start,
        len,
        file_len,
    };
    if tref.offset + numel as u64 > tref.storage_numel {
        return Err(bounds_err(tref.storage_numel * elem));
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
    if start + len > size {
        return Err(bounds_err(size));
    }
    if compressed {
        let bytes = read_entry(archive, &entry_name)
            .map_err(|e| ModelError::format(path, e.to_string()))?;
        let range = start as usize..(start + len) as usize;
        return Ok(Tensor::from_bytes(
            dtype,
            tref.shape.clone(),
            bytes[range].to_vec(),
        ));
    }
    let abs = data_start + start;
    if abs + len > map.len() as u64 {
        return Err(bounds_err(map.len() as u64));
    }
    let range = abs as usize..(abs + len) as usize;
    Ok(Tensor::mapped(
        dtype,
        tref.shape.clone(),
        map.clone(),
        range,
    ))
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
