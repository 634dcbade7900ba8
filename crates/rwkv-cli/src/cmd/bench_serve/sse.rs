//! An incremental parser of server-sent events (the `text/event-stream` format of the HTML
//! standard), fed the response body chunk by chunk as it arrives.
//!
//! Incremental because the benchmark's timings are only real if every event is seen the moment
//! its bytes arrive: buffering the whole body and parsing it at the end would make every token
//! arrive at once. Network chunks split events, lines and even UTF-8 characters anywhere, so
//! bytes are kept until a line is complete and only then decoded.

/// Turns body bytes into the `data` of complete events, in order.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of the current, unfinished line.
    line: Vec<u8>,
    /// `data` of the current event so far (several `data:` lines join with `\n`).
    data: String,
    has_data: bool,
    /// The previous chunk ended in `\r`: a `\n` starting this one completes that CRLF, not a new
    /// (empty) line that would end the event early.
    after_cr: bool,
}

impl SseParser {
    /// Feeds the next bytes of the body; returns the `data` of every event they complete.
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<String> {
        let mut events = Vec::new();
        if self.after_cr {
            if let Some(rest) = bytes.strip_prefix(b"\n") {
                bytes = rest;
            }
            if !bytes.is_empty() {
                self.after_cr = false;
            }
        }
        while let Some(end) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.line.extend_from_slice(&bytes[..end]);
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, &mut events);
            let mut next = end + 1;
            if bytes[end] == b'\r' {
                match bytes.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    // The `\n` of this CRLF may be in the next chunk.
                    None => self.after_cr = true,
                }
            }
            bytes = &bytes[next..];
        }
        self.line.extend_from_slice(bytes);
        events
    }

    /// The event left when the body ends without the final blank line (the standard says to
    /// drop it; a lenient client keeps it, which only matters for a broken server's last event).
    pub fn finish(&mut self) -> Option<String> {
        let line = std::mem::take(&mut self.line);
        let mut events = Vec::new();
        if !line.is_empty() {
            self.line_done(&line, &mut events);
        }
        self.line_done(b"", &mut events);
        events.pop()
    }

    fn line_done(&mut self, line: &[u8], events: &mut Vec<String>) {
        if line.is_empty() {
            // A blank line dispatches the event; one without data lines is no event.
            if std::mem::take(&mut self.has_data) {
                events.push(std::mem::take(&mut self.data));
            }
            return;
        }
        if line[0] == b':' {
            return; // a comment, e.g. a keep-alive
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let value = &line[i + 1..];
                (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        // `event`, `id` and `retry` carry nothing the OpenAI streaming format uses.
        if field == b"data" {
            if self.has_data {
                self.data.push('\n');
            }
            self.data.push_str(&String::from_utf8_lossy(value));
            self.has_data = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "data: {\"a\":1}\n\n: keep-alive\n\nevent: x\ndata: two\ndata: lines\n\n\
                          data: ünï\n\ndata: [DONE]\n\n";

    fn all_at_once(body: &[u8]) -> Vec<String> {
        let mut p = SseParser::default();
        let mut out = p.push(body);
        out.extend(p.finish());
        out
    }

    #[test]
    fn events_comments_and_multiline_data() {
        assert_eq!(
            all_at_once(STREAM.as_bytes()),
            ["{\"a\":1}", "two\nlines", "ünï", "[DONE]"]
        );
    }

    #[test]
    fn any_chunking_gives_the_same_events() {
        // Every split point, including inside the two-byte UTF-8 characters, and byte by byte.
        let body = STREAM.as_bytes();
        let want = all_at_once(body);
        for cut in 0..=body.len() {
            let mut p = SseParser::default();
            let mut got = p.push(&body[..cut]);
            got.extend(p.push(&body[cut..]));
            got.extend(p.finish());
            assert_eq!(got, want, "split at {cut}");
        }
        let mut p = SseParser::default();
        let mut got: Vec<String> = body.iter().flat_map(|b| p.push(&[*b])).collect();
        got.extend(p.finish());
        assert_eq!(got, want);
    }

    #[test]
    fn crlf_and_cr_line_endings_even_split_across_chunks() {
        let crlf = STREAM.replace('\n', "\r\n");
        let cr = STREAM.replace('\n', "\r");
        let want = all_at_once(STREAM.as_bytes());
        for body in [crlf.as_bytes(), cr.as_bytes()] {
            assert_eq!(all_at_once(body), want);
            for cut in 0..=body.len() {
                let mut p = SseParser::default();
                let mut got = p.push(&body[..cut]);
                got.extend(p.push(&body[cut..]));
                got.extend(p.finish());
                assert_eq!(got, want, "split at {cut}");
            }
        }
    }

    #[test]
    fn an_event_completes_only_at_its_blank_line() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: x\n").is_empty());
        assert_eq!(p.push(b"\n"), ["x"]);
        // No space after the colon, and a field without a colon (empty data).
        assert_eq!(p.push(b"data:y\n\ndata\n\n"), ["y", ""]);
        // An unterminated last event is still returned by `finish`.
        assert!(p.push(b"data: tail").is_empty());
        assert_eq!(p.finish().as_deref(), Some("tail"));
        assert_eq!(p.finish(), None);
    }
}
