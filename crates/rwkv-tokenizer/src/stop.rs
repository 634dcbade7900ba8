//! Stop strings over streamed text, matched across token boundaries (spec §5.3).
//!
//! Text arrives in pieces (one decoded token at a time), so a stop string such as `"\n\n"` may be
//! split over two pushes. [`StopChecker`] therefore holds back exactly the tail of the text that
//! could still grow into a stop string, and releases it as soon as it cannot.

/// What to do after one [`StopChecker::push`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutcome {
    /// Text that is now safe to send to the client (possibly empty).
    pub emit: String,
    /// A stop string matched: `emit` ends right before it, and the generation must end.
    pub stopped: bool,
}

/// Incremental stop-string matcher for one sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopChecker {
    stops: Vec<String>,
    /// Text received but not yet emitted, because its tail is a prefix of some stop string.
    pending: String,
    /// Set once a stop string matched; later pushes are ignored.
    stopped: bool,
}

impl StopChecker {
    /// A checker for the given stop strings. Empty strings are ignored (validation rejects them).
    pub fn new<I, S>(stops: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let stops = stops
            .into_iter()
            .map(Into::into)
            .filter(|s| !s.is_empty())
            .collect();
        Self {
            stops,
            pending: String::new(),
            stopped: false,
        }
    }

    /// Adds newly decoded text and returns what can be emitted now.
    ///
    /// On a match, the text before the earliest-starting stop string is emitted, the stop string
    /// and anything after it are dropped, and `stopped` is set (and stays set).
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stopped {
            return StopOutcome {
                emit: String::new(),
                stopped: true,
            };
        }
        self.pending.push_str(text);
        if let Some(start) = self.earliest_match() {
            self.stopped = true;
            self.pending.truncate(start);
            return StopOutcome {
                emit: std::mem::take(&mut self.pending),
                stopped: true,
            };
        }
        let keep = self.held_back_len();
        let tail = self.pending.split_off(self.pending.len() - keep);
        StopOutcome {
            emit: std::mem::replace(&mut self.pending, tail),
            stopped: false,
        }
    }

    /// Releases the held-back text when the generation ends for another reason (max tokens, stop
    /// token). Returns an empty string after a stop-string match.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// True once a stop string matched.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Byte offset in `pending` of the earliest stop-string match, if any.
    fn earliest_match(&self) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|stop| self.pending.find(stop.as_str()))
            .min()
    }

    /// Length in bytes of the longest suffix of `pending` that is a proper prefix of a stop
    /// string. Any future match must start inside that suffix, so everything before it is safe.
    fn held_back_len(&self) -> usize {
        let text = self.pending.as_bytes();
        let longest_stop = self.stops.iter().map(String::len).max().unwrap_or(0);
        let max_keep = longest_stop.saturating_sub(1).min(text.len());
        (1..=max_keep)
            .rev()
            .find(|&k| {
                // A suffix starting inside a UTF-8 sequence cannot equal the prefix of a valid
                // string, but the boundary check keeps the later `split_off` obviously safe.
                self.pending.is_char_boundary(text.len() - k)
                    && self
                        .stops
                        .iter()
                        .any(|s| s.len() > k && s.as_bytes().starts_with(&text[text.len() - k..]))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(emit: &str, stopped: bool) -> StopOutcome {
        StopOutcome {
            emit: emit.into(),
            stopped,
        }
    }

    #[test]
    fn text_without_stop_prefixes_is_emitted_at_once() {
        let mut c = StopChecker::new(["\n\n"]);
        assert_eq!(c.push("Hello"), out("Hello", false));
        assert_eq!(c.push(" world"), out(" world", false));
        assert_eq!(c.finish(), "");
    }

    #[test]
    fn a_stop_string_split_across_pushes_stops_without_emitting_it() {
        let mut c = StopChecker::new(["\n\n"]);
        assert_eq!(c.push(" Paris.\n"), out(" Paris.", false));
        assert_eq!(c.push("\nUser:"), out("", true));
        assert!(c.is_stopped());
        assert_eq!(c.push("more"), out("", true));
        assert_eq!(c.finish(), "");
    }

    #[test]
    fn a_held_back_prefix_is_released_when_the_text_diverges() {
        let mut c = StopChecker::new(["User:"]);
        assert_eq!(c.push("a Us"), out("a ", false));
        assert_eq!(c.push("e"), out("", false));
        assert_eq!(c.push("d it"), out("Used it", false));
    }

    #[test]
    fn a_match_inside_one_push_emits_only_the_text_before_it() {
        let mut c = StopChecker::new(["###", "\n\n"]);
        assert_eq!(c.push("one\n\ntwo ### three"), out("one", true));
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        let mut c = StopChecker::new(["bc", "abcd"]);
        assert_eq!(c.push("xabcd"), out("x", true));
        let mut c = StopChecker::new(["bc", "abcd"]);
        assert_eq!(c.push("xab"), out("x", false));
        assert_eq!(c.push("c"), out("a", true));
    }

    #[test]
    fn held_back_text_is_flushed_by_finish() {
        let mut c = StopChecker::new(["\n\n"]);
        assert_eq!(c.push("end\n"), out("end", false));
        assert_eq!(c.finish(), "\n");
    }

    #[test]
    fn multibyte_text_is_held_back_on_character_boundaries() {
        let mut c = StopChecker::new(["你好吗"]);
        assert_eq!(c.push("说你"), out("说", false));
        assert_eq!(c.push("好"), out("", false));
        assert_eq!(c.push("!"), out("你好!", false));
        assert_eq!(c.push("你好吗?"), out("", true));
    }

    #[test]
    fn no_stop_strings_means_nothing_is_held_back() {
        let mut c = StopChecker::new(Vec::<String>::new());
        assert_eq!(c.push("\n\n"), out("\n\n", false));
    }
}
