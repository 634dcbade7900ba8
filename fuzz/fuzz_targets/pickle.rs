//! The restricted unpickler on its own. Inside a `.pth` the pickle is CRC-checked by the zip
//! reader, so mutating it through the `pth` target rarely gets past the checksum; this target
//! feeds `data.pkl` bytes straight in.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(dict) = rwkv_model::pickle::read_state_dict(data) {
        for (_name, t) in dict {
            let _ = t.shape.iter().zip(&t.stride).count();
        }
    }
});
