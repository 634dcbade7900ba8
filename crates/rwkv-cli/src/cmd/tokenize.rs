//! `rwkv tokenize` and `rwkv detokenize`.

use rwkv_tokenizer::Tokenizer;

#[derive(clap::Args)]
pub struct TokenizeArgs {
    /// `world` (built-in RWKV World vocabulary), a `tokenizer.json` (Hugging Face) or a World
    /// vocabulary `.txt`.
    #[arg(long, default_value = "world")]
    tokenizer: String,
    /// Text to encode.
    #[arg(long, conflicts_with = "hex", required_unless_present = "hex")]
    text: Option<String>,
    /// Raw bytes to encode, as hex.
    #[arg(long)]
    hex: Option<String>,
}

#[derive(clap::Args)]
pub struct DetokenizeArgs {
    #[arg(long, default_value = "world")]
    tokenizer: String,
    /// Print the bytes as hex instead of text.
    #[arg(long)]
    hex: bool,
    /// Comma-separated token ids.
    ids: String,
}

pub fn run_tokenize(args: TokenizeArgs) -> anyhow::Result<()> {
    let tok = Tokenizer::load(&args.tokenizer)?;
    let ids = match (&args.text, &args.hex) {
        (Some(text), _) => tok.encode(text)?,
        (None, Some(hex)) => tok.encode_bytes(&super::parse_hex(hex)?)?,
        (None, None) => unreachable!("clap requires --text or --hex"),
    };
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}

pub fn run_detokenize(args: DetokenizeArgs) -> anyhow::Result<()> {
    let tok = Tokenizer::load(&args.tokenizer)?;
    let bytes = tok.decode_bytes(&super::parse_ids(&args.ids)?)?;
    if args.hex {
        println!("{}", super::to_hex(&bytes));
    } else {
        println!("{}", String::from_utf8_lossy(&bytes));
    }
    Ok(())
}
