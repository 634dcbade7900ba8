//! The session import format (`rwkv_engine::export::decode`).
//!
//! The first input byte is a flag: when its low bit is set the trailing CRC-32 is recomputed
//! before decoding, so the fuzzer can reach the checks behind the checksum. A decoded export
//! must encode back to exactly the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rwkv_engine::export::{decode, encode};
use rwkv_fuzz::{state_config, STATE_HASH};

fuzz_target!(|data: &[u8]| {
    let Some((&flag, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if flag & 1 == 1 && bytes.len() >= 4 {
        let body = bytes.len() - 4;
        let crc = crc32(&bytes[..body]);
        bytes[body..].copy_from_slice(&crc.to_le_bytes());
    }
    let cfg = state_config();
    if let Ok(snap) = decode(&STATE_HASH, &cfg, &bytes) {
        assert_eq!(
            encode(&STATE_HASH, &cfg, &snap),
            bytes,
            "decode/encode round trip"
        );
    }
});

/// CRC-32 (IEEE), the checksum the export format uses (crc32fast computes the same).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
