//! A `.safetensors` file from arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rwkv_model::Checkpoint;

fuzz_target!(|data: &[u8]| {
    if let Ok(ckpt) = Checkpoint::from_bytes("fuzz.safetensors", data) {
        for t in ckpt.tensors().values() {
            assert_eq!(t.bytes().len(), t.len() * t.dtype().size());
            let _ = t.to_f32();
        }
    }
});
