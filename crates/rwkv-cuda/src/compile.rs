//! Kernel sources and their compilation with NVRTC at run time.
//!
//! Every file in `kernels/*.cu` is embedded with `include_str!`, prefixed with the shared
//! prelude `kernels/common.cuh` (NVRTC from PyPI ships no CUDA headers, so nothing is
//! `#include`d) and compiled for the device's own architecture (`--gpu-architecture=sm_XY`
//! from its compute capability). Results are cached for the life of the process by
//! (kernel file, defines, arch), so several backends or tensor-parallel ranks share one compile.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use crate::error::{CudaError, Result};

/// The prelude prepended to every kernel file.
pub const PRELUDE: &str = include_str!("../kernels/common.cuh");

/// One kernel source file and the functions it exports (symbols `{op}_{dtype}`).
#[derive(Debug)]
pub struct KernelFile {
    /// File name under `kernels/`.
    pub name: &'static str,
    pub source: &'static str,
    pub functions: &'static [&'static str],
    /// Whether the file needs `-DHEAD_SIZE=N`.
    pub needs_head_size: bool,
}

/// Every kernel file. The NVRTC test checks this list against the `kernels/` folder.
pub const KERNEL_FILES: &[KernelFile] = &[
    KernelFile {
        name: "convert.cu",
        source: include_str!("../kernels/convert.cu"),
        functions: &[
            "to_bf16_f32",
            "to_f32_bf16",
            "gemm_out_f32",
            "gemm_out_bf16",
            "kvrg_out_f32",
        ],
        needs_head_size: false,
    },
    KernelFile {
        name: "embed.cu",
        source: include_str!("../kernels/embed.cu"),
        functions: &["embedding_bf16"],
        needs_head_size: false,
    },
    KernelFile {
        name: "norm.cu",
        source: include_str!("../kernels/norm.cu"),
        functions: &[
            "layer_norm_f32",
            "layer_norm_bf16",
            "residual_layer_norm_f32",
            "group_norm_gate_f32",
        ],
        needs_head_size: false,
    },
    KernelFile {
        name: "sampling.cu",
        source: include_str!("../kernels/sampling.cu"),
        functions: &["softmax_f32", "row_mass_f32", "topk_f32"],
        needs_head_size: false,
    },
    KernelFile {
        name: "token_mix.cu",
        source: include_str!("../kernels/token_mix.cu"),
        functions: &["tmix_shift_f32", "tmix_mix_f32", "cmix_shift_f32"],
        needs_head_size: false,
    },
    KernelFile {
        name: "wkv6.cu",
        source: include_str!("../kernels/wkv6.cu"),
        functions: &["wkv6_decode_f32", "wkv6_prefill_f32"],
        needs_head_size: true,
    },
];

/// Looks a kernel file up by name.
pub fn kernel_file(name: &str) -> Option<&'static KernelFile> {
    KERNEL_FILES.iter().find(|f| f.name == name)
}

/// The NVRTC architecture name for a compute capability, e.g. (9, 0) -> `sm_90`.
pub fn arch_name(major: i32, minor: i32) -> String {
    format!("sm_{major}{minor}")
}

/// Whether the NVRTC library can be opened (probing never panics, unlike a first NVRTC call).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library under its usual names; no symbol is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// What one compilation is keyed by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CompileKey {
    pub file: &'static str,
    /// `NAME=value` pairs, sorted.
    pub defines: Vec<String>,
    pub arch: String,
}

impl CompileKey {
    pub fn new(file: &'static str, defines: &[(&str, String)], arch: &str) -> Self {
        let mut defines: Vec<String> = defines.iter().map(|(k, v)| format!("{k}={v}")).collect();
        defines.sort();
        Self {
            file,
            defines,
            arch: arch.to_owned(),
        }
    }

    /// The NVRTC command line for this key.
    pub fn options(&self) -> Vec<String> {
        let mut opts = vec![format!("--gpu-architecture={}", self.arch)];
        opts.extend(self.defines.iter().map(|d| format!("-D{d}")));
        opts
    }
}

fn cache() -> &'static Mutex<HashMap<CompileKey, Ptx>> {
    static CACHE: OnceLock<Mutex<HashMap<CompileKey, Ptx>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The full source NVRTC sees for a file: prelude, then the file.
pub fn full_source(file: &KernelFile) -> String {
    format!("{PRELUDE}\n// ---- {} ----\n{}", file.name, file.source)
}

/// Compiles `file` with `defines` for `arch`, or returns the cached result.
pub fn compile(file: &'static KernelFile, defines: &[(&str, String)], arch: &str) -> Result<Ptx> {
    if !nvrtc_available() {
        return Err(CudaError::MissingLibrary {
            lib: "nvrtc",
            hint: "install `nvidia-cuda-nvrtc` (PyPI) or a CUDA toolkit and put its lib folder \
                   on LD_LIBRARY_PATH"
                .into(),
        });
    }
    let key = CompileKey::new(file.name, defines, arch);
    if let Some(ptx) = cache().lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(ptx.clone());
    }
    let opts = CompileOptions {
        options: key.options(),
        name: Some(file.name.to_owned()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(full_source(file), opts).map_err(|e| {
        let (options, log) = match &e {
            CompileError::CompileError { options, log, .. } => {
                (options.join(" "), log.to_string_lossy().into_owned())
            }
            other => (key.options().join(" "), format!("{other:?}")),
        };
        CudaError::Nvrtc {
            kernel: file.name.to_owned(),
            options,
            log,
        }
    })?;
    cache()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, ptx.clone());
    Ok(ptx)
}

/// The defines a kernel file needs for a model with this head size.
pub fn defines_for(file: &KernelFile, head_size: usize) -> Vec<(&'static str, String)> {
    if file.needs_head_size {
        vec![("HEAD_SIZE", head_size.to_string())]
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names_follow_compute_capability() {
        assert_eq!(arch_name(9, 0), "sm_90");
        assert_eq!(arch_name(8, 6), "sm_86");
        assert_eq!(arch_name(10, 0), "sm_100");
    }

    #[test]
    fn compile_keys_sort_defines_and_build_options() {
        let a = CompileKey::new("wkv6.cu", &[("B", "2".into()), ("A", "1".into())], "sm_90");
        let b = CompileKey::new("wkv6.cu", &[("A", "1".into()), ("B", "2".into())], "sm_90");
        assert_eq!(a, b);
        assert_eq!(
            a.options(),
            vec!["--gpu-architecture=sm_90", "-DA=1", "-DB=2"]
        );
        assert_ne!(a, CompileKey::new("wkv6.cu", &[("A", "1".into())], "sm_90"));
    }

    #[test]
    fn every_function_is_defined_in_its_file() {
        for file in KERNEL_FILES {
            for func in file.functions {
                let decl = format!("{func}(");
                assert!(
                    file.source.contains(&decl) && file.source.contains("extern \"C\" __global__"),
                    "{} does not define {func}",
                    file.name
                );
            }
            assert_eq!(
                file.needs_head_size,
                file.source.contains("HEAD_SIZE"),
                "{}: needs_head_size must match the source",
                file.name
            );
        }
    }
}
