//! The session export format: a session's exact state and token history, bound to one model.
//!
//! Layout (little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `RWKVSESS` |
//! | 4 | format version ([`EXPORT_VERSION`]) |
//! | 32 | model hash (the engine's [`crate::EngineConfig::model_hash`]) |
//! | 16 | `n_layer`, `n_embd`, `n_head`, `head_size` (u32 each) |
//! | 24 | history length, pending length, state length (u64 each) |
//! | 4·h + 4·p | history tokens, then pending tokens (u32) |
//! | 4·s | state, f32 in the layout of `rwkv_model::State` |
//! | 4 | CRC-32 of everything above |
//!
//! The history (tokens already in the state) lets an importer rebuild the state by recomputation
//! if it is ever evicted; the pending tokens were generated but not yet fed. Import validates
//! every field before anything touches the engine and names what is wrong.

use rwkv_model::{ModelConfig, State};

use crate::error::EngineError;

/// The magic bytes opening every export.
pub const EXPORT_MAGIC: &[u8; 8] = b"RWKVSESS";
/// The only format version this build reads and writes.
pub const EXPORT_VERSION: u32 = 1;

const HEADER_LEN: usize = 8 + 4 + 32 + 16 + 24;

/// What an export carries.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionSnapshot {
    /// Tokens the state has consumed.
    pub history: Vec<u32>,
    /// Tokens that belong to the conversation but are not in the state yet.
    pub pending: Vec<u32>,
    pub state: State,
}

/// Bytes of an export holding `tokens` history and pending tokens and a state of `state_len`
/// values.
pub fn encoded_len(tokens: usize, state_len: usize) -> usize {
    HEADER_LEN + 4 * (tokens + state_len) + 4
}

/// Serializes a snapshot for a model.
pub fn encode(model_hash: &[u8; 32], cfg: &ModelConfig, snap: &SessionSnapshot) -> Vec<u8> {
    encode_parts(model_hash, cfg, &snap.history, &snap.pending, &snap.state)
}

