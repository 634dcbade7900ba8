//! Decoding of the Python literals that the World vocabulary stores its tokens as.
//!
//! The reference builds the vocabulary with `eval()`, so a token's bytes are exactly what Python
//! makes of the literal: a `str` literal is encoded to UTF-8 (so `'\x80'` is the code point U+0080,
//! two bytes C2 80), a `bytes` literal is taken byte for byte (`b'\x80'` is the single byte 0x80).
//! Errors are plain messages; the caller adds the file and line.

use std::iter::Peekable;
use std::str::Chars;

/// Decodes one Python `'…'`, `"…"`, `b'…'` or `b"…"` literal into the token's bytes.
pub(crate) fn decode_literal(literal: &str) -> Result<Vec<u8>, String> {
    let (is_bytes, quoted) = match literal.strip_prefix(['b', 'B']) {
        Some(rest) => (true, rest),
        None => (false, literal),
    };
    let quote = match quoted.chars().next() {
        Some(q @ ('\'' | '"')) => q,
        _ => {
            return Err(format!(
                "expected a quoted Python literal, found {literal:?}"
            ))
        }
    };
    // The closing quote must be a different character from the opening one (len >= 2).
    let body = quoted
        .strip_prefix(quote)
        .and_then(|rest| rest.strip_suffix(quote))
        .ok_or_else(|| format!("unterminated literal {literal:?}"))?;
    let mut decoder = BodyDecoder {
        chars: body.chars().peekable(),
        is_bytes,
        quote,
        out: Vec::with_capacity(body.len()),
    };
    decoder.run()?;
    Ok(decoder.out)
}

/// State for decoding the text between the quotes.
struct BodyDecoder<'a> {
    chars: Peekable<Chars<'a>>,
    is_bytes: bool,
    quote: char,
    out: Vec<u8>,
}

