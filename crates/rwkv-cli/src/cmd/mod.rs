//! One module per subcommand, plus the helpers they share.

pub mod backend;
pub mod bench;
pub mod cluster_args;
pub mod eval;
pub mod forward;
pub mod generate;
pub mod inspect;
pub mod router;
pub mod serve;
pub mod server;
pub mod tokenize;
pub mod worker;

use anyhow::{bail, Context};

/// Parses `1,2,3` (spaces allowed) into token ids.
pub fn parse_ids(text: &str) -> anyhow::Result<Vec<u32>> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .with_context(|| format!("`{s}` is not a token id"))
        })
        .collect()
}

/// Decodes a hex string (`48656c6c6f`, optional `0x`, spaces ignored) into bytes.
pub fn parse_hex(text: &str) -> anyhow::Result<Vec<u8>> {
    let clean: String = text
        .trim_start_matches("0x")
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    if !clean.len().is_multiple_of(2) {
        bail!("hex input has an odd number of digits");
    }
    (0..clean.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&clean[i..i + 2], 16)
                .with_context(|| format!("`{}` is not hex", &clean[i..i + 2]))
        })
        .collect()
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_hex_parse_and_reject_garbage() {
        assert_eq!(parse_ids("1, 2,3").unwrap(), vec![1, 2, 3]);
        assert!(parse_ids("1,x").unwrap_err().to_string().contains("`x`"));
        assert_eq!(parse_hex("0x48 65").unwrap(), b"He");
        assert!(parse_hex("abc").is_err());
        assert!(parse_hex("zz").is_err());
        assert_eq!(to_hex(b"He"), "4865");
    }
}