/// [`encode`] from borrowed parts, for a caller that holds the state elsewhere (the disk tier
/// writes shared states without copying them first).
pub fn encode_parts(
    model_hash: &[u8; 32],
    cfg: &ModelConfig,
    history: &[u32],
    pending: &[u32],
    state: &State,
) -> Vec<u8> {
    let state = state.as_flat();
    let len = encoded_len(history.len() + pending.len(), state.len());
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(EXPORT_MAGIC);
    out.extend_from_slice(&EXPORT_VERSION.to_le_bytes());
    out.extend_from_slice(model_hash);
    for dim in shape(cfg) {
        out.extend_from_slice(&dim.to_le_bytes());
    }
    for n in [history.len(), pending.len(), state.len()] {
        out.extend_from_slice(&(n as u64).to_le_bytes());
    }
    for &t in history.iter().chain(pending) {
        out.extend_from_slice(&t.to_le_bytes());
    }
    for &x in state {
        out.extend_from_slice(&x.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Parses and validates an export for this model.
pub fn decode(
    model_hash: &[u8; 32],
    cfg: &ModelConfig,
    bytes: &[u8],
) -> Result<SessionSnapshot, EngineError> {
    let bad = |msg: String| EngineError::Import(msg);
    if bytes.len() < HEADER_LEN + 4 {
        return Err(bad(format!(
            "{} bytes is shorter than the {}-byte header",
            bytes.len(),
            HEADER_LEN + 4
        )));
    }
    if &bytes[..8] != EXPORT_MAGIC {
        return Err(bad("not a session export (bad magic bytes)".into()));
    }
    let mut r = Reader { bytes, at: 8 };
    let version = r.u32();
    if version != EXPORT_VERSION {
        return Err(bad(format!(
            "format version {version} is not supported (this build reads {EXPORT_VERSION})"
        )));
    }
    let (body, tail) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    if crc32fast::hash(body) != stored {
        return Err(bad("checksum mismatch: the export is corrupted".into()));
    }
    if r.take(32) != model_hash {
        return Err(bad("the export was made with a different model".into()));
    }
    let got: Vec<u32> = (0..4).map(|_| r.u32()).collect();
    if got != shape(cfg) {
        return Err(bad(format!(
            "state shape (n_layer, n_embd, n_head, head_size) is {got:?}, the model has {:?}",
            shape(cfg)
        )));
    }
    let (h, p, s) = (r.u64(), r.u64(), r.u64());
    if s != cfg.state_len() as u64 {
        return Err(bad(format!(
            "state has {s} values, the model needs {}",
            cfg.state_len()
        )));
    }
    let expected = (h as u128 + p as u128 + s as u128) * 4 + (HEADER_LEN + 4) as u128;
    if expected != bytes.len() as u128 {
        return Err(bad(format!(
            "length is {} bytes, the header describes {expected}",
            bytes.len()
        )));
    }
    let mut tokens = |n: u64| -> Result<Vec<u32>, EngineError> {
        let ids: Vec<u32> = (0..n).map(|_| r.u32()).collect();
        match ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            Some(t) => Err(bad(format!(
                "token id {t} is outside the vocabulary (size {})",
                cfg.vocab_size
            ))),
            None => Ok(ids),
        }
    };
    let history = tokens(h)?;
    let pending = tokens(p)?;
    let data: Vec<f32> = (0..s).map(|_| f32::from_bits(r.u32())).collect();
    if data.iter().any(|x| !x.is_finite()) {
        return Err(bad("the state holds NaN or infinite values".into()));
    }
    let state = State::from_flat(cfg, data).map_err(|e| bad(e.to_string()))?;
    Ok(SessionSnapshot {
        history,
        pending,
        state,
    })
}

fn shape(cfg: &ModelConfig) -> Vec<u32> {
    [cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size]
        .iter()
        .map(|&d| d as u32)
        .collect()
}

/// Sequential reads over a buffer whose length was checked beforehand.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.bytes[self.at..self.at + n];
        self.at += n;
        s
    }

    fn u32(&mut self) -> u32 {
        let b = self.take(4);
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    fn u64(&mut self) -> u64 {
        let mut a = [0; 8];
        a.copy_from_slice(self.take(8));
        u64::from_le_bytes(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rwkv_model::DType;

    fn cfg() -> ModelConfig {
        ModelConfig {
            n_embd: 8,
            n_layer: 2,
            n_head: 1,
            head_size: 8,
            dim_ffn: 16,
            vocab_size: 10,
            maa_lora: 2,
            decay_lora: 2,
            weight_dtype: DType::F32,
            has_time_state: false,
        }
    }

    fn snapshot() -> SessionSnapshot {
        let data = (0..cfg().state_len()).map(|i| i as f32 * 0.5).collect();
        SessionSnapshot {
            history: vec![1, 2, 3],
            pending: vec![9],
            state: State::from_flat(&cfg(), data).unwrap(),
        }
    }

    fn err(bytes: &[u8]) -> String {
        decode(&[7; 32], &cfg(), bytes).unwrap_err().to_string()
    }

    #[test]
    fn snapshots_round_trip_exactly() {
        let bytes = encode(&[7; 32], &cfg(), &snapshot());
        assert_eq!(decode(&[7; 32], &cfg(), &bytes).unwrap(), snapshot());
    }

    #[test]
    fn corruption_and_mismatches_are_rejected_with_a_reason() {
        let good = encode(&[7; 32], &cfg(), &snapshot());
        let mut flipped = good.clone();
        flipped[HEADER_LEN + 20] ^= 1;
        assert!(err(&flipped).contains("checksum"));
        assert!(err(&good[..good.len() - 4]).contains("checksum"));
        assert!(err(&good[..10]).contains("header"));
        assert!(err(&[b'G'; 200]).contains("magic"));
        let other = decode(&[8; 32], &cfg(), &good).unwrap_err().to_string();
        assert!(other.contains("different model"), "{other}");
        let wide = ModelConfig {
            n_embd: 16,
            n_head: 2,
            ..cfg()
        };
        let shape = decode(&[7; 32], &wide, &good).unwrap_err().to_string();
        assert!(shape.contains("shape"), "{shape}");
        let mut v2 = good.clone();
        v2[8] = 2;
        assert!(err(&v2).contains("version 2"));
    }
}