impl BodyDecoder<'_> {
    fn run(&mut self) -> Result<(), String> {
        while let Some(c) = self.chars.next() {
            if c == self.quote {
                return Err(format!("unescaped {c} inside the literal"));
            }
            if c == '\\' {
                self.escape()?;
            } else if self.is_bytes && !c.is_ascii() {
                // Python rejects this at parse time: bytes literals may only hold ASCII.
                return Err(format!("non-ASCII character {c:?} in a bytes literal"));
            } else {
                self.push_char(c);
            }
        }
        Ok(())
    }

    /// Handles the character(s) after a backslash, as Python's literal parser does.
    fn escape(&mut self) -> Result<(), String> {
        let Some(e) = self.chars.next() else {
            return Err("literal ends with a lone backslash".to_string());
        };
        match e {
            '\\' | '\'' | '"' => self.out.push(e as u8),
            'n' => self.out.push(b'\n'),
            'r' => self.out.push(b'\r'),
            't' => self.out.push(b'\t'),
            'a' => self.out.push(0x07),
            'b' => self.out.push(0x08),
            'f' => self.out.push(0x0c),
            'v' => self.out.push(0x0b),
            // A backslash before a newline is a line continuation; cannot occur in a line-based file
            // but costs nothing to honour.
            '\n' => {}
            '0'..='7' => self.octal(e)?,
            'x' => {
                let v = self.hex(2)?;
                self.push_code(v)?;
            }
            'u' if !self.is_bytes => {
                let v = self.hex(4)?;
                self.push_code(v)?;
            }
            'U' if !self.is_bytes => {
                let v = self.hex(8)?;
                self.push_code(v)?;
            }
            // Python keeps unknown escapes verbatim, backslash included (e.g. `b'\u0041'`).
            other => {
                self.out.push(b'\\');
                self.push_char(other);
            }
        }
        Ok(())
    }

    /// `\o`, `\oo` or `\ooo` (the first digit already consumed).
    fn octal(&mut self, first: char) -> Result<(), String> {
        let mut v = first.to_digit(8).unwrap_or(0);
        for _ in 0..2 {
            match self.chars.peek().and_then(|c| c.to_digit(8)) {
                Some(d) => {
                    v = v * 8 + d;
                    self.chars.next();
                }
                None => break,
            }
        }
        self.push_code(v)
    }

    /// Reads exactly `n` hex digits, as Python requires for `\x`, `\u` and `\U`.
    fn hex(&mut self, n: usize) -> Result<u32, String> {
        let mut v: u32 = 0;
        for _ in 0..n {
            let digit = self.chars.next().and_then(|c| c.to_digit(16));
            match digit {
                Some(d) => v = (v << 4) | d,
                None => return Err(format!("truncated escape: expected {n} hex digits")),
            }
        }
        Ok(v)
    }

    /// A numeric escape: a raw byte in a bytes literal, a code point in a str literal.
    fn push_code(&mut self, v: u32) -> Result<(), String> {
        if self.is_bytes {
            let byte = u8::try_from(v)
                .map_err(|_| format!("escape value {v:#o} does not fit in a byte"))?;
            self.out.push(byte);
            return Ok(());
        }
        // Surrogates are legal in a Python str but fail its UTF-8 encode, so the reference rejects them.
        let c = char::from_u32(v)
            .ok_or_else(|| format!("code point U+{v:04X} cannot be encoded as UTF-8"))?;
        self.push_char(c);
        Ok(())
    }

    fn push_char(&mut self, c: char) {
        let mut buf = [0u8; 4];
        self.out
            .extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::decode_literal;

    #[test]
    fn str_hex_escape_is_a_code_point_encoded_as_utf8() {
        assert_eq!(decode_literal(r"'\x80'").unwrap(), vec![0xC2, 0x80]);
        assert_eq!(decode_literal(r"'\x00'").unwrap(), vec![0x00]);
    }

    #[test]
    fn bytes_hex_escape_is_a_raw_byte() {
        assert_eq!(decode_literal(r"b'\x80'").unwrap(), vec![0x80]);
        assert_eq!(decode_literal(r"b'\xe4\xb8'").unwrap(), vec![0xE4, 0xB8]);
    }

    #[test]
    fn simple_escapes_decode_like_python() {
        assert_eq!(decode_literal(r"'\\'").unwrap(), b"\\");
        assert_eq!(decode_literal(r"'\''").unwrap(), b"'");
        assert_eq!(decode_literal(r#""'""#).unwrap(), b"'");
        assert_eq!(decode_literal(r#""\"""#).unwrap(), b"\"");
        assert_eq!(decode_literal(r"'\n\r\t'").unwrap(), b"\n\r\t");
        assert_eq!(decode_literal(r"'\u4e2d'").unwrap(), "中".as_bytes());
        assert_eq!(decode_literal(r"'\U0001F600'").unwrap(), "😀".as_bytes());
        assert_eq!(decode_literal(r"'\0'").unwrap(), b"\0");
    }

    #[test]
    fn raw_non_ascii_in_str_is_utf8_and_spaces_are_kept() {
        assert_eq!(decode_literal("'中文 '").unwrap(), "中文 ".as_bytes());
        assert_eq!(decode_literal("'  '").unwrap(), b"  ");
    }

    #[test]
    fn unknown_escapes_keep_the_backslash() {
        assert_eq!(decode_literal(r"b'\u0041'").unwrap(), br"\u0041");
        assert_eq!(decode_literal(r"'\q'").unwrap(), br"\q");
    }

    #[test]
    fn malformed_literals_are_errors_not_panics() {
        for bad in [
            "",
            "'",
            "b",
            "b'",
            "abc",
            "'abc",
            r"'\'",
            r"'\x4'",
            r"'\xZZ'",
            r"'\ud800'",
            "'a'b'",
            "b'é'",
            r"b'\777'",
            "'中",
        ] {
            assert!(decode_literal(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
