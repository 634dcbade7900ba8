//! Compiles every kernel file with NVRTC for sm_80 and sm_90. Needs no GPU, only the NVRTC
//! library (PyPI `nvidia-cuda-nvrtc`, lib folder on LD_LIBRARY_PATH). Without it the test
//! fails when `CI` is set and otherwise prints why it skipped.

use std::collections::BTreeSet;

use rwkv_cuda::compile::{self, KERNEL_FILES};

fn nvrtc_or_skip() -> bool {
    if compile::nvrtc_available() {
        return true;
    }
    let msg = "NVRTC (libnvrtc.so) cannot be loaded: `pip install \"nvidia-cuda-nvrtc==13.0.*\"` \
               and add its `nvidia/cu13/lib` folder to LD_LIBRARY_PATH";
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    false
}

#[test]
fn kernel_registry_matches_the_kernels_folder() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    let registered: BTreeSet<String> = KERNEL_FILES.iter().map(|f| f.name.to_owned()).collect();
    assert_eq!(
        on_disk, registered,
        "every kernels/*.cu must be listed in KERNEL_FILES"
    );
}

#[test]
fn every_kernel_file_compiles_for_sm80_and_sm90() {
    if !nvrtc_or_skip() {
        return;
    }
    let mut failures = Vec::new();
    for arch in ["sm_80", "sm_90"] {
        for file in KERNEL_FILES {
            // Head size 64 (released models) and 8 (the tiny real test model).
            let sizes: &[usize] = if file.needs_head_size {
                &[64, 8]
            } else {
                &[64]
            };
            for &n in sizes {
                let defines = compile::defines_for(file, n);
                match compile::compile(file, &defines, arch) {
                    Ok(ptx) => {
                        let text = ptx.to_src();
                        for func in file.functions {
                            if !text.contains(&format!(".entry {func}(")) {
                                failures.push(format!("{} ({arch}): no entry {func}", file.name));
                            }
                        }
                    }
                    Err(e) => failures.push(format!("{e}")),
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
