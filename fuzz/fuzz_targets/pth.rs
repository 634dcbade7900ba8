//! A whole `.pth` file (zip archive + pickle + storage entries) from arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rwkv_model::Checkpoint;

fuzz_target!(|data: &[u8]| {
    if let Ok(ckpt) = Checkpoint::from_bytes("fuzz.pth", data) {
        for t in ckpt.tensors().values() {
            // The loader promised that every tensor's bytes match its shape.
            assert_eq!(t.bytes().len(), t.len() * t.dtype().size());
        }
        let _ = ckpt.fingerprint();
    }
});
