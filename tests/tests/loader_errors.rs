//! Broken, truncated, hostile and foreign checkpoints give clear errors naming the file and the
//! tensor, never a panic.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use common::fixture;
use rwkv_model::synthetic::{random_checkpoint, SyntheticSpec};
use rwkv_model::{Checkpoint, DType, ModelError, ModelWeights, Tensor};

fn tiny() -> BTreeMap<String, Tensor> {
    random_checkpoint(&SyntheticSpec {
        head_size: 16,
        ..SyntheticSpec::new(32, 2, 20)
    })
}

fn save(dir: &Path, name: &str, tensors: &BTreeMap<String, Tensor>) -> std::path::PathBuf {
    let path = dir.join(name);
    Checkpoint::save_safetensors(tensors, &path).unwrap();
    path
}

fn load_err(path: &Path) -> String {
    let err = ModelWeights::load(path).expect_err("loading must fail");
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "error does not name the file: {msg}"
    );
    msg
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = tiny();
    t.remove("blocks.1.ffn.value.weight");
    let msg = load_err(&save(dir.path(), "m.safetensors", &t));
    assert!(msg.contains("blocks.1.ffn.value.weight"), "{msg}");
}

#[test]
fn misshapen_tensor_is_named_with_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = tiny();
    t.insert(
        "blocks.0.att.key.weight".into(),
        Tensor::from_f32(DType::BF16, vec![32, 31], &[0.0; 32 * 31]),
    );
    let msg = load_err(&save(dir.path(), "m.safetensors", &t));
    assert!(
        msg.contains("blocks.0.att.key.weight") && msg.contains("[32, 31]"),
        "{msg}"
    );
}

#[test]
fn other_rwkv_versions_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut v7 = tiny();
    v7.insert(
        "blocks.0.att.w0".into(),
        Tensor::from_f32(DType::BF16, vec![32], &[0.0; 32]),
    );
    assert!(load_err(&save(dir.path(), "v7.safetensors", &v7)).contains("RWKV-7"));
    let v5: BTreeMap<_, _> = tiny()
        .into_iter()
        .filter(|(k, _)| !k.contains("time_maa"))
        .collect();
    assert!(load_err(&save(dir.path(), "v5.safetensors", &v5)).contains("time_maa"));
}

#[test]
fn garbage_and_empty_files_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pth");
    std::fs::write(&empty, b"").unwrap();
    load_err(&empty);
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(
        &junk,
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    load_err(&junk);
    let missing = dir.path().join("does-not-exist.pth");
    assert!(matches!(
        ModelWeights::load(&missing),
        Err(ModelError::Io { .. })
    ));
}

#[test]
fn every_truncation_of_both_formats_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    for ext in ["pth", "safetensors"] {
        let bytes = std::fs::read(fixture(&format!("rwkv6-tiny-c128-l2.{ext}"))).unwrap();
        // Cut points across the whole file, including inside headers and the zip directory.
        let cuts = (0..64)
            .map(|i| bytes.len() * i / 64)
            .chain([1, 7, 8, 9, 100, bytes.len() - 1]);
        for cut in cuts {
            let path = dir.path().join(format!("cut{cut}.{ext}"));
            std::fs::write(&path, &bytes[..cut]).unwrap();
            load_err(&path);
        }
    }
}

#[test]
fn a_pickle_that_calls_arbitrary_code_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evil.pth");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("evil/data.pkl", opts).unwrap();
    zip.write_all(b"\x80\x02cos\nsystem\nX\x05\x00\x00\x00touchR.")
        .unwrap();
    zip.finish().unwrap();
    let msg = load_err(&path);
    assert!(
        msg.contains("os.system") && msg.contains("refusing"),
        "{msg}"
    );
}

#[test]
fn state_tuned_initial_state_is_transposed_to_key_value_layout() {
    let mut t = tiny();
    let (h, n) = (2, 16);
    let values: Vec<f32> = (0..h * n * n).map(|i| i as f32).collect();
    t.insert(
        "blocks.1.att.time_state".into(),
        Tensor::from_f32(DType::F32, vec![h, n, n], &values),
    );
    let w = ModelWeights::from_checkpoint(&Checkpoint::from_tensors("ts", t)).unwrap();
    assert!(w.config.has_time_state);
    let state = w.initial_state();
    let (_, wkv0, _) = state.layer(0);
    assert!(
        wkv0.iter().all(|&v| v == 0.0),
        "layer without time_state starts at zero"
    );
    let (_, wkv1, _) = state.layer(1);
    // Stored [h][value][key]; the state is [h][key][value].
    let (head, key, value) = (1, 3, 5);
    assert_eq!(
        wkv1[head * n * n + key * n + value],
        values[head * n * n + value * n + key]
    );
}
