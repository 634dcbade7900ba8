//! Choosing the compute backend once at start-up: CUDA where a GPU is present (and the binary
//! was built with the `cuda` feature), else the CPU.

use rwkv_cpu::{CpuBackend, CpuOptions, Precision};
use rwkv_model::{Backend, ModelWeights};

/// `--backend` values.
#[derive(clap::ValueEnum, serde::Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// CUDA if the machine has a GPU, else the CPU. A GPU that is there but cannot be used
    /// (a missing `--gpus` device, out of memory, NCCL missing for several GPUs) is an error,
    /// not a quiet fallback to CPU speed.
    Auto,
    /// The CPU backend.
    Cpu,
    /// The CUDA backend on GPU 0; an error where none is usable.
    Cuda,
}

/// CPU weight handling for `--backend cpu` (and the CPU fallback of `auto`).
#[derive(clap::ValueEnum, serde::Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CpuPrecision {
    /// f32 weights: the exact reference numerics.
    F32,
    /// bf16 weights read directly by SIMD kernels (faster, ~1e-6 from the reference).
    #[default]
    Bf16,
    /// int8 weights with per-row scales (fastest decode, ~1e-2 from the reference).
    Int8,
}

/// How the CUDA backend feeds its bf16 GEMMs (`--gpu-precision`).
#[derive(clap::ValueEnum, serde::Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GpuPrecision {
    /// Each f32 activation as two bf16 halves: f32-class accuracy (~1e-5 from the reference),
    /// at twice the GEMM work.
    #[default]
    Split,
    /// Activations rounded to bf16 once, like the reference's `cuda bf16`: ~1.5x faster
    /// prefill, ~1e-3 relative logit error on trained weights.
    Bf16,
}

/// `--gpu-precision` for the one-shot commands (`forward`, `generate`).
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct GpuArgs {
    /// How the CUDA backend feeds its GEMMs: `split` (f32-class accuracy) or `bf16` (faster).
    #[arg(long, value_enum, default_value = "split")]
    pub gpu_precision: GpuPrecision,
}

impl GpuArgs {
    /// These settings with the CPU's.
    pub fn with_cpu(self, cpu: CpuPrecision) -> Precisions {
        Precisions {
            cpu,
            gpu: self.gpu_precision,
        }
    }
}

/// The numerics asked for, per backend (each applies only to its backend).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Precisions {
    pub cpu: CpuPrecision,
    pub gpu: GpuPrecision,
}

/// Opens the chosen backend with `slots` state slots, saying on stderr which one runs.
pub fn open(
    weights: &ModelWeights,
    slots: usize,
    kind: BackendKind,
    precisions: Precisions,
) -> anyhow::Result<Box<dyn Backend>> {
    open_on(weights, slots, kind, precisions, &[0])
}

/// Like [`open`], on GPUs `devices` when the backend is CUDA: one device runs the whole model,
/// several shard it (tensor parallel over NCCL, rank i on `devices[i]`).
pub fn open_on(
    weights: &ModelWeights,
    slots: usize,
    kind: BackendKind,
    precisions: Precisions,
    devices: &[usize],
) -> anyhow::Result<Box<dyn Backend>> {
    match kind {
        BackendKind::Cuda => return open_cuda(weights, slots, devices, precisions.gpu),
        BackendKind::Auto => match gpu_absence() {
            None => return open_cuda(weights, slots, devices, precisions.gpu),
            Some(why) => {
                eprintln!("[rwkv] no GPU ({why}); running on the CPU");
                tracing::warn!("no GPU ({why}); running on the CPU");
            }
        },
        BackendKind::Cpu => {}
    }
    let precision = match precisions.cpu {
        CpuPrecision::F32 => Precision::F32,
        CpuPrecision::Bf16 => Precision::Bf16,
        CpuPrecision::Int8 => Precision::Int8,
    };
    let options = CpuOptions {
        precision,
        ..CpuOptions::default()
    };
    Ok(Box::new(CpuBackend::with_options(weights, slots, options)))
}

/// Whether the backend will be CUDA: `cuda`, or `auto` on a machine with a GPU.
pub fn gpu_likely(kind: BackendKind) -> bool {
    match kind {
        BackendKind::Cpu => false,
        BackendKind::Cuda => true,
        BackendKind::Auto => gpu_absence().is_none(),
    }
}

/// Why `auto` runs on the CPU (no CUDA in the binary, no driver, or no device the driver can
/// use: containers often carry the driver library without a GPU, where counting devices
/// fails), or `None` when the machine has a GPU, which `auto` then must use.
#[cfg(feature = "cuda")]
fn gpu_absence() -> Option<String> {
    if !rwkv_cuda::driver_available() {
        return Some("the CUDA driver library is not installed".into());
    }
    match rwkv_cuda::device_count() {
        Ok(0) => Some("the CUDA driver sees no device".into()),
        Ok(_) => None,
        Err(e) => Some(format!("the CUDA driver cannot count devices: {e}")),
    }
}

#[cfg(not(feature = "cuda"))]
fn gpu_absence() -> Option<String> {
    Some("this binary was built without the `cuda` feature".into())
}

#[cfg(feature = "cuda")]
fn open_cuda(
    weights: &ModelWeights,
    slots: usize,
    devices: &[usize],
    precision: GpuPrecision,
) -> anyhow::Result<Box<dyn Backend>> {
    // Probe first: creating a CUDA context where libcuda is absent would panic inside cudarc.
    anyhow::ensure!(
        rwkv_cuda::driver_available(),
        "the CUDA driver library is not installed"
    );
    let options = rwkv_cuda::CudaOptions {
        precision: match precision {
            GpuPrecision::Split => rwkv_cuda::GemmPrecision::Split,
            GpuPrecision::Bf16 => rwkv_cuda::GemmPrecision::Bf16,
        },
        graphs: graphs_wanted(std::env::var("RWKV_CUDA_GRAPHS").ok().as_deref())?,
    };
    let backend: Box<dyn Backend> = match devices {
        [one] => Box::new(rwkv_cuda::CudaBackend::with_options(
            weights, slots, *one, options,
        )?),
        several => Box::new(rwkv_cuda::tensor_parallel(
            weights, slots, several, options,
        )?),
    };
    eprintln!("[rwkv] running on {}", backend.name());
    Ok(backend)
}

/// `RWKV_CUDA_GRAPHS`: unset, `1`/`on`/`true` replay decode steps from CUDA graphs (the
/// default); `0`/`off`/`false` launch every kernel one by one (the operator's way out should a
/// driver misbehave with graphs).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn graphs_wanted(value: Option<&str>) -> anyhow::Result<bool> {
    match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("" | "1" | "on" | "true") => Ok(true),
        Some("0" | "off" | "false") => Ok(false),
        Some(other) => anyhow::bail!("RWKV_CUDA_GRAPHS={other:?}: expected on or off"),
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(
    _weights: &ModelWeights,
    _slots: usize,
    _devices: &[usize],
    _precision: GpuPrecision,
) -> anyhow::Result<Box<dyn Backend>> {
    anyhow::bail!("this binary was built without the `cuda` feature")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_graphs_switch_reads_on_and_off_and_refuses_anything_else() {
        for on in [None, Some(""), Some("1"), Some("on"), Some("TRUE")] {
            assert!(graphs_wanted(on).unwrap(), "{on:?}");
        }
        for off in [Some("0"), Some("off"), Some(" False ")] {
            assert!(!graphs_wanted(off).unwrap(), "{off:?}");
        }
        let err = graphs_wanted(Some("maybe")).unwrap_err().to_string();
        assert!(err.contains("RWKV_CUDA_GRAPHS"), "{err}");
    }
}
